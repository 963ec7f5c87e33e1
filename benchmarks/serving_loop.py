"""CPU per request of the worker's serving loop alone, side by side for two checkouts.

A ``Worker`` serving ``operators/echo`` (1024 int32 per request, batching off) is driven in one
process through a fake inbound and a response sink that only counts: no nats-server, no other
process, so the CPU time (``time.process_time``) per request is the serving loop's own (decode,
admission, batching, task, execute, encode). ``--compare PATH`` runs the same measurement on
another checkout of the repository (e.g. a worktree of main), alternating the two in child
processes ``--rounds`` times; the table shows medians.

    python benchmarks/serving_loop.py [--compare ../main] [--requests 20000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from checkouts import run_in_checkout

REPO = Path(__file__).resolve().parents[1]


async def child(concurrency: int, requests: int) -> dict[str, float]:
    """Serve ``requests`` echo requests in waves of ``concurrency``; CPU and wall per request."""
    import numpy as np

    from operators.echo.echo import Echo
    from pipeline_runner import OperatorContext
    from pipeline_runner.config import OperatorConfig
    from pipeline_runner.inbound import Delivery, Inbound
    from pipeline_runner.protocol import RequestHeader, encode_inline_tensors, encode_message
    from pipeline_runner.reply import Responder
    from pipeline_runner.worker import Worker, WorkerSpec

    class CountingSink:
        max_payload = 1 << 20

        def __init__(self) -> None:
            self.count = 0
            self.wanted = 0
            self.reached = asyncio.Event()

        async def publish_response(self, subject: str, payload: bytes, final: bool) -> None:
            self.count += 1
            if self.count >= self.wanted:
                self.reached.set()

    class DrivenInbound(Inbound):
        async def start(self, on_delivery: Any, capacity: Any) -> None:
            self.on_delivery = on_delivery

        async def stop_taking(self) -> None:
            pass

        async def close(self) -> None:
            pass

    async def settle(_: Any) -> None:
        pass

    descriptors, buffers = encode_inline_tensors({"x": np.arange(1024, dtype=np.int32)})
    payloads = [
        encode_message(RequestHeader(id=f"r{i}", reply_to=f"caller.r{i}", timeout_s=30.0, tensors=descriptors), buffers)
        for i in range(concurrency)
    ]
    config = OperatorConfig(name="echo", implementation="operators.echo.echo:Echo", max_inflight_requests=128)
    spec = WorkerSpec(deployment="bench", operator=config, index=0, nats_url="nats://unused", root=str(REPO))
    inbound, sink = DrivenInbound(), CountingSink()
    worker = Worker(spec, Echo(OperatorContext("bench", "echo", 1, spec.worker_id)), inbound=inbound,
                    responder=Responder(sink, None, spec.worker_id), data_plane=None)
    serving = asyncio.create_task(worker.serve())
    await asyncio.sleep(0.05)

    async def waves(n: int) -> None:
        for _ in range(n // concurrency):
            sink.wanted = sink.count + concurrency
            sink.reached.clear()
            for payload in payloads:
                await inbound.on_delivery(Delivery(payload, None, 1, time.monotonic(), settle, None))
            await sink.reached.wait()

    await waves(max(concurrency, requests // 10))  # warm up
    cpu, wall, before = time.process_time(), time.perf_counter(), sink.count
    await waves(requests)
    cpu, wall, served = time.process_time() - cpu, time.perf_counter() - wall, sink.count - before
    worker.stop()
    await serving
    return {"cpu_us_per_request": cpu / served * 1e6, "wall_us_per_request": wall / served * 1e6}


def run_child(checkout: Path, concurrency: int, requests: int) -> dict[str, float]:
    return run_in_checkout(__file__, checkout, ["--child", str(concurrency), "--requests", str(requests)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="another checkout to measure side by side")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.requests))))
        return
    checkouts = {"this": REPO} | ({"compare": args.compare.resolve()} if args.compare else {})
    results: dict[str, dict[int, list[dict[str, float]]]] = {k: {} for k in checkouts}
    for _ in range(args.rounds):
        for concurrency in args.concurrency:
            for key, path in checkouts.items():
                results[key].setdefault(concurrency, []).append(run_child(path, concurrency, args.requests))
    print(f"{'checkout':>8} {'in flight':>9} {'CPU µs/req (median)':>20} {'rounds':>30} {'wall µs/req':>12}")
    summary: dict[str, Any] = {"command": sys.argv, "checkouts": {k: str(v) for k, v in checkouts.items()}, "rows": {}}
    for concurrency in args.concurrency:
        for key in checkouts:
            rounds = results[key][concurrency]
            cpu = statistics.median(r["cpu_us_per_request"] for r in rounds)
            wall = statistics.median(r["wall_us_per_request"] for r in rounds)
            summary["rows"].setdefault(key, {})[str(concurrency)] = {"cpu_us_per_request": cpu, "wall_us_per_request": wall, "rounds": rounds}
            each = "/".join(f"{r['cpu_us_per_request']:.0f}" for r in rounds)
            print(f"{key:>8} {concurrency:>9} {cpu:>20.1f} {each:>30} {wall:>12.1f}")
        if "compare" in checkouts:
            ratio = summary["rows"]["this"][str(concurrency)]["cpu_us_per_request"] / summary["rows"]["compare"][str(concurrency)]["cpu_us_per_request"]
            print(f"{'':>8} {concurrency:>9} this / compare CPU: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
