"""Delivery guarantee: a request whose worker dies is answered by another worker, or ends in a
clear ``worker_lost`` error; never lost, never answered twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline_runner import Connection, OperatorError, RequestTimeoutError, WorkerStartError
from pipeline_runner.nats_server import NatsServer

from .conftest import connected, make_config, op, running

FAST = {"redeliver_after_s": 1.0}


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_requests_held_by_a_killed_worker_are_answered_by_another(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", workers=2, max_inflight_requests=4, delivery=FAST))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")
        calls = [
            asyncio.create_task(echo.infer({"x": np.array([i])}, parameters={"sleep": 1.5}, timeout_s=20))
            for i in range(8)
        ]
        await asyncio.sleep(0.5)  # all 8 are running, 4 on each worker
        victim = deployment.workers[0]
        await victim.kill()
        started = time.monotonic()
        responses = await asyncio.gather(*calls)
        assert [list(await r.array("x")) for r in responses] == [[i] for i in range(8)]
        attempts = Counter(r.attempt for r in responses)
        assert attempts == {1: 4, 2: 4}, attempts
        # The redelivered ones were answered by the survivor or the restarted worker.
        assert all(r.worker is not None for r in responses if r.attempt == 2)
        assert time.monotonic() - started < 10  # redelivered well before the 20 s deadline
        await _wait_for(lambda: victim.restarts == 1)


async def test_a_non_idempotent_operator_answers_worker_lost_instead_of_running_twice(
    nats_url: str, tmp_path: Path
) -> None:
    config = make_config(op("crash", "echo:Crash", delivery={**FAST, "idempotent": False}))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        marker = tmp_path / "crashed-once"
        with pytest.raises(OperatorError) as caught:
            await conn.operator("crash").infer(parameters={"mode": "before", "once": str(marker)}, timeout_s=20)
        assert caught.value.code == "worker_lost"
        assert "not idempotent" in caught.value.message
        assert marker.exists()  # it did run once, and its worker died
        await _wait_for(lambda: deployment.workers[0].restarts == 1)
        # A fresh request runs normally (the marker now exists, so no crash).
        response = await conn.operator("crash").infer(parameters={"mode": "before", "once": str(marker)})
        assert response.attempt == 1


async def test_a_request_that_kills_every_worker_gives_up_after_max_attempts(nats_url: str) -> None:
    config = make_config(op("crash", "echo:Crash", workers=2, delivery={**FAST, "max_attempts": 2}))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        with pytest.raises(OperatorError) as caught:
            await conn.operator("crash").infer(parameters={"mode": "before"}, timeout_s=30)
        assert caught.value.code == "worker_lost"
        assert "2 earlier attempts" in caught.value.message and "max_attempts: 2" in caught.value.message
        await _wait_for(lambda: sum(w.restarts for w in deployment.workers) == 2)


async def test_a_second_final_answer_after_redelivery_never_reaches_the_caller(
    nats_url: str, tmp_path: Path
) -> None:
    # The worker answers, then dies before acknowledging: JetStream delivers the request again
    # and a second worker answers it too. The caller sees one final response; the other is dropped.
    config = make_config(op("crash", "echo:Crash", workers=2, delivery=FAST))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        marker = tmp_path / "crashed-once"
        responses = [
            r async for r in conn.operator("crash").call(parameters={"mode": "after", "once": str(marker)}, timeout_s=20)
        ]
        assert [(r.final, r.attempt) for r in responses] == [(True, 1)]
        await _wait_for(lambda: conn.plane.late_responses == 1)
        await asyncio.sleep(0.5)
        assert conn.plane.late_responses == 1


async def test_a_stream_whose_worker_dies_midway_ends_in_worker_lost_without_repeats(
    nats_url: str, tmp_path: Path
) -> None:
    config = make_config(op("crash", "echo:Crash", workers=2, delivery=FAST))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        marker = tmp_path / "crashed-once"
        received = []
        with pytest.raises(OperatorError) as caught:
            async for response in conn.operator("crash").call(
                parameters={"mode": "mid_stream", "once": str(marker)}, timeout_s=20
            ):
                received.append(int((await response.array("index"))[0]))
        assert received == [0]  # the partial sent before the crash, and nothing repeated
        assert caught.value.code == "worker_lost"
        assert "after 1 of them" in caught.value.message


async def test_at_most_once_delivery_ends_a_request_whose_worker_died_in_a_timeout(nats_url: str) -> None:
    config = make_config(op("crash", "echo:Crash", delivery={"mode": "at_most_once"}))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            await conn.operator("crash").infer(parameters={"mode": "before"}, timeout_s=2)
        assert type(caught.value).__name__ == "RequestTimeoutError"
        assert 1.9 < time.monotonic() - started < 4
        await _wait_for(lambda: deployment.workers[0].restarts == 1)


async def test_requests_wait_in_the_queue_while_no_worker_runs_and_keep_their_deadline(
    nats_url: str,
) -> None:
    config = make_config(op("echo", "echo:Echo", delivery=FAST))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")
        worker = deployment.workers[0]
        await worker.kill()  # restarted by the deployment after a short backoff
        started = time.monotonic()
        response = await echo.infer({"x": np.array([3])}, timeout_s=20)
        assert list(await response.array("x")) == [3]
        assert response.attempt == 1
        await _wait_for(lambda: worker.restarts == 1)
        # A request whose deadline passes while it waits is dropped, not run late.
        await worker.kill()
        with pytest.raises(Exception) as caught:
            await echo.infer({"x": np.array([4])}, timeout_s=0.05)
        assert type(caught.value).__name__ == "RequestTimeoutError"
        await _wait_for(lambda: worker.restarts == 2)
        response = await echo.infer({"x": np.array([5])}, timeout_s=20)
        assert list(await response.array("x")) == [5]
        [stats] = await conn.worker_stats(expected=1)
        assert stats["served"] == 1  # only the last request ran on the restarted worker
        assert time.monotonic() - started < 20


async def test_a_request_left_in_the_queue_of_a_stopped_deployment_times_out_saying_so(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url):
        pass  # the work queue stays on the NATS server after the deployment stops
    async with await Connection.connect(nats_url, "test") as conn:
        with pytest.raises(RequestTimeoutError, match="work queue took the request; no worker has answered it"):
            await conn.operator("echo").infer({"x": np.array([1])}, timeout_s=0.5)


async def test_at_least_once_on_a_server_without_jetstream_fails_the_deploy_with_the_fix(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", jetstream=False)
    url = await server.start()
    try:
        with pytest.raises(WorkerStartError) as caught:
            async with running(make_config(op("echo", "echo:Echo")), url):
                pass
        message = str(caught.value)
        assert "has no JetStream" in message and "at_most_once" in message
        # The same operator without the guarantee runs there.
        async with running(make_config(op("echo", "echo:Echo", delivery={"mode": "at_most_once"})), url) as d:
            async with connected(d) as conn:
                response = await conn.operator("echo").infer({"x": np.array([2])})
                assert list(await response.array("x")) == [2]
    finally:
        await server.stop()
