"""Shared timing loop of the benchmarks: N calls with C in flight, latency percentiles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np


async def timed(call: Callable[[], Awaitable[object]], requests: int, concurrency: int) -> dict[str, float]:
    """Run ``call`` ``requests`` times with ``concurrency`` in flight; req/s and p50/p90/p99 in ms."""
    latencies: list[float] = []
    remaining = iter(range(requests))

    async def lane() -> None:
        for _ in remaining:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
