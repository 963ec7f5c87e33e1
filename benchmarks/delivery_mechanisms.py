"""Cost of the NATS mechanisms a delivery guarantee can be built on, side by side in one run.

Issue 5 asks for "a request is acknowledged only after its final response is sent" and
redelivery when a worker dies. Candidates, each with its responder in a separate process:

- core request/reply in a queue group (``delivery.mode: at_most_once``; no redelivery by itself),
- core request/reply where the worker first sends an "accepted" notice naming itself: the least
  a caller-side retry scheme needs on the happy path (it must also learn of worker deaths,
  e.g. from heartbeats, which this row leaves out),
- JetStream work-queue stream + durable pull consumer with explicit ack after the reply,
  requests published with plain core publish (no PubAck round trip), memory and file storage,
- the same with ``js.publish`` (the caller waits for the stream's PubAck, so a full stream or
  missing stream is reported to it).

    python benchmarks/delivery_mechanisms.py [--requests 3000] [--size-bytes 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats
from rich.console import Console
from rich.table import Table
from timing import timed

from pipeline_runner.nats_server import NatsServer

RESPONDER = r"""
import asyncio, sys, nats
async def main():
    mode, url = sys.argv[1], sys.argv[2]
    nc = await nats.connect(url)
    if mode == "core":
        async def echo(msg):
            await msg.respond(msg.data)
        await nc.subscribe("bench.core", queue="workers", cb=echo)
    elif mode == "accepted":
        async def accept_then_echo(msg):
            await nc.publish(msg.reply, b"accepted by worker-1")
            await msg.respond(msg.data)
        await nc.subscribe("bench.accepted", queue="workers", cb=accept_then_echo)
    else:
        js = nc.jetstream()
        stream = "BENCH" if mode == "js" else "BENCHFILE"
        sub = await js.pull_subscribe(f"bench.{mode}", durable="workers", stream=stream)
        async def serve(msg):
            await nc.publish(msg.headers["Reply-To"], msg.data)
            await msg.ack()
        async def pull():
            while True:
                try:
                    msgs = await sub.fetch(batch=64, timeout=1)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                await asyncio.gather(*(serve(m) for m in msgs))
        asyncio.get_running_loop().create_task(pull())
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--size-bytes", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    server = NatsServer(Path(tempfile.mkdtemp(prefix="pr-bench-")), jetstream=True)
    url = await server.start()
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench.js"], retention="workqueue", storage="memory")
    await js.add_stream(name="BENCHFILE", subjects=["bench.jsfile"], retention="workqueue", storage="file")
    responders = [
        subprocess.Popen([sys.executable, "-c", RESPONDER, mode, url], stdout=subprocess.PIPE, text=True)
        for mode in ("core", "accepted", "js", "jsfile")
    ]
    for proc in responders:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    payload = os.urandom(args.size_bytes)
    pending: dict[str, asyncio.Future[Any]] = {}
    inbox_prefix = nc.new_inbox()

    async def on_reply(msg: Any) -> None:
        future = pending.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    await nc.subscribe(f"{inbox_prefix}.*", cb=on_reply)
    counter = iter(range(10**9))

    async def core() -> None:
        await nc.request("bench.core", payload, timeout=10)

    accepted: dict[str, asyncio.Queue[bytes]] = {}

    async def on_accepted(msg: Any) -> None:
        accepted[msg.subject].put_nowait(msg.data)

    await nc.subscribe(f"{inbox_prefix}.acc.*", cb=on_accepted)

    async def core_with_accepted() -> None:
        reply = f"{inbox_prefix}.acc.{next(counter)}"
        answers = accepted[reply] = asyncio.Queue()
        try:
            await nc.publish("bench.accepted", payload, reply=reply)
            assert (await asyncio.wait_for(answers.get(), 10)).startswith(b"accepted")
            await asyncio.wait_for(answers.get(), 10)
        finally:
            del accepted[reply]

    async def js_request(subject: str, wait_for_ack: bool) -> None:
        reply = f"{inbox_prefix}.{next(counter)}"
        future = asyncio.get_running_loop().create_future()
        pending[reply] = future
        if wait_for_ack:
            await js.publish(subject, payload, headers={"Reply-To": reply})
        else:
            await nc.publish(subject, payload, headers={"Reply-To": reply})
        await asyncio.wait_for(future, 10)

    async def js_core_publish() -> None:
        await js_request("bench.js", False)

    async def js_file_core_publish() -> None:
        await js_request("bench.jsfile", False)

    async def js_with_puback() -> None:
        await js_request("bench.js", True)

    rows = []
    try:
        mechanisms = (
            ("core request/reply (queue group)", core),
            ("core + 'accepted' notice (caller-side retry)", core_with_accepted),
            ("JetStream work queue, core publish", js_core_publish),
            ("JetStream work queue (file), core publish", js_file_core_publish),
            ("JetStream work queue, js.publish + PubAck", js_with_puback),
        )
        for _, call in mechanisms:
            for _ in range(200):
                await call()
        for concurrency in (1, 64):
            for name, call in mechanisms:
                rows.append({"mechanism": name, "concurrency": concurrency, **await timed(call, args.requests, concurrency)})
    finally:
        for proc in responders:
            proc.kill()
        await nc.close()
        await server.stop()

    table = Table(title=f"delivery mechanisms ({args.size_bytes} B payload, {os.cpu_count()} CPUs)")
    for column in ("mechanism", "concurrency", "req/s", "p50 ms", "p99 ms", "vs core"):
        table.add_column(column, justify="left" if column == "mechanism" else "right", no_wrap=True)
    base = {r["concurrency"]: r["req_per_s"] for r in rows if r["mechanism"] == mechanisms[0][0]}
    for r in rows:
        table.add_row(
            r["mechanism"], str(r["concurrency"]), f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}", f"{r['req_per_s'] / base[r['concurrency']]:.2f}",
        )  # fmt: skip
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"size_bytes": args.size_bytes, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
