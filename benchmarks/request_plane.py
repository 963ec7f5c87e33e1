"""Request-plane overhead, side by side in one run.

1. Round trip of a raw nats-py request/reply (responder in its own process) against a runner
   ``echo`` operator (one worker process) with the same tensor payload, sequential and with
   64 requests in flight.
2. hello_world (encoder_decoder -> encoder -> decoder) throughput at concurrency 1, 8 and 64.

    python benchmarks/request_plane.py [--requests 2000] [--size-bytes 1024] [--json out.json]
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

import numpy as np
from rich.console import Console
from rich.table import Table
from timing import timed

from pipeline_runner import Connection, DeploymentConfig
from pipeline_runner.client import make_inputs, run_load_test
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.deployment import Deployment
from pipeline_runner.nats_server import NatsServer

REPO = Path(__file__).resolve().parents[1]

RAW_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await msg.respond(msg.data)
    await nc.subscribe("raw.echo", queue="raw", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def bench_round_trip(nats_url: str, requests: int, size_bytes: int) -> list[dict[str, Any]]:
    payload = np.frombuffer(os.urandom(size_bytes), dtype=np.uint8)
    responder = subprocess.Popen(
        [sys.executable, "-c", RAW_RESPONDER, nats_url], stdout=subprocess.PIPE, text=True
    )
    assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
    config = DeploymentConfig.model_validate(
        {
            "name": "bench",
            "working_dir": str(REPO),
            "operators": [{"name": "echo", "implementation": "operators.echo.echo:Echo", "max_inflight_requests": 128}],
        }
    )
    deployment = Deployment(config, nats_url=nats_url)
    await deployment.start()
    rows = []
    try:
        async with await Connection.connect(nats_url, "bench") as conn:
            nc = conn.plane.nats
            echo = conn.operator("echo")
            raw_bytes = payload.tobytes()

            async def raw() -> None:
                await nc.request("raw.echo", raw_bytes, timeout=10)

            async def runner() -> None:
                await echo.infer({"x": payload}, timeout_s=10)

            for _ in range(200):  # warm up both paths
                await raw()
                await runner()
            for concurrency in (1, 64):
                raw_stats = await timed(raw, requests, concurrency)
                runner_stats = await timed(runner, requests, concurrency)
                rows.append({"path": "raw nats-py request/reply", "concurrency": concurrency, **raw_stats})
                rows.append(
                    {
                        "path": "runner echo operator",
                        "concurrency": concurrency,
                        **runner_stats,
                        "vs_raw_throughput": runner_stats["req_per_s"] / raw_stats["req_per_s"],
                    }
                )
    finally:
        await deployment.stop()
        responder.kill()
        responder.wait()
    return rows


async def bench_hello_world(requests: int, size_elements: int) -> list[dict[str, Any]]:
    config = load_deployment(REPO / "deployments" / "hello_world_python.yaml").model_copy(update={"http": None})  # the NATS path only: no ingress process, no fixed port
    deployment = Deployment(config)
    await deployment.start()
    rows = []
    try:
        assert deployment.nats_url is not None
        async with await Connection.connect(deployment.nats_url, config.name) as conn:
            pipeline = conn.operator("encoder_decoder")
            inputs = make_inputs(size_elements, "int32", count=16)
            await run_load_test(pipeline, requests=200, concurrency=8, inputs=inputs)  # warm-up
            for concurrency in (1, 8, 64):
                result = await run_load_test(pipeline, requests=requests, concurrency=concurrency, inputs=inputs)
                assert result.ok == requests, result.errors
                summary = result.summary()
                rows.append(
                    {
                        "path": "hello_world encoder_decoder",
                        "concurrency": concurrency,
                        "requests": requests,
                        "req_per_s": summary["throughput_rps"],
                        **{f"{k}_ms": v for k, v in summary["latency_ms"].items() if k != "max"},
                    }
                )
    finally:
        await deployment.stop()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--size-bytes", type=int, default=1024, help="tensor payload of the round-trip test")
    parser.add_argument("--hello-size", type=int, default=256, help="int32 elements per hello_world request")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    os.environ.setdefault("PIPELINE_RUNNER_STATE_DIR", tempfile.mkdtemp(prefix="pr-bench-"))
    server = NatsServer(Path(os.environ["PIPELINE_RUNNER_STATE_DIR"]) / "nats")
    nats_url = await server.start()
    try:
        rows = await bench_round_trip(nats_url, args.requests, args.size_bytes)
    finally:
        await server.stop()
    rows += await bench_hello_world(args.requests, args.hello_size)

    table = Table(title=f"request plane ({args.size_bytes} B round-trip payload, {os.cpu_count()} CPUs)")
    for column in ("path", "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "vs raw"):
        table.add_column(column, justify="left" if column == "path" else "right", no_wrap=True)
    for row in rows:
        ratio = row.get("vs_raw_throughput")
        table.add_row(
            row["path"],
            str(row["concurrency"]),
            f"{row['req_per_s']:.0f}",
            f"{row['p50_ms']:.3f}",
            f"{row['p90_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{ratio:.2f}" if ratio else "",
        )
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"size_bytes": args.size_bytes, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
