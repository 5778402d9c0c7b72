"""Snapshot actions: system snapshots (``name`` / ``snap_id``) and disk snapshots
(``disk_id,name`` / ``disk_id,snap_id``). They need the libvirt driver to run."""

from __future__ import annotations

from collections.abc import Callable

from scheduler.actions.base import ActionSpec, ArgsCheck, int_token, malformed, needs_libvirt, split_args

Token = Callable[[str], bool]


def _name(token: str) -> bool:
    return bool(token)


def _id(token: str) -> bool:
    value = int_token(token)
    return value is not None and value >= 0


# name -> (ARGS format, one check per token)
FORMATS: dict[str, tuple[str, tuple[Token, ...]]] = {
    "snapshot-create": ("name", (_name,)),
    "snapshot-revert": ("snap_id", (_id,)),
    "snapshot-delete": ("snap_id", (_id,)),
    "disk-snapshot-create": ("disk_id,name", (_id, _name)),
    "disk-snapshot-revert": ("disk_id,snap_id", (_id, _id)),
    "disk-snapshot-delete": ("disk_id,snap_id", (_id, _id)),
}


def _validator(name: str, args_format: str, tokens: tuple[Token, ...]) -> ArgsCheck:
    def validate(args: str) -> None:
        given = split_args(args)
        if len(given) != len(tokens) or not all(ok(token) for ok, token in zip(tokens, given, strict=True)):
            raise malformed(name, args_format)

    return validate


SPECS = tuple(
    ActionSpec(name, "snapshot", False, _validator(name, fmt, tokens), needs_libvirt(name), args_format=fmt)
    for name, (fmt, tokens) in FORMATS.items()
)
