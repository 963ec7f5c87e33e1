"""Dynamic batching with real processes: nats-server, worker processes, the library as caller.

The operators report the batch each request ran in, so the tests see batches form, wait no
longer than ``max_wait_ms`` (nor past a request's deadline), share one error, and lose one
cancelled member without the others.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import pytest

from pipeline_runner import DeploymentConfig, OperatorError

from .conftest import REPO_ROOT, connected, make_config, op, running

pytestmark = pytest.mark.timeout(120)


def batching(max_batch_size: int, max_wait_ms: float) -> dict[str, Any]:
    return {"batching": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}}


def batches(**fields: Any) -> DeploymentConfig:
    return make_config(op("batches", "batching:Batches", **fields))


async def _worker_stats(conn: Any) -> dict[str, Any]:
    (stats,) = await conn.worker_stats(expected=1, timeout_s=2)
    return stats


async def test_the_batched_matmul_example_answers_each_request_from_a_shared_product(nats_url: str) -> None:
    config = DeploymentConfig.model_validate({
        "name": "matmul", "working_dir": str(REPO_ROOT),
        "operators": [{
            "name": "matmul", "implementation": "operators.batched_matmul.matmul:BatchedMatmul",
            "max_inflight_requests": 16, **batching(8, 200), "parameters": {"dim": 64, "seed": 3},
        }],
    })  # fmt: skip
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((64, 64), dtype=np.float32) / math.sqrt(64)
    xs = [np.random.default_rng(i).standard_normal(64, dtype=np.float32) for i in range(16)]
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        matmul = conn.operator("matmul")
        responses = await asyncio.gather(*(matmul.infer({"x": x}) for x in xs))
        for x, response in zip(xs, responses, strict=True):
            np.testing.assert_allclose(await response.array("y"), x @ weights, rtol=1e-4, atol=1e-5)
        sizes = [r.parameters["batch"] for r in responses]
        assert max(sizes) > 1 and max(sizes) <= 8
        with pytest.raises(OperatorError) as caught:
            await matmul.infer({"x": np.ones(3, np.float32)})
        assert caught.value.code == "bad_input" and "vector of 64" in caught.value.message
        (stats,) = await conn.worker_stats(expected=1, timeout_s=5)
        reported = stats["operator_stats"]["batch_sizes"]
        assert sum(int(size) * n for size, n in reported.items()) == 16
        assert stats["batches"] == sum(reported.values()) + 1  # and the bad request's own


async def test_a_worker_pulls_the_next_batch_from_its_work_queue_while_one_runs(nats_url: str) -> None:
    config = batches(max_inflight_requests=8, **batching(8, 1_000))  # at_least_once: it pulls
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        calls = [conn.operator("batches").infer(parameters={"sleep": 1.0}) for _ in range(24)]
        gathered = asyncio.gather(*calls)
        await asyncio.sleep(0.5)  # the first batch runs; the next is already here, not in NATS
        assert (await _worker_stats(conn))["unfinished"] == 16
        responses = await gathered
        assert sorted({r.parameters["batch"] for r in responses}) == [8]


async def test_a_lone_request_is_answered_once_max_wait_is_over(nats_url: str) -> None:
    async with running(batches(**batching(8, 300)), nats_url) as deployment, connected(deployment) as conn:
        started = time.monotonic()
        response = await conn.operator("batches").infer(timeout_s=10)
        waited = time.monotonic() - started
        assert response.parameters["batch"] == 1
        assert 0.3 <= waited < 5.0  # not before the batch closes, not held for good


async def test_a_request_whose_deadline_is_nearer_than_max_wait_is_answered_within_it(nats_url: str) -> None:
    async with running(batches(**batching(8, 5_000)), nats_url) as deployment, connected(deployment) as conn:
        started = time.monotonic()
        response = await conn.operator("batches").infer(timeout_s=1.5)
        assert response.parameters["batch"] == 1
        assert time.monotonic() - started < 1.5


async def test_an_error_in_a_batch_reaches_every_member(nats_url: str) -> None:
    async with running(batches(**batching(4, 5_000)), nats_url) as deployment, connected(deployment) as conn:
        calls = [conn.operator("batches").infer(parameters={"fail": i == 2}, timeout_s=10) for i in range(4)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, OperatorError) for o in outcomes), outcomes
        assert {o.code for o in outcomes} == {"operator_failed"}  # type: ignore[union-attr]
        assert all("asked to fail" in o.message for o in outcomes)  # type: ignore[union-attr]


async def test_cancelling_one_request_of_a_running_batch_leaves_the_others_answered(nats_url: str) -> None:
    async with running(batches(**batching(3, 5_000)), nats_url) as deployment, connected(deployment) as conn:
        batched = conn.operator("batches")
        calls = [asyncio.create_task(batched.infer(parameters={"sleep": 1.0}, timeout_s=20)) for _ in range(3)]
        await asyncio.sleep(0.5)  # the batch of 3 is running
        calls[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        answered = await asyncio.gather(*calls[1:])
        assert [r.parameters["batch"] for r in answered] == [3, 3]
        deadline = time.monotonic() + 5
        while (stats := await _worker_stats(conn))["cancelled"] != 1:
            assert time.monotonic() < deadline, stats
        assert stats["served"] == 3


async def test_cancelling_a_request_waiting_for_its_batch_frees_it_at_once(nats_url: str) -> None:
    async with running(batches(**batching(8, 30_000)), nats_url) as deployment, connected(deployment) as conn:
        call = asyncio.create_task(conn.operator("batches").infer(timeout_s=60))
        await asyncio.sleep(0.5)
        assert (await _worker_stats(conn))["unfinished"] == 1  # waiting for company
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        deadline = time.monotonic() + 5  # far below the 30 s wait
        while (stats := await _worker_stats(conn)) != {**stats, "unfinished": 0, "cancelled": 1}:
            assert time.monotonic() < deadline, stats
        assert stats["served"] == 0 and stats["batches"] == 0
