"""A request that ends closes the downstream calls its operator left open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from .conftest import connected, make_config, op, running


async def _recorded_cancel(path: Path, timeout_s: float) -> float:
    """When the ticker at the end of the chain saw its cancel (time.time()); fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"the downstream call was not cancelled within {timeout_s} s"
        await asyncio.sleep(0.05)  # not time.sleep: the caller's cancel is still to be flushed
    return float(path.read_text())


async def test_a_cancelled_relay_without_aclosing_cancels_its_downstream_call_at_once(
    nats_url: str, tmp_path: Path
) -> None:
    config = make_config(
        op("relay", "careless_relay:CarelessRelay", parameters={"next": "ticker", "pause": 0.5}),
        op("ticker", "http_ops:Ticker"),
    )
    record = tmp_path / "cancelled_at"
    # The ticker would stream for 50 s, well past the 1 s the assertion allows.
    params = {"count": 1000, "interval": 0.05, "record": str(record)}
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=60) as conn:
        stream = conn.operator("relay").call(parameters=params)
        async with contextlib.aclosing(stream):
            async for _ in stream:
                break  # the caller leaves after the first response, while the relay pauses
        left_at = time.time()
        assert await _recorded_cancel(record, timeout_s=5) - left_at < 1.0
        # The relay keeps serving.
        answers = [r async for r in conn.operator("relay").call(parameters={"count": 1})]
        assert answers[-1].final
