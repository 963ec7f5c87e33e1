"""The processes of benchmarks/hop_large.py: a raw ucxx + NumPy chain, and a library caller.

Raw chain (the floor): ``caller -> encoder -> decoder -> caller`` over plain ucxx (low-level
API, endpoints from worker addresses, tag send/receive, no cma like the runner), each stage
running the same NumPy kernels as hello_world (encode: tile 3 times and invert; decode: invert
and keep one copy), so a request moves the bytes hello_world moves: the input to the encoder,
three copies to the decoder, one copy back. Messages between two processes are matched in the
order they were sent, so a stage needs no header: it takes them in order. Like hello_world's 2
workers per stage, there are ``--lanes`` encoder -> decoder pairs; the caller deals requests
to them in turn, each lane on its own tag. Receive buffers are
preallocated (the best case); outputs are fresh arrays, as an operator makes them. Each process
polls while UCX moves something and sleeps on the worker's epoll descriptor after 200 µs without.

Protocol with hop_large.py (stdout lines starting with ``@@``, stdin JSON lines):
``@@ {"address": ...}``, then ``{"next": [addresses]}`` on stdin (a caller: one encoder per
lane; an encoder: its decoder; a decoder: the caller); a caller then takes
``{"concurrency", "requests", "max_s"}`` commands and answers with its timings.

    python benchmarks/hop_large_processes.py raw --stage encoder|decoder|caller --lane I --size N
    python benchmarks/hop_large_processes.py library --url URL --deployment NAME --size N
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import select
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: see hop_large.py --before
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ.setdefault("UCX_TLS", "^cma")  # what the runner allows itself (data_plane/ucx_lib.py)

PREFIX = "@@ "
TAG = 0x4C52_4745_0000_0001
COPIES = 3
LINGER_S = 200e-6
CALL_TIMEOUT_S = 60.0


def say(**msg: Any) -> None:
    print(PREFIX + json.dumps(msg), flush=True)


def read_command() -> dict[str, Any] | None:
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


class RawStage:
    """One UCX worker, an endpoint to the next stage, and a poll-then-sleep progress loop."""

    def __init__(self, lane: int = 0) -> None:
        import ucxx._lib.libucxx as ucx_api
        from ucxx._lib.arr import Array

        self.api, self.Array = ucx_api, Array
        self.context = ucx_api.UCXContext(feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self.worker = ucx_api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.fd = self.worker.epoll_file_descriptor
        self.tag = ucx_api.UCXXTag(TAG + lane)
        self.eps: list[Any] = []
        self.last_progress = time.perf_counter()

    @property
    def address(self) -> str:
        return base64.b64encode(bytes(self.worker.address)).decode()

    def connect(self, addresses: list[str]) -> None:
        for address in addresses:
            peer = self.api.UCXAddress.create_from_buffer(base64.b64decode(address))
            self.eps.append(self.api.UCXEndpoint.create_from_worker_address(self.worker, peer, False))

    def recv(self, buf: np.ndarray, lane: int | None = None) -> Any:
        tag = self.tag if lane is None else self.api.UCXXTag(TAG + lane)
        return self.worker.tag_recv(self.Array(buf), tag)

    def send(self, arr: np.ndarray, lane: int | None = None) -> Any:
        if lane is None:
            return self.eps[0].tag_send(self.Array(arr), self.tag)
        return self.eps[lane].tag_send(self.Array(arr), self.api.UCXXTag(TAG + lane))

    def progress(self, timeout_s: float = 0.5) -> None:
        """Poll while UCX moves something; after LINGER_S without, sleep until an event."""
        if self.worker.progress_once():
            self.last_progress = time.perf_counter()
            while self.worker.progress_once():
                pass
        elif time.perf_counter() - self.last_progress >= LINGER_S and self.worker.arm():
            select.select([self.fd], [], [], timeout_s)
            self.last_progress = time.perf_counter()


def raw_middle(stage: RawStage, kind: str, size: int, depth: int) -> None:
    """Encoder or decoder: receive in order, transform with NumPy, send on."""
    from pipeline_runner.kernels.hello_world import decode, encode

    in_elems = size if kind == "encoder" else size * COPIES
    posted: deque[tuple[Any, np.ndarray]] = deque()
    for _ in range(depth):
        buf = np.empty(in_elems, np.int32)
        posted.append((stage.recv(buf), buf))
    sending: deque[tuple[Any, np.ndarray]] = deque()
    while True:
        stage.progress()
        while posted and posted[0][0].completed:
            req, buf = posted.popleft()
            req.check_error()
            out = encode(buf, COPIES) if kind == "encoder" else decode(buf, COPIES)
            sending.append((stage.send(out), out))
            posted.append((stage.recv(buf), buf))
        while sending and sending[0][0].completed:
            sending.popleft()[0].check_error()


def raw_caller(stage: RawStage, size: int) -> None:
    """Keep ``concurrency`` requests in flight; answers come back in the order of the requests."""
    payload = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, size, dtype=np.int32)
    say(event="ready")
    while (cmd := read_command()) is not None:
        concurrency, requests, max_s = cmd["concurrency"], cmd["requests"], cmd["max_s"]
        lanes = len(stage.eps)
        replies: list[deque[tuple[Any, Any, float, np.ndarray]]] = [deque() for _ in range(lanes)]
        latencies: list[float] = []
        started = time.perf_counter()
        stop_at, issued, in_flight = started + max_s, 0, 0
        cpu0 = time.process_time()
        while issued < requests and time.perf_counter() < stop_at or in_flight:
            while in_flight < concurrency and issued < requests and time.perf_counter() < stop_at:
                lane = issued % lanes
                out = np.empty(size, np.int32)  # a fresh output, as a caller gets one
                recv = stage.recv(out, lane)
                replies[lane].append((recv, stage.send(payload, lane), time.perf_counter(), out))
                issued += 1
                in_flight += 1
            stage.progress(timeout_s=0.05)
            for queue in replies:
                while queue and queue[0][0].completed and queue[0][1].completed:
                    recv, send, t0, out = queue.popleft()
                    recv.check_error()
                    send.check_error()
                    latencies.append(time.perf_counter() - t0)
                    in_flight -= 1
            if time.perf_counter() > stop_at + CALL_TIMEOUT_S:
                say(error=f"{len(replies)} requests unanswered after {CALL_TIMEOUT_S} s")
                return
        say(event="done", **timings(latencies, time.perf_counter() - started, time.process_time() - cpu0))


def timings(latencies: list[float], wall: float, cpu: float) -> dict[str, Any]:
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "wall_s": wall, "req_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
        "caller_cpu_s_self": cpu,
    }  # fmt: skip


async def library_caller(args: argparse.Namespace) -> None:
    """hello_world through the library, fetching every answer (as a user would)."""
    from pipeline_runner import Connection

    payload = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, args.size, dtype=np.int32)
    conn = await Connection.connect(args.url, args.deployment, default_timeout_s=CALL_TIMEOUT_S)
    op = conn.operator("encoder_decoder")

    async def call() -> None:
        response = await op.infer({"input": payload})
        output = await response.array("output")
        assert output.shape == payload.shape, output.shape
        response.release()

    loop = asyncio.get_running_loop()
    say(event="ready")
    try:
        while (cmd := await loop.run_in_executor(None, read_command)) is not None:
            latencies: list[float] = []
            started = time.perf_counter()
            stop_at, issued = started + cmd["max_s"], 0

            async def lane() -> None:
                nonlocal issued
                while issued < cmd["requests"] and time.perf_counter() < stop_at:
                    issued += 1
                    t0 = time.perf_counter()
                    await call()
                    latencies.append(time.perf_counter() - t0)

            cpu0 = time.process_time()
            try:
                await asyncio.gather(*(lane() for _ in range(cmd["concurrency"])))
            except Exception as exc:  # reported, not raised: hop_large.py says which row failed
                say(error=f"{type(exc).__name__}: {exc}")
                continue
            say(event="done", **timings(latencies, time.perf_counter() - started, time.process_time() - cpu0))
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["raw", "library"])
    parser.add_argument("--stage", choices=["encoder", "decoder", "caller"])
    parser.add_argument("--size", type=int, required=True, help="int32 elements per request")
    parser.add_argument("--lane", type=int, default=0, help="a raw stage's lane (its tag)")
    parser.add_argument("--depth", type=int, default=4, help="receives a raw stage keeps posted")
    parser.add_argument("--url")
    parser.add_argument("--deployment")
    args = parser.parse_args()
    if args.role == "library":
        asyncio.run(library_caller(args))
        return
    stage = RawStage(args.lane)
    say(address=stage.address)
    stage.connect(json.loads(sys.stdin.readline())["next"])
    if args.stage == "caller":
        raw_caller(stage, args.size)
    else:
        say(event="ready")
        raw_middle(stage, args.stage, args.size, args.depth)


if __name__ == "__main__":
    main()
