"""Rendered XML kept per object version.

Objects in the state are replaced, never changed in place, so a rendering stays valid for as long as
the object it was made from is the current one (checked by identity). A rendering that also shows
other objects (a VM's body shows its scheduled actions) names them as ``deps``: it stays valid while
each of them is the same object too. A pool reply is then the concatenation of cached bodies:
one.vmpool.info over 10,000 VMs costs a string join, not 10,000 XML builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Deps = tuple[Any, ...]


class XmlCache:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, int, str], tuple[Any, Deps, str]] = {}

    def body(self, kind: str, obj: Any, variant: str, build: Callable[[Any], str], deps: Deps = ()) -> str:
        key = (kind, obj.id, variant)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is obj and _same(hit[1], deps):
            return hit[2]
        text = build(obj)
        self._entries[key] = (obj, deps, text)
        return text

    def pool(
        self,
        tag: str,
        kind: str,
        objects: Iterable[Any],
        variant: str,
        build: Callable[[Any], str],
        deps: Callable[[Any], Deps] | None = None,
    ) -> str:
        bodies = (self.body(kind, obj, variant, build, deps(obj) if deps else ()) for obj in objects)
        return "".join((f"<{tag}>", *bodies, f"</{tag}>"))

    def forget(self, kind: str, obj_id: int, obj: Any | None) -> None:
        """A state listener: drop the renderings of deleted objects."""
        if obj is None:
            for key in [k for k in self._entries if k[0] == kind and k[1] == obj_id]:
                del self._entries[key]


def _same(old: Deps, new: Deps) -> bool:
    """Objects by identity (replaced, never changed in place); strings (messages) by value."""
    return len(old) == len(new) and all(
        a == b if isinstance(a, str) else a is b for a, b in zip(old, new, strict=True)
    )
