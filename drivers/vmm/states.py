"""Domain states as vmsched reports them, mapped from libvirt's state and lifecycle-event numbers (pure).

The names follow what OpenNebula's monitoring reports for a KVM guest (running, paused, shutoff, ...);
``blocked`` (running but waiting on a resource) counts as running, as OpenNebula counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import libvirt


class DomainState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # the guest is shutting down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    UNDEFINED = "undefined"  # only from events: the domain no longer exists on the host
    UNKNOWN = "unknown"


_FROM_STATE = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}

_FROM_EVENT = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: DomainState.PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: DomainState.UNDEFINED,
}


def state_from_libvirt(state: int) -> DomainState:
    """The state of ``virDomain.state()[0]``."""
    return _FROM_STATE.get(state, DomainState.UNKNOWN)


def state_from_event(event: int) -> DomainState | None:
    """The state a lifecycle event moves the domain to; None for events that change no state (DEFINED)."""
    return _FROM_EVENT.get(event)


@dataclass(frozen=True)
class StateChange:
    """What a lifecycle event tells the scheduler: on ``host``, domain ``uuid`` (``name``) is now ``state``."""

    host: str
    uuid: str
    name: str
    state: DomainState


@dataclass(frozen=True)
class DomainInfo:
    """One domain of a host, as listed for monitoring and import."""

    name: str
    uuid: str
    state: DomainState
