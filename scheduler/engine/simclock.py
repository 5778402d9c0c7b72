"""Virtual time for simulations and tests: an asyncio loop whose clock jumps instead of waiting.

The loop's ``time()`` is virtual. When nothing is ready to run, instead of sleeping until the next
timer it moves its clock to that timer at once, so ``asyncio.sleep``, timeouts and the engine's own
wake-ups all run in virtual time through the same code as production. Real I/O still happens: the
loop polls its selector without blocking before every jump, and while ``busy()`` says outside work is
in flight (a store transaction on the database thread) it waits for it for real instead of jumping,
so virtual time never runs ahead of a pending commit. ``idle()`` lets a test wait until everything
that can happen without the clock moving has happened.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Any

_REAL_WAIT = 0.05  # seconds to wait for real I/O while busy


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, busy: Callable[[], bool] = lambda: False) -> None:
        super().__init__(selectors.DefaultSelector())
        self._virtual_now = 0.0
        self.busy = busy
        self._idle_waiters: list[asyncio.Future[None]] = []
        selector = self._selector  # type: ignore[attr-defined]
        self._real_select: Callable[[float | None], list[Any]] = selector.select
        selector.select = self._select

    def time(self) -> float:
        return self._virtual_now

    def idle(self) -> asyncio.Future[None]:
        """Done the next time nothing is ready to run and nothing outside is in flight: the moment
        the clock would otherwise jump (it does not jump for this wake-up)."""
        waiter: asyncio.Future[None] = self.create_future()
        self._idle_waiters.append(waiter)
        return waiter

    def _select(self, timeout: float | None = None) -> list[Any]:
        if timeout == 0:
            return self._real_select(0)
        if self._idle_waiters and not self.busy():
            events = self._real_select(0)
            if not events:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            return events
        if self.busy() or timeout is None:
            return self._real_select(_REAL_WAIT if timeout is None else min(timeout, _REAL_WAIT))
        # Nothing outside is in flight: jump. (Anything else that arrives, such as a signal, stays
        # queued in the selector and is seen at the next poll.)
        self._virtual_now += timeout
        return []


class VirtualClock:
    """The engine's Clock over a VirtualTimeLoop: epoch seconds = start + the loop's virtual time."""

    def __init__(self, loop: VirtualTimeLoop, start_epoch: float) -> None:
        self.loop = loop
        self.start_epoch = start_epoch

    def now(self) -> float:
        return self.start_epoch + self.loop.time()
