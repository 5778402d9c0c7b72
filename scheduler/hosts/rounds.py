"""The loop the host and the datastore monitors share: a round of probes every interval (read from the
configuration each time, so a reload applies at once), and work between rounds when an object changes.

A subclass says what a round starts (:meth:`RoundMonitor.start_round`), what to do when woken
(:meth:`RoundMonitor.between`), and which state changes concern it (:meth:`RoundMonitor.on_change`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from scheduler.hosts.links import Daemon


class RoundMonitor:
    def __init__(self, ctx: Daemon) -> None:
        self.ctx = ctx
        self._wake = asyncio.Event()

    @property
    def interval(self) -> float:
        raise NotImplementedError

    def start_round(self) -> None:
        """A round is due: queue or start a probe of every watched object."""
        raise NotImplementedError

    async def between(self) -> bool:
        """After a round or a wake-up: run what is queued; True when more was queued meanwhile."""
        return False

    def on_change(self, kind: str, obj_id: int, obj: Any | None) -> None:
        """An object of the state changed (``obj`` None: removed)."""

    async def stopped(self) -> None:
        """The monitor was cancelled: stop what it started."""

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self) -> None:
        """The configuration was reloaded: take the new interval into account now."""
        self.wake()

    async def run(self) -> None:
        """Monitor until cancelled."""
        loop = asyncio.get_running_loop()
        self.ctx.state.listeners.append(self.on_change)
        last_round = float("-inf")
        try:
            while True:
                if loop.time() >= last_round + self.interval:
                    last_round = loop.time()
                    self.start_round()
                more = await self.between()
                self._wake.clear()
                if more:
                    continue
                try:
                    async with asyncio.timeout_at(last_round + self.interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            self.ctx.state.listeners.remove(self.on_change)
            await self.stopped()


__all__ = ["RoundMonitor"]
