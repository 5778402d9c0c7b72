"""Typed journal steps: what an action journals is a dataclass per kind of step, written into the run's
record as the plain JSON object it always was (``{"<owner>": "<kind>", <the fields>}``).

Each owner (the backup, the in-place restore) declares its step classes, each with a ``KIND``, in one
:class:`Steps`; recovery reads them back typed (``steps.all(run.steps, Staging)``). Entries of other
owners (the transfer driver's ``"tm"`` steps) are left to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar


class Step(Protocol):
    KIND: ClassVar[str]


S = TypeVar("S", bound=Step)


class Steps:
    """The journal steps of one owner: ``key`` names the owner in each entry."""

    def __init__(self, key: str, *kinds: type[Step]) -> None:
        self.key = key
        self.kinds = {kind.KIND: kind for kind in kinds}

    def entry(self, step: Step) -> dict[str, Any]:
        if self.kinds.get(step.KIND) is not type(step):
            raise TypeError(f"{type(step).__name__} is not a {self.key} step")
        fields = {name: value for name, value in dataclasses.asdict(step).items() if value is not None}  # type: ignore[call-overload]
        return {self.key: step.KIND, **fields}

    def read(self, entries: Iterable[Mapping[str, Any]]) -> list[Step]:
        """The owner's steps among ``entries``, in order; an entry of a kind this version does not know is
        skipped (a newer daemon's), one missing a field raises KeyError."""
        found: list[Step] = []
        for entry in entries:
            kind = self.kinds.get(entry.get(self.key, ""))
            if kind is None:
                continue
            names = [f for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
            found.append(kind(**{f.name: entry[f.name] for f in names
                                 if f.name in entry or f.default is dataclasses.MISSING}))
        return found

    def all(self, entries: Iterable[Mapping[str, Any]], kind: type[S]) -> list[S]:
        return [step for step in self.read(entries) if isinstance(step, kind)]

    def last(self, entries: Iterable[Mapping[str, Any]], kind: type[S]) -> S | None:
        of_kind = self.all(entries, kind)
        return of_kind[-1] if of_kind else None

    def owns(self, entry: Mapping[str, Any]) -> bool:
        return self.key in entry


@dataclasses.dataclass(frozen=True)
class VmStateSaved:
    """The VM's state before the action changed it: what recovery puts back."""

    KIND: ClassVar[str] = "state"
    vm: int
    state: int
    lcm: int


__all__ = ["Step", "Steps", "VmStateSaved"]
