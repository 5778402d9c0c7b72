"""Power actions (poweroff, reboot, suspend, ...): no ARGS; run on the VM's domain through libvirt.

Every run first locates the domain (``scheduler.hosts.placement``: a domain moved to another registered host
is followed), checks that the domain is in a state the action applies to, asks libvirt once (never
retried here: power actions run at most once), then sets the VM's STATE/LCM_STATE from the state the
domain is in afterwards.

``poweroff`` is the ACPI power button: the guest decides. The run waits for the domain to be off for
the host's ``SHUTDOWN_TIMEOUT`` (host TEMPLATE, seconds, default 300 as OpenNebula's kvmrc) and fails
when the guest ignored the request (a guest without an OS always does): use ``poweroff-hard`` then.
``reboot`` is an ACPI request too; success means libvirt accepted it. ``suspend`` pauses the guest in
memory; ``resume`` continues a paused guest or boots a powered-off one (as OpenNebula's resume does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from drivers.vmm import DomainState, KvmHost
from scheduler.actions.base import ActionSpec, ArgsCheck, RunContext, malformed
from scheduler.errors import ActionError
from scheduler.hosts.placement import Placement, locate_for_run, sync_state

NAMES = ("poweroff", "poweroff-hard", "reboot", "reboot-hard", "suspend", "resume")
DEFAULT_SHUTDOWN_TIMEOUT = 300.0
POLL_INTERVAL = 0.5  # seconds between state checks while a guest shuts down

_ON = (DomainState.RUNNING,)
_PAUSED = (DomainState.PAUSED, DomainState.PMSUSPENDED)
_ALIVE = (DomainState.RUNNING, DomainState.PAUSED, DomainState.PMSUSPENDED, DomainState.SHUTDOWN,
          DomainState.CRASHED)


@dataclass(frozen=True)
class PowerOp:
    """Which domain states an action applies to, and the libvirt call it makes."""

    states: tuple[DomainState, ...]
    call: Callable[[KvmHost, str], Awaitable[None]]
    done: str  # past tense, for the run's message


OPS: dict[str, PowerOp] = {
    "poweroff": PowerOp(_ON, KvmHost.shutdown, "powered off (ACPI)"),
    "poweroff-hard": PowerOp(_ALIVE, KvmHost.destroy, "powered off (hard)"),
    "reboot": PowerOp(_ON, KvmHost.reboot, "asked to reboot (ACPI)"),
    "reboot-hard": PowerOp(_ON + _PAUSED, KvmHost.reset, "reset"),
    "suspend": PowerOp(_ON, KvmHost.suspend, "suspended"),
    "resume": PowerOp((DomainState.PAUSED, DomainState.SHUTOFF), KvmHost.resume, "resumed"),
}


def shutdown_timeout(where: Placement) -> float:
    raw = (where.host.template.get("SHUTDOWN_TIMEOUT") or "").strip()
    try:
        value = float(raw) if raw else DEFAULT_SHUTDOWN_TIMEOUT
    except ValueError:
        raise ActionError(f"host {where.host.name}: SHUTDOWN_TIMEOUT {raw!r} is not a number of seconds") from None
    return max(value, 0.0)


async def _wait_until_off(where: Placement, vm_id: int) -> None:
    limit = shutdown_timeout(where)
    try:
        async with asyncio.timeout(limit):
            while True:  # polled: the lifecycle events of a host belong to its monitor
                if await where.kvm.state(where.ref) == DomainState.SHUTOFF:
                    return
                await asyncio.sleep(min(POLL_INTERVAL, limit / 10 or POLL_INTERVAL))
    except TimeoutError:
        raise ActionError(
            f"VM {vm_id}: the guest did not power off within {limit:g} s of the ACPI shutdown request "
            f"(on {where.host.name}; a guest without an OS listening to ACPI ignores it): use poweroff-hard"
        ) from None


async def _perform(name: str, where: Placement, vm_id: int) -> None:
    op = OPS[name]
    state = where.domain.state
    if state not in op.states:
        wanted = ", ".join(s.value for s in op.states)
        raise ActionError(f"VM {vm_id}: {name} needs the domain {wanted}; it is {state.value} on {where.host.name}")
    if name == "resume" and state == DomainState.SHUTOFF:
        await where.kvm.start(where.ref)
    else:
        await op.call(where.kvm, where.ref)
    if name == "poweroff":
        await _wait_until_off(where, vm_id)


def _runner(name: str) -> Callable[[RunContext], Awaitable[str | None]]:
    async def run(ctx: RunContext) -> str | None:
        where = await locate_for_run(ctx)
        try:
            await _perform(name, where, ctx.vm.id)
        finally:
            now = await sync_state(ctx, where)
        return f"domain {where.domain.name} on {where.host.name} {OPS[name].done}; VM is {now}"

    return run


def _validator(name: str) -> ArgsCheck:
    def validate(args: str) -> None:
        if args.strip():
            raise malformed(name, "")

    return validate


SPECS = tuple(ActionSpec(name, "power", False, _validator(name), _runner(name)) for name in NAMES)
