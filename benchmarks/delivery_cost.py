"""Cost of the delivery guarantee on hello_world, side by side in one run.

Two copies of deployments/hello_world_python.yaml run on one embedded nats-server: one as shipped
(every operator ``delivery.mode: at_least_once``: JetStream work queues, ack after the final
response) and one with every operator switched to ``at_most_once`` (core request/reply). The
load test alternates between them, ``--rounds`` times per concurrency, and reports the
median throughput of each and their ratio.

    python benchmarks/delivery_cost.py [--requests 2000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline_runner import Connection, DeploymentConfig
from pipeline_runner.client import make_inputs, run_load_test
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.deployment import Deployment
from pipeline_runner.nats_server import NatsServer

REPO = Path(__file__).resolve().parents[1]
MODES = ("at_least_once", "at_most_once")


def variant(base: DeploymentConfig, mode: str) -> DeploymentConfig:
    data = base.model_dump(mode="json")
    data["name"] = f"hw_{mode}"
    data["working_dir"] = str(base.root)
    data.pop("http", None)  # two copies cannot share the file's HTTP port; this measures NATS
    for op in data["operators"]:
        op["delivery"]["mode"] = mode
    return DeploymentConfig.model_validate(data)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements per mode and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--size", type=int, default=1024, help="int32 elements per request")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    os.environ.setdefault("PIPELINE_RUNNER_STATE_DIR", tempfile.mkdtemp(prefix="pr-bench-"))
    server = NatsServer(Path(os.environ["PIPELINE_RUNNER_STATE_DIR"]) / "nats")
    url = await server.start()
    base = load_deployment(REPO / "deployments" / "hello_world_python.yaml")
    deployments = {mode: Deployment(variant(base, mode), nats_url=url) for mode in MODES}
    rows: list[dict[str, Any]] = []
    try:
        for deployment in deployments.values():
            await deployment.start()
        connections = {mode: await Connection.connect(url, f"hw_{mode}") for mode in MODES}
        inputs = make_inputs(args.size, "int32", count=16)
        for mode in MODES:  # warm-up
            await run_load_test(connections[mode].operator("encoder_decoder"), requests=300, concurrency=8, inputs=inputs)
        for concurrency in args.concurrency:
            samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    result = await run_load_test(
                        connections[mode].operator("encoder_decoder"),
                        requests=args.requests, concurrency=concurrency, inputs=inputs,
                    )  # fmt: skip
                    assert result.ok == args.requests, result.errors
                    samples[mode].append(result.summary())
            for mode in MODES:
                runs = samples[mode]
                rows.append({
                    "mode": mode,
                    "concurrency": concurrency,
                    "req_per_s": statistics.median(r["throughput_rps"] for r in runs),
                    "req_per_s_runs": [r["throughput_rps"] for r in runs],
                    "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in runs),
                    "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs),
                })  # fmt: skip
        for conn in connections.values():
            await conn.close()
    finally:
        for deployment in deployments.values():
            await deployment.stop()
        await server.stop()

    table = Table(title=f"hello_world with and without the delivery guarantee ({os.cpu_count()} CPUs)")
    for column in ("delivery", "concurrency", "req/s (median)", "p50 ms", "p99 ms", "guaranteed / not"):
        table.add_column(column, justify="left" if column == "delivery" else "right", no_wrap=True)
    plain = {r["concurrency"]: r["req_per_s"] for r in rows if r["mode"] == "at_most_once"}
    for r in rows:
        ratio = r["req_per_s"] / plain[r["concurrency"]] if r["mode"] == "at_least_once" else None
        table.add_row(
            r["mode"], str(r["concurrency"]), f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}", f"{ratio:.2f}" if ratio else "",
        )  # fmt: skip
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "requests": args.requests, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
