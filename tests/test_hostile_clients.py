"""Slow and vanishing clients (issue 17): whatever one caller does, the others are served.

hello_world_python runs for real (nats-server, six worker processes, UCX). A hostile caller
stops reading its socket, is SIGKILLed with requests in flight, or gives every request less
time than one hop takes. Meanwhile a well-behaved caller must get every answer right, and
afterwards nothing may be left behind: no request unfinished or running in any worker, no call
open, no tensor held in any data-plane store, no message in any JetStream work queue, and no
more asyncio tasks than before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

from pipeline_runner import Connection
from pipeline_runner.client import LoadTestResult, make_inputs, run_load_test
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.deployment import Deployment
from pipeline_runner.errors import RequestTimeoutError
from pipeline_runner.nats_server import NatsServer
from pipeline_runner.protocol import RequestHeader, encode_inline_tensors, encode_message
from pipeline_runner.request_plane import operator_subject

from .conftest import REPO_ROOT, connected, running

pytestmark = pytest.mark.slow

HELLO_WORLD_PYTHON = REPO_ROOT / "deployments" / "hello_world_python.yaml"
# Data-plane leases outlive a request's deadline by 5 s and are swept every 0.5 s.
LEASE_GRACE_S = 6.0
# Worker tasks that come and go while idle (a pull's expiry, a progress tick, the stats answer).
IDLE_TASK_JITTER = 3


# --- what must hold afterwards ---------------------------------------------------------------


async def _leftovers(conn: Connection, deployment: Deployment, baseline_tasks: dict[str, int]) -> dict[str, Any]:
    """Everything still held anywhere that should not be, by where it is (empty: all clean)."""
    left: dict[str, Any] = {}
    stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=3.0)
    if len(stats) != len(deployment.workers):
        left["workers answering"] = len(stats)
    for s in stats:
        held = {
            "unfinished": s["unfinished"],
            "running": s["running"],
            "open_calls": s["open_calls"],
            "stored_tensors": s["data_plane"]["stored_tensors"],
        }
        extra_tasks = s["asyncio_tasks"] - baseline_tasks.get(s["worker"], 0)
        if extra_tasks > IDLE_TASK_JITTER:
            held["extra_asyncio_tasks"] = extra_tasks
        held = {k: v for k, v in held.items() if v}
        if held:
            left[s["worker"]] = held
    for info in await conn.plane.nats.jsm(timeout=3.0).streams_info():
        if info.state.messages:
            left[info.config.name] = f"{info.state.messages} messages waiting"
    if conn.plane.open_calls or len(conn.data_plane.store):
        left["well-behaved caller"] = {"open_calls": conn.plane.open_calls, "stored": len(conn.data_plane.store)}
    return left


async def assert_nothing_left_behind(
    conn: Connection, deployment: Deployment, baseline_tasks: dict[str, int], within_s: float
) -> None:
    started = time.monotonic()
    first = await _leftovers(conn, deployment, baseline_tasks)
    left = first
    while left:
        assert time.monotonic() < started + within_s, f"still held after {within_s:g} s: {left}"
        await asyncio.sleep(0.5)
        left = await _leftovers(conn, deployment, baseline_tasks)
    print(f"\nclean after {time.monotonic() - started:.1f} s; held when the hostile caller was done: {first}")


async def idle_task_counts(conn: Connection, deployment: Deployment) -> dict[str, int]:
    stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=5.0)
    assert len(stats) == len(deployment.workers)
    return {s["worker"]: s["asyncio_tasks"] for s in stats}


async def well_behaved(conn: Connection, requests: int, until: asyncio.Future[Any] | None = None) -> LoadTestResult:
    """A caller that plays by the rules: ``requests`` checked requests, 4 in flight, then more
    rounds of them while ``until`` is not done (so it overlaps the whole hostile act)."""
    inputs = make_inputs(1024, "int32", 16) + make_inputs(32768, "int32", 2, seed=1)  # some via UCX
    total = LoadTestResult(requests=0, concurrency=4)
    while True:
        result = await run_load_test(
            conn.operator("encoder_decoder"), requests=requests, concurrency=4, inputs=inputs, timeout_s=30
        )
        total.requests += result.requests
        total.ok += result.ok
        total.failed += result.failed
        total.timed_out += result.timed_out
        total.errors.update(result.errors)
        if until is None or until.done():
            return total


def assert_all_correct(result: LoadTestResult) -> None:
    assert result.requests > 0
    assert (result.ok, result.failed, result.timed_out) == (result.requests, 0, 0), result.errors


def report(conn: Connection, result: LoadTestResult, hostile: str) -> None:
    """Every well-behaved request was answered once: none lost, none answered twice."""
    assert conn.plane.late_responses == 0  # a second answer to a request would land here
    print(f"\nfigures: well-behaved {result.requests} requests, {result.ok} correct, lost 0, "
          f"duplicated {conn.plane.late_responses}; hostile: {hostile}")


# --- a caller on a raw socket that stops reading it ------------------------------------------


class PausedCaller:
    """Sends requests over its own TCP connection to NATS, then never reads the socket again.

    Its answers pile up in nats-server's buffer for it until the server calls it a slow
    consumer and closes the connection.
    """

    def __init__(self, nats_url: str):
        url = urlparse(nats_url)
        self._sock = socket.socket()
        # A small receive window, so the server's backlog for it builds after a few answers.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._sock.settimeout(5.0)
        self._sock.connect((url.hostname or "127.0.0.1", url.port or 4222))
        self._read_line()  # INFO
        options = {"name": "paused-caller", "verbose": False, "pedantic": False, "protocol": 1, "headers": True, "no_responders": True}
        self.inbox = f"_INBOX.paused{secrets.token_hex(4)}"
        self._sock.sendall(f"CONNECT {json.dumps(options)}\r\nSUB {self.inbox}.* 1\r\nPING\r\n".encode())
        while self._read_line() != b"PONG":
            pass
        self.sent = 0

    def _read_line(self) -> bytes:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = self._sock.recv(1)
            if not chunk:
                raise ConnectionError("nats-server closed the connection")
            line += chunk
        return line.strip()

    def send(self, subject: str, inputs: dict[str, np.ndarray], parameters: dict[str, Any], timeout_s: float) -> None:
        request_id = secrets.token_hex(12)
        reply_to = f"{self.inbox}.{request_id}"
        descriptors, buffers = encode_inline_tensors(inputs)
        header = RequestHeader(id=request_id, reply_to=reply_to, timeout_s=timeout_s, parameters=parameters,
                               tensors=descriptors)  # fmt: skip
        payload = encode_message(header, buffers)
        self._sock.sendall(f"PUB {subject} {reply_to} {len(payload)}\r\n".encode() + payload + b"\r\n")
        self.sent += 1

    def closed_by_server(self, timeout_s: float) -> bool:
        """Read what the server buffered; True once it has closed the connection."""
        self._sock.settimeout(timeout_s)
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            while self._sock.recv(1 << 20):
                pass
            return True
        return False

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
async def strict_nats(tmp_path: Path) -> Any:
    """A real nats-server that gives up on a client sooner than its defaults (64 MiB, 10 s).

    8 MiB is still more than a worker ever has coming: max_inflight_requests of 48 KiB requests.
    """
    server = NatsServer(tmp_path / "nats", config_text='max_pending: 8388608\nwrite_deadline: "2s"\n')
    await server.start()
    yield server
    await server.stop()


async def test_a_caller_that_stops_reading_its_socket_is_cut_off_and_everyone_else_is_served(
    strict_nats: NatsServer,
) -> None:
    config = load_deployment(HELLO_WORLD_PYTHON)
    assert strict_nats.url is not None
    async with running(config, nats_url=strict_nats.url) as deployment, connected(deployment, timeout_s=30) as conn:
        baseline = await idle_task_counts(conn, deployment)
        paused = await asyncio.to_thread(PausedCaller, strict_nats.url)
        subject = operator_subject(config.name, "encoder_decoder", 1)
        # 48 KiB answers, inline: about 14 MiB for a caller that reads none of them.
        inline = make_inputs(12_000, "int32", 4, seed=3)
        # 80 KiB answers stay in the decoders' data-plane stores, for a caller that never fetches.
        via_store = make_inputs(20_000, "int32", 2, seed=4)
        timeout_s = 5.0

        def misbehave() -> None:
            try:
                for i in range(300):
                    paused.send(subject, {"input": inline[i % 4]}, {}, timeout_s)
                for i in range(20):
                    paused.send(subject, {"input": via_store[i % 2]}, {}, timeout_s)
            except OSError:
                pass  # cut off already, while still sending

        def slow_consumer_lines() -> list[str]:
            return [line for line in strict_nats.log_file.read_text().splitlines() if "Slow Consumer" in line]

        async def misbehave_until_cut_off() -> None:
            await asyncio.to_thread(misbehave)
            deadline = time.monotonic() + 30.0
            while not slow_consumer_lines() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)

        hostile = asyncio.ensure_future(misbehave_until_cut_off())
        result = await well_behaved(conn, 100, until=hostile)
        await hostile
        assert_all_correct(result)
        assert paused.sent >= 100
        # The server gave up on it (slow consumer) instead of buffering for it without bound.
        assert await asyncio.to_thread(paused.closed_by_server, 30.0), "nats-server kept the paused caller"
        paused.close()
        cut_off = slow_consumer_lines()
        assert cut_off and all("paused-caller" in line for line in cut_off), cut_off
        stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=5.0)
        assert sum(s["reconnects"] for s in stats) == 0  # no worker lost its connection
        await assert_nothing_left_behind(conn, deployment, baseline, within_s=timeout_s + LEASE_GRACE_S + 10)
        after = await well_behaved(conn, 100)
        assert_all_correct(after)
        report(conn, result, f"{paused.sent} requests from a caller that never read its socket, cut off "
               f"by nats-server ({len(cut_off)} slow-consumer lines); then {after.requests} more, correct")
        assert sum(w.restarts for w in deployment.workers) == 0


# --- a caller SIGKILLed with requests in flight ----------------------------------------------

_DOOMED_CALLER = """
import asyncio, sys
import numpy as np
from pipeline_runner import Connection

async def main():
    conn = await Connection.connect(sys.argv[1], sys.argv[2], default_timeout_s=10.0)
    op = conn.operator("encoder_decoder")
    rng = np.random.default_rng(7)
    small = [rng.integers(0, 1000, 1024, dtype=np.int32) for _ in range(4)]
    large = [rng.integers(0, 1000, 32768, dtype=np.int32) for _ in range(4)]  # in its own store
    inputs = small + large
    async def forever(i):
        while True:
            await op.infer({"input": inputs[i % len(inputs)]}, parameters={"delay": 0.05})
    tasks = [asyncio.create_task(forever(i)) for i in range(48)]
    await asyncio.sleep(0.5)
    print("in flight", flush=True)
    await asyncio.gather(*tasks)

asyncio.run(main())
"""


async def test_a_caller_killed_with_requests_in_flight_leaves_nothing_behind() -> None:
    config = load_deployment(HELLO_WORLD_PYTHON)
    async with running(config) as deployment, connected(deployment, timeout_s=30) as conn:
        baseline = await idle_task_counts(conn, deployment)
        assert deployment.nats_url is not None
        kills = 0

        async def kill_callers() -> None:
            nonlocal kills
            for _ in range(3):
                doomed = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _DOOMED_CALLER, deployment.nats_url, config.name,
                    stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
                )  # fmt: skip
                assert doomed.stdout is not None
                line = await asyncio.wait_for(doomed.stdout.readline(), timeout=60)
                assert line.strip() == b"in flight", line
                await asyncio.sleep(1.0)
                os.kill(doomed.pid, signal.SIGKILL)
                await doomed.wait()
                kills += 1
                stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=3.0)
                held.append(sum(s["data_plane"]["stored_tensors"] for s in stats))

        held: list[int] = []

        hostile = asyncio.ensure_future(kill_callers())
        result = await well_behaved(conn, 100, until=hostile)
        await hostile
        assert kills == 3
        assert_all_correct(result)
        print(f"\ntensors held in the workers' stores just after each kill: {held}")
        # Its requests ran to their deadline (10 s) at most; tensors published for it expire
        # with their leases.
        await assert_nothing_left_behind(conn, deployment, baseline, within_s=10.0 + LEASE_GRACE_S + 10)
        after = await well_behaved(conn, 100)
        assert_all_correct(after)
        report(conn, result, f"{kills} callers SIGKILLed with 48 requests in flight each; "
               f"then {after.requests} more, correct")
        assert sum(w.restarts for w in deployment.workers) == 0


# --- a caller whose deadline is shorter than one hop -----------------------------------------


async def test_a_caller_with_a_deadline_shorter_than_one_hop_times_out_and_is_cancelled_everywhere() -> None:
    config = load_deployment(HELLO_WORLD_PYTHON)
    async with running(config) as deployment, connected(deployment, timeout_s=30) as conn:
        baseline = await idle_task_counts(conn, deployment)
        assert deployment.nats_url is not None
        hasty = await Connection.connect(deployment.nats_url, config.name, data_plane=config.data_plane)
        # Started now: a call's deadline does not cover the data plane's first start (UCX's
        # import), which the first large input of a process waits for.
        await hasty.data_plane.start()
        timeout_s = 0.05
        late_by: list[float] = []
        answered = 0
        # Each would take the encoder 0.3 s (delay): far past its 50 ms.
        inputs = make_inputs(1024, "int32", 4) + make_inputs(32768, "int32", 2, seed=5)

        async def hurry(lane: int) -> None:
            nonlocal answered
            for i in range(25):
                started = time.monotonic()
                try:
                    await hasty.operator("encoder_decoder").infer(
                        {"input": inputs[(lane + i) % len(inputs)]}, parameters={"delay": 0.3}, timeout_s=timeout_s
                    )
                    answered += 1
                except RequestTimeoutError:
                    late_by.append(time.monotonic() - started - timeout_s)

        try:
            hostile = asyncio.ensure_future(asyncio.gather(*(hurry(lane) for lane in range(8))))
            result = await well_behaved(conn, 100, until=hostile)
            await hostile
            assert_all_correct(result)
            assert (answered, len(late_by)) == (0, 200)
            # The caller's timeout fires at its deadline, not at the end of the hop (0.3 s on);
            # the bound leaves room for a busy machine.
            assert max(late_by) < 1.0, sorted(late_by)[-10:]
            assert hasty.plane.open_calls == 0 and len(hasty.data_plane.store) == 0
        finally:
            await hasty.close()
        await assert_nothing_left_behind(conn, deployment, baseline, within_s=0.3 + LEASE_GRACE_S + 10)
        stats = await conn.worker_stats(expected=len(deployment.workers), timeout_s=5.0)
        # Work on them stopped: requests were cancelled in the workers, or dropped unstarted.
        assert sum(s["cancelled"] for s in stats) > 0
        # Cancels go to every worker of an operator; the ones that never held the request
        # remember its id, up to a bound.
        assert all(s["cancelled_early_remembered"] <= 10_000 for s in stats)
        after = await well_behaved(conn, 100)
        assert_all_correct(after)
        report(conn, result, f"{len(late_by)} requests with a 50 ms deadline for a 300 ms hop, all timed "
               f"out (latest {max(late_by) * 1000:.0f} ms past the deadline), "
               f"{sum(s['cancelled'] for s in stats)} cancelled in workers; then {after.requests} more, correct")
