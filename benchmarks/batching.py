"""Dynamic batching, side by side in one run: batching off against max_wait_ms 1, 5 and 10.

Every variant is ``deployments/batched_matmul.yaml`` (one worker, ``y = x @ W`` with 1024x1024
float32 weights and a fixed 2 ms "device" cost per call, see operators/batched_matmul), deployed
at once on one nats-server under its own name: ``off`` without batching, ``wait_N`` with
``batching: {max_batch_size: 32, max_wait_ms: N}``. A closed-loop caller in this process keeps
``--concurrency`` requests in flight (1024 float32 each) and the variants alternate, ``--rounds``
times; the table shows medians.

Each row reports req/s, p50, p99, the mean batch size the operator reported, and CPU time per
request summed over nats-server, the variant's worker and this process (the caller), from /proc
around the timed section.

    python benchmarks/batching.py [--requests 1500] [--max-seconds 5] [--rounds 2] [--json out.json]
    python benchmarks/batching.py --quick            # a short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEPLOYMENT = REPO / "deployments" / "batched_matmul.yaml"
CALL_TIMEOUT_S = 30.0
MAX_BATCH_SIZE = 32


@dataclass
class Variant:
    key: str
    label: str
    max_wait_ms: float | None  # None: batching off
    deployment: Any = None
    operator: Any = None
    pids: list[int] | None = None


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def measure(variant: Variant, concurrency: int, requests: int, max_s: float, warmup: int,
                  base_pids: list[int]) -> dict[str, Any]:
    """One closed-loop measurement of ``variant`` at ``concurrency`` in flight."""
    x = np.random.default_rng(1).standard_normal(1024, dtype=np.float32)
    latencies: list[float] = []
    batches: list[int] = []
    issued = 0
    stop_at = 0.0

    async def one_caller(count: bool) -> None:
        nonlocal issued
        while True:
            if count and (issued >= requests or time.monotonic() > stop_at):
                return
            if not count and issued >= warmup:
                return
            issued += 1
            started = time.perf_counter()
            response = await variant.operator.infer({"x": x}, timeout_s=CALL_TIMEOUT_S)
            if count:
                latencies.append(time.perf_counter() - started)
                batches.append(int(response.parameters["batch"]))

    await asyncio.gather(*(one_caller(False) for _ in range(concurrency)))
    issued = 0
    pids = base_pids + (variant.pids or [])
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    stop_at = started + max_s
    await asyncio.gather(*(one_caller(True) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pids) - cpu_before
    done = len(latencies)
    return {
        "requests": done,
        "req_per_s": done / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
        "cpu_us_per_request": cpu / max(done, 1) * 1e6,
    }


def variant_config(base: Any, variant: Variant) -> Any:
    from pipeline_runner import DeploymentConfig

    data = base.model_dump(mode="json", exclude_none=True)
    data["name"] = f"batching_{variant.key}"
    data["working_dir"] = str(base.root)
    (op,) = data["operators"]
    op.pop("max_batch_size", None)
    if variant.max_wait_ms is None:
        op.pop("batching", None)
    else:
        op["batching"] = {"max_batch_size": MAX_BATCH_SIZE, "max_wait_ms": variant.max_wait_ms}
    return DeploymentConfig.model_validate(data)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline_runner import Connection
    from pipeline_runner.config_loader import load_deployment
    from pipeline_runner.deployment import Deployment
    from pipeline_runner.nats_server import NatsServer

    variants = [Variant("off", "batching off", None)] + [
        Variant(f"wait_{w:g}", f"max_wait_ms {w:g}", w) for w in args.waits
    ]
    base = load_deployment(DEPLOYMENT)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {v.key: {} for v in variants}
    # A NumPy product on one thread, as a GPU call would leave the host's other cores alone.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="batching-bench-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        url = await server.start()
        assert server.pid is not None
        base_pids = [server.pid, os.getpid()]
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(server.stop)
            for variant in variants:
                variant.deployment = Deployment(variant_config(base, variant), nats_url=url, drain_timeout_s=5.0)
                stack.push_async_callback(variant.deployment.stop)
                await variant.deployment.start()
                variant.pids = [w.pid for w in variant.deployment.workers]
                conn = await Connection.connect(url, variant.deployment.config.name, default_timeout_s=CALL_TIMEOUT_S)
                stack.push_async_callback(conn.close)
                variant.operator = conn.operator("matmul")
            for round_ in range(args.rounds):
                for concurrency in args.concurrency:
                    for variant in variants:
                        row = await measure(variant, concurrency, args.requests, args.max_seconds, args.warmup, base_pids)
                        results[variant.key].setdefault(str(concurrency), []).append(row)
                        print(f"round {round_ + 1} {variant.label:>16} at {concurrency:>2} in flight: "
                              f"{row['req_per_s']:7.0f} req/s p50 {row['p50_ms']:6.2f} ms "
                              f"p99 {row['p99_ms']:6.2f} ms batch {row['mean_batch']:5.1f} "
                              f"CPU {row['cpu_us_per_request']:6.0f} µs/req", flush=True)
    return summarize(args, variants, results)


def summarize(args: argparse.Namespace, variants: list[Variant], results: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        rows[variant.key] = {}
        for concurrency, rounds in results[variant.key].items():
            medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            medians["rounds"] = rounds
            rows[variant.key][concurrency] = medians
    table = Table(title="dynamic batching: batched_matmul (1024x1024 float32, 2 ms per call), medians")
    for column in ("variant", "in flight", "req/s", "× off", "p50 ms", "p99 ms", "mean batch", "CPU µs/req"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    ratios = []
    for concurrency in map(str, args.concurrency):
        off = rows["off"][concurrency]
        for variant in variants:
            row = rows[variant.key][concurrency]
            ratio = row["req_per_s"] / off["req_per_s"]
            ratios.append({"variant": variant.key, "concurrency": int(concurrency), "req_per_s_vs_off": ratio,
                           "p50_vs_off": row["p50_ms"] / off["p50_ms"]})
            table.add_row(variant.label, concurrency, f"{row['req_per_s']:.0f}", f"{ratio:.2f}",
                          f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['mean_batch']:.1f}",
                          f"{row['cpu_us_per_request']:.0f}")
    Console(width=160).print(table)
    return {
        "command": sys.argv,
        "max_batch_size": MAX_BATCH_SIZE,
        "labels": {v.key: v.label for v in variants},
        "rows": rows,
        "ratios": ratios,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--waits", type=float, nargs="+", default=[1, 5, 10], help="max_wait_ms of the batching variants")
    parser.add_argument("--requests", type=int, default=1500, help="most requests per measurement")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="longest one measurement runs")
    parser.add_argument("--warmup", type=int, default=100, help="requests before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements per variant and concurrency")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (few requests, 1 and 8 in flight)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.max_seconds, args.warmup, args.rounds = [1, 8], 60, 2.0, 10, 1
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
