"""The processes benchmarks/hop.py starts: raw nats-py responders and the load-driving callers.

    python hop_processes.py serve --url URL --prefix P --kind encoder --mode core [--uvloop]
    python hop_processes.py call --url URL --target raw_chain --prefix P [--uvloop]

Raw responders are the floor of the runner's architecture: the same processes, subjects and
payload bytes as hello_world, with nothing of the runner's protocol. ``core`` mode is plain
request/reply in a queue group; ``js`` mode goes through JetStream work queues the way the
runner's ``at_least_once`` delivery does (the caller publishes into a work-queue stream and
gets a PubAck, the worker pulls with credit, publishes the answer to the caller's inbox, then
acks), without progress acks or redelivery policy.

A caller reads one JSON command per line on stdin (``warm`` or ``run``, with ``concurrency``,
``requests`` and ``max_s``) and answers one JSON line on stdout, so hop.py can read every
process's CPU time just around the timed section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

CALL_TIMEOUT_S = 30.0
PULL_EXPIRES_S = 5.0
JS_CAPACITY = 64
# A JetStream answer to a request starts with this byte; a PubAck starts with '{'.
ANSWER = b"R"


def stream_of(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}".replace(".", "_").upper()


def encode(x: np.ndarray, copies: int) -> np.ndarray:
    return np.invert(np.tile(x, copies))


def decode(y: np.ndarray, copies: int) -> np.ndarray:
    return np.invert(y)[: len(y) // copies]


def transform(kind: str, data: bytes, copies: int) -> bytes:
    if kind == "echo":
        return data
    x = np.frombuffer(data, dtype=np.int32)
    return (encode(x, copies) if kind == "encoder" else decode(x, copies)).tobytes()


class JetStreamCaller:
    """Requests into a work-queue stream, answers on a per-request inbox (like the runner)."""

    def __init__(self, nc: NATS):
        self._nc = nc
        self._prefix = f"_INBOX.{secrets.token_hex(8)}"
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_answer)

    async def _on_answer(self, msg: Msg) -> None:
        if msg.data[:1] != ANSWER:
            return  # the stream's PubAck
        future = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.set_result(msg.data[1:])

    async def request(self, subject: str, data: bytes) -> bytes:
        request_id = secrets.token_hex(8)
        inbox = f"{self._prefix}.{request_id}"
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._nc.publish(subject, inbox.encode() + b"\n" + data, reply=inbox)
            return await asyncio.wait_for(future, CALL_TIMEOUT_S)
        finally:
            self._waiting.pop(request_id, None)


async def ensure_stream(nc: NATS, prefix: str, kind: str) -> None:
    jsm = nc.jsm()
    stream = stream_of(prefix, kind)
    await jsm.add_stream(api.StreamConfig(
        name=stream, subjects=[f"{prefix}.{kind}"], retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.MEMORY, discard=api.DiscardPolicy.NEW, max_msgs=10_000,
    ))  # fmt: skip
    await jsm.add_consumer(stream, api.ConsumerConfig(
        durable_name="workers", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30.0, max_deliver=-1,
        max_ack_pending=10_000,
    ))  # fmt: skip


class PullLoop:
    """Keeps up to ``capacity`` requests in hand: pull credit topped up as requests finish."""

    def __init__(self, nc: NATS, stream: str, handle: Callable[[Msg], Awaitable[None]], capacity: int):
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.workers"
        self._deliver = nc.new_inbox()
        self._handle = handle
        self._capacity = capacity
        self._held = 0
        self._pulls: deque[list[float]] = deque()  # [credit left, expiry]
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._nc.subscribe(self._deliver, cb=self._on_delivery)
        await self._pull()
        asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._pull()

    async def _pull(self) -> None:
        now = time.monotonic()
        while self._pulls and self._pulls[0][1] < now:
            self._pulls.popleft()
        credit = int(sum(p[0] for p in self._pulls))
        wanted = self._capacity - self._held - credit
        if wanted <= 0 or (credit and wanted < max(1, self._capacity // 4)):
            return
        self._pulls.append([wanted, now + PULL_EXPIRES_S + 1.0])
        request = {"batch": wanted, "expires": int(PULL_EXPIRES_S * 1e9)}
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._deliver)

    async def _on_delivery(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            if self._pulls:
                self._pulls[0][0] -= 1
                if self._pulls[0][0] <= 0:
                    self._pulls.popleft()
            self._held += 1
            task = asyncio.create_task(self._run(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if status in ("404", "408") and self._pulls:
            self._pulls.popleft()
        await self._pull()

    async def _run(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        finally:
            await msg.ack()
            self._held -= 1
            await self._pull()


async def serve(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, name=f"hop-raw-{args.kind}")
    subject = f"{args.prefix}.{args.kind}"
    copies = args.copies
    tasks: set[asyncio.Task[None]] = set()
    if args.mode == "core":
        if args.kind == "encoder_decoder":

            async def chain(msg: Msg) -> None:
                encoded = await nc.request(f"{args.prefix}.encoder", msg.data, timeout=CALL_TIMEOUT_S)
                decoded = await nc.request(f"{args.prefix}.decoder", encoded.data, timeout=CALL_TIMEOUT_S)
                await msg.respond(decoded.data)

            async def on_message(msg: Msg) -> None:
                # nats-py runs one callback at a time per subscription: the chain needs a task.
                task = asyncio.create_task(chain(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        else:

            async def on_message(msg: Msg) -> None:
                await msg.respond(transform(args.kind, msg.data, copies))

        await nc.subscribe(subject, queue=subject, cb=on_message, pending_msgs_limit=1_000_000)
    else:
        await ensure_stream(nc, args.prefix, args.kind)
        caller = JetStreamCaller(nc)
        await caller.start()

        async def handle(msg: Msg) -> None:
            reply_to, _, data = msg.data.partition(b"\n")
            if args.kind == "encoder_decoder":
                encoded = await caller.request(f"{args.prefix}.encoder", data)
                out = await caller.request(f"{args.prefix}.decoder", encoded)
            else:
                out = transform(args.kind, data, copies)
            await nc.publish(reply_to.decode(), ANSWER + out)

        await PullLoop(nc, stream_of(args.prefix, args.kind), handle, JS_CAPACITY).start()
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- callers -------------------------------------------------------------------------------


async def make_call(args: argparse.Namespace) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """The request function of ``args.target`` and how to close its connection."""
    payload = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, args.size, dtype=np.int32)
    if args.target.startswith("raw"):
        nc = await nats.connect(args.url, name="hop-raw-caller")
        data = payload.tobytes()
        kind = "echo" if args.target.endswith("_rr") else "encoder_decoder"
        subject = f"{args.prefix}.{kind}"
        if args.target.startswith("raw_js"):
            js = JetStreamCaller(nc)
            await js.start()

            async def call() -> None:
                answer = await js.request(subject, data)
                assert len(answer) == len(data), (len(answer), len(data))
        else:

            async def call() -> None:
                answer = await nc.request(subject, data, timeout=CALL_TIMEOUT_S)
                assert len(answer.data) == len(data), (len(answer.data), len(data))

        return call, nc.close

    from pipeline_runner import Connection, tracing  # the library: only in library callers
    from pipeline_runner.tracing.settings import resolve_tracing

    tracing.configure(resolve_tracing(None), "hop-caller")  # on where the row's environment says so
    conn = await Connection.connect(args.url, args.deployment, default_timeout_s=CALL_TIMEOUT_S)
    op = conn.operator(args.operator)
    name = "x" if args.operator == "echo" else "input"

    async def call() -> None:
        response = await op.infer({name: payload})
        response.release()

    return call, conn.close


async def timed(call: Callable[[], Awaitable[None]], concurrency: int, requests: int, max_s: float) -> dict[str, Any]:
    """``requests`` calls (fewer if ``max_s`` runs out) with ``concurrency`` in flight."""
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + max_s
    issued = 0

    async def lane() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < stop_at:
            issued += 1
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    cpu0 = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "caller_cpu_s_self": cpu,
    }


async def call_loop(args: argparse.Namespace) -> None:
    call, close = await make_call(args)
    loop = asyncio.get_running_loop()
    print(json.dumps({"event": "ready"}), flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            try:
                result = await timed(call, cmd["concurrency"], cmd["requests"], cmd["max_s"])
            except Exception as exc:  # reported, not raised: hop.py says which row failed
                result = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps({"event": cmd["cmd"], **result}), flush=True)
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve", "call"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", default="hop")
    parser.add_argument("--kind", choices=["echo", "encoder", "decoder", "encoder_decoder"])
    parser.add_argument("--mode", choices=["core", "js"], default="core")
    parser.add_argument("--target", help="raw_rr, raw_chain, raw_js_rr, raw_js_chain or library")
    parser.add_argument("--deployment")
    parser.add_argument("--operator")
    parser.add_argument("--size", type=int, default=1024, help="int32 elements per request")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    main_coro = serve(args) if args.role == "serve" else call_loop(args)
    if args.uvloop:
        import uvloop

        uvloop.run(main_coro)
    else:
        asyncio.run(main_coro)


if __name__ == "__main__":
    main()
