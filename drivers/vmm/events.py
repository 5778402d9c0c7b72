"""libvirt's event loop for the whole process, and delivery of lifecycle events to asyncio.

libvirt dispatches domain events (and connection keepalives) only through an event-loop implementation
registered once per process, before any connection is opened. vmsched registers libvirt's own default
implementation and runs it in one daemon thread (``vmm-events``); each event is handed to the asyncio loop
of its subscriber with ``call_soon_threadsafe``.

Why not libvirtaio: it binds libvirt to ONE asyncio loop and calls that loop's non-thread-safe methods
(``add_reader``, ``ensure_future``) from whichever thread runs a libvirt call. vmsched runs every
blocking libvirt call in a per-host worker thread, so those calls would come from the wrong thread;
and a process whose loop changes (tests, a restarted service loop) would keep a dead loop bound.
The default implementation is thread-safe and independent of asyncio.

Rule for the rest of the process: nothing else may register a libvirt event implementation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import libvirt

from drivers.vmm.states import StateChange, state_from_event

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None

StateCallback = Callable[[StateChange], None]


def _run_forever() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:  # pragma: no cover - libvirt's loop failing is fatal for events
            log.error("libvirt event loop failed; domain events stop, polling still works")
            return


def ensure_event_thread() -> None:
    """Register libvirt's default event loop and start its thread, once per process (idempotent)."""
    global _thread
    with _lock:
        if _thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _thread = threading.Thread(target=_run_forever, name="vmm-events", daemon=True)
        _thread.start()


def lifecycle_handler(host: str, loop: asyncio.AbstractEventLoop,
                      callback: StateCallback) -> Callable[..., None]:
    """A ``VIR_DOMAIN_EVENT_ID_LIFECYCLE`` callback that hands a StateChange to ``callback`` on ``loop``.

    It runs on the event thread and makes no RPC (a domain's name and UUID are known locally).
    """

    def handle(_conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, _detail: int, _opaque: object) -> None:
        state = state_from_event(event)
        if state is None:
            return
        change = StateChange(host=host, uuid=dom.UUIDString(), name=dom.name(), state=state)
        try:
            loop.call_soon_threadsafe(callback, change)
        except RuntimeError:  # the subscriber's loop is closed: nobody listens any more
            log.debug("%s: dropped event %s for %s: loop closed", host, state, change.name)

    return handle
