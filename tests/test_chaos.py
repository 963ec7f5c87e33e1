"""Chaos: hello_world under load while encoder and decoder workers are SIGKILLed every second."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from pipeline_runner.client import make_inputs, run_load_test
from pipeline_runner.config_loader import load_deployment

from .conftest import REPO_ROOT, connected, running

pytestmark = pytest.mark.slow


async def test_5000_requests_while_a_worker_is_killed_every_second_all_end_correct_once() -> None:
    config = load_deployment(REPO_ROOT / "deployments" / "hello_world_python.yaml")
    async with running(config) as deployment, connected(deployment, timeout_s=60) as conn:
        victims = [w for w in deployment.workers if w.spec.operator.name in ("encoder", "decoder")]
        rng = random.Random(5)
        kills = 0
        finished: list[bool] = []

        async def killer() -> None:
            nonlocal kills
            while True:
                await asyncio.sleep(1.0)
                serving = [w for w in victims if w.ready]
                if not serving:
                    continue
                await rng.choice(serving).kill()
                kills += 1

        chaos = asyncio.create_task(killer())
        try:
            result = await run_load_test(
                conn.operator("encoder_decoder"),
                requests=5000,
                concurrency=32,
                inputs=make_inputs(1024, "int32", 64),
                on_done=finished.append,
            )
        finally:
            chaos.cancel()
        # Every request ended exactly once, with the right answer: none lost, none failed.
        assert len(finished) == 5000
        assert (result.ok, result.failed, result.timed_out) == (5000, 0, 0), result.errors
        assert kills >= 3, "the run ended before the chaos had a chance"
        # Every killed worker was restarted by the deployment.
        deadline = time.monotonic() + 30
        while sum(w.restarts for w in victims) < kills or not all(w.ready for w in victims):
            assert time.monotonic() < deadline, [(w.name, w.restarts) for w in victims]
            await asyncio.sleep(0.1)
        assert sum(w.restarts for w in victims) == kills
        stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=5)
        redelivered = sum(s["redelivered"] for s in stats)
        print(f"\nchaos: {kills} kills, {redelivered} redeliveries seen by live workers, "
              f"{result.duration_s:.1f} s, p99 {result.percentile_ms(99):.0f} ms")
