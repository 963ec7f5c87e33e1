"""A Triton model called directly, through a ``kind: triton`` operator, and the same math in Python.

In one run, on the hello_world encoder (Triton Python backend, 1024 int32 elements, 3 copies):

1. tritonclient gRPC (asyncio) straight to a Triton server the benchmark starts;
2. a runner deployment's ``kind: triton`` operator (1 worker, its own Triton server), with
   ``at_least_once`` and with ``at_most_once`` delivery;
3. the Python ``Encoder`` operator (1 worker), the same math without Triton.

    python benchmarks/triton_operator.py [--requests 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from rich.console import Console
from rich.table import Table
from timing import timed

from pipeline_runner import Connection, DeploymentConfig
from pipeline_runner.deployment import Deployment
from pipeline_runner.nats_server import NatsServer
from pipeline_runner.triton.environment import setup_triton
from pipeline_runner.triton.server import TritonServer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "operators" / "hello_world" / "triton_models"


def deployment_config() -> DeploymentConfig:
    triton = {"kind": "triton", "repository": str(MODELS), "model": "encoder", "max_inflight_requests": 64}
    return DeploymentConfig.model_validate({
        "name": "bench_triton",
        "working_dir": str(REPO),
        "operators": [
            {"name": "triton_encoder", **triton},
            {"name": "triton_encoder_amo", **triton, "delivery": {"mode": "at_most_once"}},
            {"name": "python_encoder", "implementation": "operators.hello_world.encoder:Encoder",
             "max_inflight_requests": 64},
        ],
    })  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="int32 elements per request")
    parser.add_argument("--delay", type=float, default=0.0, help="simulated compute per request, seconds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    os.environ.setdefault("PIPELINE_RUNNER_STATE_DIR", tempfile.mkdtemp(prefix="pr-bench-"))
    params = {"input_copies": 3, "delay": args.delay}
    x = np.random.default_rng(0).integers(-1000, 1000, args.size, dtype=np.int32)
    expected = np.invert(np.tile(x, 3))

    server = TritonServer(setup_triton(), MODELS)
    await server.start()
    await server.load_model("encoder")
    nats = NatsServer(Path(os.environ["PIPELINE_RUNNER_STATE_DIR"]) / "nats")
    url = await nats.start()
    deployment = Deployment(deployment_config(), nats_url=url)
    rows: list[dict[str, Any]] = []
    try:
        await deployment.start()
        conn = await Connection.connect(url, "bench_triton")
        client = server.client
        assert client is not None

        async def direct() -> None:
            tensor = grpcclient.InferInput("input", [args.size], "INT32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("encoder", [tensor], parameters=params)
            assert result.as_numpy("output").shape == expected.shape

        def through(name: str):  # type: ignore[no-untyped-def]
            operator = conn.operator(name)

            async def call() -> None:
                response = await operator.infer({"input": x}, parameters=params)
                assert np.array_equal(await response.array("output"), expected)

            return call

        paths = [
            ("tritonclient gRPC, direct", direct),
            ("kind: triton operator (at_least_once)", through("triton_encoder")),
            ("kind: triton operator (at_most_once)", through("triton_encoder_amo")),
            ("Python operator, same math", through("python_encoder")),
        ]
        for _, call in paths:  # warm-up
            for _ in range(200):
                await call()
        for concurrency in (1, 8):
            for name, call in paths:
                rows.append({"path": name, "concurrency": concurrency, **await timed(call, args.requests, concurrency)})
        await conn.close()
    finally:
        await deployment.stop()
        await nats.stop()
        await server.stop()

    title = f"Triton operator overhead ({args.size} int32, delay {args.delay * 1000:g} ms, {os.cpu_count()} CPUs)"
    table = Table(title=title)
    for column in ("path", "concurrency", "req/s", "p50 ms", "p99 ms", "p50 vs direct"):
        table.add_column(column, justify="left" if column == "path" else "right", no_wrap=True)
    direct_p50 = {r["concurrency"]: r["p50_ms"] for r in rows if r["path"] == paths[0][0]}
    for r in rows:
        r["p50_vs_direct"] = r["p50_ms"] / direct_p50[r["concurrency"]]
        table.add_row(
            r["path"], str(r["concurrency"]), f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}", f"{r['p50_vs_direct']:.2f}",
        )  # fmt: skip
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "delay_s": args.delay, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
