"""Data-plane bandwidth and the inline threshold, side by side in one run.

1. Bandwidth for 1 KiB ... 256 MiB (powers of 4), one transfer at a time between two processes:
   - runner data plane: ``DataPlane.fetch`` of a tensor another process published,
   - raw ucxx (the fastest plain-ucxx exchange found, see ucx_raw.py), the same without the cma
     transport (which the runner leaves out, see data_plane/ucx_lib.py), and ucxx's asyncio API,
   - inline NATS: a nats-py request answered with the bytes (server max_payload raised to 64 MiB;
     larger sizes cannot travel inline at all).
2. The inline threshold: p50 latency of a whole request through a ``CopyEcho`` operator (the
   worker reads the input, answers with a copy) with every tensor inline against every tensor
   over the data plane; the threshold picked is the largest size where inline is still faster.

    python benchmarks/data_plane.py [--max-size 268435456] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ucx_raw import (  # noqa: E402
    _human,
    _sizes,
    raw_ucxx_async_bandwidth,
    raw_ucxx_bandwidth,
    raw_ucxx_no_cma_bandwidth,
)

from pipeline_runner import Connection, DeploymentConfig  # noqa: E402
from pipeline_runner.config import DataPlaneConfig  # noqa: E402
from pipeline_runner.data_plane.plane import DataPlane  # noqa: E402
from pipeline_runner.deployment import Deployment  # noqa: E402
from pipeline_runner.nats_server import find_nats_server  # noqa: E402
from pipeline_runner.protocol import RemoteTensor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIN_SECONDS = 0.2

PRODUCER = """
import asyncio, json, sys
import msgspec
import numpy as np
from pipeline_runner.data_plane.plane import DataPlane
async def main():
    plane = DataPlane()
    descriptors = []
    for size in json.loads(sys.argv[1]):
        desc = await plane.publish("t", np.ones(size, np.uint8), lease_s=3600)
        descriptors.append(msgspec.to_builtins(desc))
    print(json.dumps(descriptors), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await plane.stop()
asyncio.run(main())
"""

NATS_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    blobs = {}
    async def answer(msg):
        size = int(msg.data)
        blob = blobs.setdefault(size, b"x" * size)
        await msg.respond(blob)
    await nc.subscribe("bench.blob", cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _repeats(repeats: int, seconds: float) -> int:
    return max(repeats, int(MIN_SECONDS / max(seconds, 1e-7)))


async def runner_bandwidth(sizes: list[int], repeats: int) -> dict[int, float]:
    """GiB/s of DataPlane.fetch from a producer process."""
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, json.dumps(sizes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert producer.stdout is not None and producer.stdin is not None
    descriptors = [msgspec.convert(d, RemoteTensor) for d in json.loads(producer.stdout.readline())]
    plane = DataPlane()
    results: dict[int, float] = {}
    try:
        for size, desc in zip(sizes, descriptors):
            started = time.perf_counter()
            await plane.fetch(desc)  # warm-up, and a first timing
            n = _repeats(repeats, time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(n):
                await plane.fetch(desc)
            results[size] = size * n / (time.perf_counter() - started) / 2**30
    finally:
        await plane.stop()
        producer.stdin.close()
        producer.wait(timeout=30)
    return results


async def nats_inline_bandwidth(sizes: list[int], repeats: int, workdir: Path) -> dict[int, float]:
    """GiB/s of NATS request/reply carrying the bytes in the reply (sizes up to 64 MiB)."""
    import nats

    conf = workdir / "nats.conf"
    conf.write_text("max_payload: 67108864\nmax_pending: 268435456\n")
    server = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", "-1", "-c", str(conf), "--ports_file_dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ports = workdir / f"nats-server_{server.pid}.ports"
    while not ports.exists():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    url = json.loads(ports.read_text())["nats"][0]
    responder = subprocess.Popen([sys.executable, "-c", NATS_RESPONDER, url], stdout=subprocess.PIPE, text=True)
    assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
    nc = await nats.connect(url, max_outstanding_pings=10, pending_size=1 << 30)
    results: dict[int, float] = {}
    try:
        for size in sizes:
            if size > 64 * 2**20 - 1024:
                continue
            request = str(size).encode()
            started = time.perf_counter()
            await nc.request("bench.blob", request, timeout=60)
            n = _repeats(repeats, time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(n):
                await nc.request("bench.blob", request, timeout=60)
            results[size] = size * n / (time.perf_counter() - started) / 2**30
    finally:
        await nc.close()
        responder.kill()
        server.kill()
    return results


async def request_latency(threshold: int, sizes: list[int], requests: int) -> dict[int, float]:
    """p50 ms of a CopyEcho request per size, with the given inline threshold everywhere."""
    data_plane = {"inline_threshold_bytes": threshold}
    config = DeploymentConfig.model_validate(
        {
            "name": "bench_threshold",
            "working_dir": str(REPO),
            "data_plane": data_plane,
            "operators": [{"name": "copy", "implementation": "operators.echo.echo:CopyEcho"}],
        }
    )
    deployment = Deployment(config)
    await deployment.start()
    results: dict[int, float] = {}
    try:
        assert deployment.nats_url is not None
        async with await Connection.connect(
            deployment.nats_url, config.name, data_plane=DataPlaneConfig(**data_plane)
        ) as conn:
            copy = conn.operator("copy")
            for size in sizes:
                x = np.ones(size, np.uint8)
                latencies = []
                for i in range(requests + 20):
                    started = time.perf_counter()
                    response = await copy.infer({"x": x})
                    await response.array("x")
                    response.release()
                    if i >= 20:
                        latencies.append(time.perf_counter() - started)
                results[size] = float(np.percentile(latencies, 50) * 1000)
    finally:
        await deployment.stop()
    return results


def pick_threshold(inline_ms: dict[int, float], remote_ms: dict[int, float]) -> int:
    """The largest size up to which inline is not slower than the data plane."""
    best = 0
    for size in sorted(inline_ms):
        if inline_ms[size] <= remote_ms[size]:
            best = size
        else:
            break
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-size", type=int, default=256 * 2**20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("PIPELINE_RUNNER_STATE_DIR", tempfile.mkdtemp(prefix="pr-bench-"))
    workdir = Path(tempfile.mkdtemp(prefix="pr-bench-nats-"))

    sizes = _sizes(args.max_size)
    columns: dict[str, dict[int, float]] = {
        "runner data plane": await runner_bandwidth(sizes, args.repeats),
        "raw ucxx": await raw_ucxx_bandwidth(sizes, args.repeats),
        "raw ucxx, no cma": await raw_ucxx_no_cma_bandwidth(sizes, args.repeats),
        "raw ucxx (asyncio API)": await raw_ucxx_async_bandwidth(sizes, args.repeats),
        "inline NATS": await nats_inline_bandwidth(sizes, args.repeats, workdir),
    }
    table = Table(title=f"bandwidth, GiB/s ({os.cpu_count()} CPUs, one transfer at a time)")
    table.add_column("size", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("runner / raw", justify="right")
    table.add_column("runner / NATS", justify="right")
    for size in sizes:
        row = [_human(size)] + [f"{columns[n][size]:.3f}" if size in columns[n] else "n/a" for n in columns]
        runner, raw, inline = (columns[n].get(size) for n in ("runner data plane", "raw ucxx", "inline NATS"))
        row.append(f"{runner / raw:.2f}" if runner and raw else "")
        row.append(f"{runner / inline:.1f}" if runner and inline else "")
        table.add_row(*row)
    Console(width=160).print(table)

    latency_sizes = [s for s in _sizes(4 * 2**20) if s >= 1024]
    inline_ms = await request_latency(256 * 2**20, [s for s in latency_sizes if s <= 512 * 1024], args.latency_requests)
    remote_ms = await request_latency(0, list(inline_ms), args.latency_requests)
    threshold = pick_threshold(inline_ms, remote_ms)
    table = Table(title="CopyEcho request p50 latency, ms: inline vs data plane")
    for name in ("size", "inline", "data plane"):
        table.add_column(name, justify="right")
    for size in inline_ms:
        table.add_row(_human(size), f"{inline_ms[size]:.3f}", f"{remote_ms[size]:.3f}")
    Console(width=160).print(table)
    print(f"threshold picked: inline up to {threshold} bytes ({_human(threshold)})")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "bandwidth_gib_s": {n: {str(k): v for k, v in c.items()} for n, c in columns.items()},
                    "latency_ms": {"inline": inline_ms, "data_plane": remote_ms},
                    "threshold_bytes": threshold,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    asyncio.run(main())
