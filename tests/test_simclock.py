"""The virtual-time loop: the clock jumps only when nothing is ready; ``idle()`` fires before a jump."""

from __future__ import annotations

import asyncio

from scheduler.engine.simclock import VirtualTimeLoop
from tests.engine_harness import run_virtual


def test_sleep_jumps_the_clock_without_waiting() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        return loop.time()

    assert run_virtual(scenario) == 3600


def test_idle_waits_for_every_chain_of_ready_work_and_does_not_move_the_clock() -> None:
    async def scenario() -> tuple[list[int], float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        done: list[int] = []

        async def hops(n: int) -> None:
            for _ in range(n):  # far more hops than any fixed number of yields would cover
                await asyncio.sleep(0)
            done.append(n)

        async def later() -> None:
            await asyncio.sleep(60)
            done.append(-1)

        tasks = [asyncio.create_task(hops(500)), asyncio.create_task(later())]
        await loop.idle()
        seen, at = list(done), loop.time()
        await asyncio.gather(*tasks)
        return seen, at

    seen, at = run_virtual(scenario)
    assert seen == [500]
    assert at == 0
