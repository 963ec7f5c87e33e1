"""Large fetches take turns: a few run at once, the rest wait in arrival order, within their deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline_runner.data_plane.errors import DataPlaneError
from pipeline_runner.data_plane.fetch_gate import FetchGate


async def test_no_more_than_parallel_large_fetches_run_at_once_and_they_start_in_arrival_order() -> None:
    gate = FetchGate(parallel=2, min_bytes=1000)
    running, most, started = 0, 0, []

    async def fetch(i: int) -> None:
        nonlocal running, most
        async with gate.turn(4000, time.monotonic() + 5, f"t{i}"):
            started.append(i)
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)
            running -= 1

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(fetch(i)))
        await asyncio.sleep(0)  # arrival order is creation order
    await asyncio.gather(*tasks)
    assert most == 2
    assert started == list(range(8))
    assert gate.waited == 6


async def test_small_fetches_never_wait_for_a_turn() -> None:
    gate = FetchGate(parallel=1, min_bytes=1000)
    async with gate.turn(5000, time.monotonic() + 5, "big"):
        async with asyncio.timeout(1):
            async with gate.turn(999, time.monotonic() + 5, "small"):
                pass
    assert gate.waited == 0


async def test_a_fetch_that_waits_past_its_deadline_fails_and_frees_nothing_it_did_not_take() -> None:
    gate = FetchGate(parallel=1, min_bytes=1)
    async with gate.turn(10, time.monotonic() + 5, "first"):
        with pytest.raises(DataPlaneError, match="'late'.*timed out waiting for its turn"):
            async with gate.turn(10, time.monotonic() + 0.05, "'late'"):
                pytest.fail("the late fetch must not get a turn")
    # The slot the first fetch held is free again, and only that one.
    async with asyncio.timeout(1):
        async with gate.turn(10, time.monotonic() + 5, "next"):
            with pytest.raises(DataPlaneError):
                async with gate.turn(10, time.monotonic() + 0.01, "'again'"):
                    pass


async def test_a_cancelled_waiter_gives_its_place_to_the_next() -> None:
    gate = FetchGate(parallel=1, min_bytes=1)
    order: list[str] = []

    async def fetch(name: str) -> None:
        async with gate.turn(10, time.monotonic() + 5, name):
            order.append(name)
            await asyncio.sleep(0.02)

    first = asyncio.create_task(fetch("first"))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(fetch("cancelled"))
    third = asyncio.create_task(fetch("third"))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(first, third)
    assert order == ["first", "third"]


def test_a_gate_needs_at_least_one_slot() -> None:
    with pytest.raises(ValueError):
        FetchGate(parallel=0)
