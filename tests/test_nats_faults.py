"""NATS going away and coming back: nothing hangs, workers and clients reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline_runner import RunnerError
from pipeline_runner.nats_server import NatsServer
from pipeline_runner.request_plane import RequestPlane

from .conftest import connected, free_port, make_config, op, running



async def test_a_nats_restart_mid_run_ends_every_request_and_serving_resumes(tmp_path: Path) -> None:
    port = free_port()
    server = NatsServer(tmp_path / "nats", port=port)
    url = await server.start()
    config = make_config(op("echo", "echo:Echo", workers=2))
    try:
        async with running(config, url) as deployment, connected(deployment) as conn:
            echo = conn.operator("echo")
            outcomes: Counter[str] = Counter()
            stop = asyncio.Event()

            async def load() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    started = time.monotonic()
                    try:
                        response = await echo.infer({"x": np.array([i])}, parameters={"sleep": 0.01}, timeout_s=3)
                        assert list(await response.array("x")) == [i]
                        outcomes["ok"] += 1
                    except RunnerError as exc:
                        outcomes[type(exc).__name__] += 1
                    assert time.monotonic() - started < 4, "a request outlived its deadline"

            lanes = [asyncio.create_task(load()) for _ in range(4)]
            await asyncio.sleep(1.0)
            before = outcomes["ok"]
            server.kill()  # SIGKILL mid-run
            await asyncio.sleep(1.0)
            server = NatsServer(tmp_path / "nats", port=port)
            await server.start()
            # Clients and workers reconnect on their own; requests succeed again.
            deadline = time.monotonic() + 20
            while outcomes["ok"] < before + 50:
                assert time.monotonic() < deadline, f"serving did not resume: {outcomes}"
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*lanes)
            assert all(w.restarts == 0 for w in deployment.workers)
    finally:
        await server.stop()
    assert outcomes["ok"] > before + 50
    assert set(outcomes) <= {"ok", "RequestTimeoutError"}, outcomes


async def test_a_server_that_stalls_past_a_round_trip_timeout_leaves_the_connection_receiving(tmp_path: Path) -> None:
    # A stalled server (a host whose link is cut for seconds) answers PINGs late. nats-py ends
    # its read loop when the PONG of a flush it already gave up on arrives; the connection then
    # hears nothing more and never reconnects. Found by tests/test_partitions.py.
    server = NatsServer(tmp_path / "nats")
    url = await server.start()
    plane = await RequestPlane.connect(url, name="stall-test")
    try:
        async def answer(msg) -> None:
            await plane.nats.publish(msg.reply, b"pong")

        await plane.nats.subscribe("ping", cb=answer)
        # A final response in the journal: the plane confirms it by a round trip every 0.5 s,
        # waiting 2 s for each.
        await plane.publish_response("nobody.listens", b"final", final=True)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        reply = await plane.nats.request("ping", b"", timeout=3)
        assert reply.data == b"pong"
        assert plane.nats.stats["reconnects"] == 0
    finally:
        await plane.close()
        await server.stop()

