"""The NATS server restarting under load, with the work queues on file storage.

hello_world (encoder -> decoder behind encoder_decoder) with ``delivery.storage: file`` takes a
steady load while its nats-server is stopped (SIGTERM, then SIGKILL) and started again on the
same port and store. Requests waiting in the work queues survive in the store, callers and
workers reconnect on their own, and every request ends with its one correct answer: none lost,
none failed, none timed out.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline_runner import RunnerError
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.nats_server import NatsServer

from .conftest import REPO_ROOT, connected, free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LANES = 32
TIMEOUT_S = 30.0


def _file_stored_hello_world():
    config = load_deployment(REPO_ROOT / "deployments" / "hello_world_python.yaml")
    operators = [
        op.model_copy(update={"delivery": op.delivery.model_copy(update={"storage": "file"})})
        for op in config.operators
    ]
    return config.model_copy(update={"operators": operators})


async def test_nats_restarts_under_load_with_file_storage_answer_every_request_once(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "nats"
    server = NatsServer(store, port=port)
    url = await server.start()
    config = _file_stored_hello_world()
    try:
        async with running(config, url) as deployment, connected(deployment, timeout_s=TIMEOUT_S) as conn:
            pipeline = conn.operator("encoder_decoder")
            outcomes: Counter[str] = Counter()
            answers: Counter[int] = Counter()  # request number -> correct answers received
            errors: Counter[str] = Counter()
            slowest = 0.0
            stop = asyncio.Event()
            numbers = iter(range(1_000_000))

            async def lane() -> None:
                nonlocal slowest
                while not stop.is_set():
                    number = next(numbers)
                    # Distinct inputs: an answer meant for another request would not match.
                    sent = np.arange(number, number + 256, dtype=np.int32)
                    started = time.monotonic()
                    try:
                        response = await pipeline.infer({"input": sent}, timeout_s=TIMEOUT_S)
                        got = await response.array("output")
                        response.release()
                    except RunnerError as exc:
                        outcomes[type(exc).__name__] += 1
                        errors[str(exc)[:200]] += 1
                    else:
                        outcomes["ok" if np.array_equal(got, sent) else "wrong"] += 1
                        answers[number] += 1
                    slowest = max(slowest, time.monotonic() - started)

            async def served_more(count: int, within_s: float) -> None:
                target = outcomes["ok"] + count
                deadline = time.monotonic() + within_s
                while outcomes["ok"] < target:
                    assert time.monotonic() < deadline, f"serving did not resume: {outcomes} {errors}"
                    await asyncio.sleep(0.05)

            lanes = [asyncio.create_task(lane()) for _ in range(LANES)]
            restarts: list[str] = []
            try:
                await served_more(200, within_s=20)
                for how in (signal.SIGTERM, signal.SIGKILL):
                    # Requests are in flight at every hop and waiting in every queue right now.
                    if how == signal.SIGTERM:
                        await server.stop()
                    else:
                        server.kill()
                    restarts.append(how.name)
                    await asyncio.sleep(1.0)  # callers publish into a dead connection meanwhile
                    server = NatsServer(store, port=port)
                    await server.start()
                    await served_more(300, within_s=25)
            finally:
                stop.set()
                await asyncio.gather(*lanes)
            stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=5)
            resent, duplicates_dropped = conn.plane.resent_requests, conn.plane.late_responses
            assert all(w.restarts == 0 for w in deployment.workers), "a worker died instead of reconnecting"
    finally:
        await server.stop()

    requests = sum(outcomes.values())
    # Every request ended with the right answer, exactly once: none lost, failed or timed out.
    assert outcomes == Counter(ok=requests), (outcomes, errors)
    assert len(answers) == requests and set(answers.values()) == {1}
    assert slowest < TIMEOUT_S
    # Every worker is back on the server (each answered the stats call).
    assert len(stats) == len(deployment.workers)
    executed = sum(s["served"] for s in stats if s["worker"].startswith("encoder_decoder"))
    print(f"\nnats restarts ({', '.join(restarts)}) under {LANES} in flight: {requests} requests, "
          f"{requests} answered once, 0 lost, 0 failed; caller resent {resent}, dropped "
          f"{duplicates_dropped} duplicate answers; encoder_decoder ran {executed} times; "
          f"slowest {slowest:.1f} s")
