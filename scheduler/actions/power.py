"""Power actions (poweroff, reboot, suspend, ...): no ARGS. They need the libvirt driver to run."""

from __future__ import annotations

from scheduler.actions.base import ActionSpec, ArgsCheck, malformed, needs_libvirt

NAMES = ("poweroff", "poweroff-hard", "reboot", "reboot-hard", "suspend", "resume")


def _validator(name: str) -> ArgsCheck:
    def validate(args: str) -> None:
        if args.strip():
            raise malformed(name, "")

    return validate


SPECS = tuple(ActionSpec(name, "power", False, _validator(name), needs_libvirt(name)) for name in NAMES)
