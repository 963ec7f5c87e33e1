"""Many large fetches at once between two transports: with and without the fetch gate.

A producer process serves one ``--size`` buffer with ``UcxTransport``; this process fetches it
``--fetches`` times with ``--concurrency`` fetches in flight, each into a pooled receive buffer
(as ``DataPlane.fetch`` does), through a ``FetchGate`` of each ``--gates`` size (1024: no gate).
Gates alternate within each round. Reports fetches/s, p50/p99 of one fetch (from its turn to
its end), and CPU per fetch of consumer and producer (from /proc).

    python benchmarks/fetch_concurrency.py [--size 25165824] [--concurrency 8 64] [--gates 1024 1 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.append(str(Path(__file__).resolve().parents[1]))


async def serve(size: int) -> None:
    from pipeline_runner.data_plane.ucx_transport import UcxTransport

    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    transport = UcxTransport(lambda _: data)
    await transport.start()
    print(transport.address, flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # EOF: done
    await transport.stop()


async def fetch_many(transport: Any, address: str, size: int, concurrency: int, fetches: int, parallel: int) -> dict[str, Any]:
    from pipeline_runner.data_plane.buffers import BufferPool
    from pipeline_runner.data_plane.fetch_gate import FetchGate

    pool, gate = BufferPool(), FetchGate(parallel)
    latencies: list[float] = []

    async def one() -> None:
        async with gate.turn(size, time.monotonic() + 120, "x"):
            out = pool.take(size)
            t0 = time.perf_counter()
            await transport.fetch(address, "x", out, 120.0)
            latencies.append(time.perf_counter() - t0)

    async def lane(count: int) -> None:
        for _ in range(count):
            await one()

    await lane(2)  # warm
    latencies.clear()
    per_lane = max(fetches // concurrency, 1)
    started = time.perf_counter()
    await asyncio.gather(*(lane(per_lane) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"fetches": len(latencies), "per_s": len(latencies) / wall, "gib_per_s": len(latencies) * size / wall / 2**30,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline_runner.data_plane.ucx_transport import UcxTransport

    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", "--size", str(args.size), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    samples: dict[str, list[dict[str, Any]]] = {}
    try:
        address = (await asyncio.wait_for(child.stdout.readline(), 120)).decode().strip()
        producer, consumer = psutil.Process(child.pid), psutil.Process(os.getpid())
        transport = UcxTransport(lambda _: None)
        await transport.start()
        for _ in range(args.rounds):
            for concurrency in args.concurrency:
                for parallel in args.gates:
                    p0, c0 = cpu_s(producer), cpu_s(consumer)
                    result = await fetch_many(transport, address, args.size, concurrency, args.fetches, parallel)
                    n = result["fetches"]
                    result["consumer_cpu_ms"] = (cpu_s(consumer) - c0) / n * 1000
                    result["producer_cpu_ms"] = (cpu_s(producer) - p0) / n * 1000
                    samples.setdefault(f"{concurrency}/{parallel}", []).append(result)
                    print(f"c={concurrency:<3} gate={parallel:<5} {result['per_s']:6.1f}/s p50 {result['p50_ms']:8.1f} ms "
                          f"p99 {result['p99_ms']:8.1f} ms CPU/fetch {result['consumer_cpu_ms']:5.1f} + "
                          f"{result['producer_cpu_ms']:5.1f} ms", flush=True)  # fmt: skip
        await transport.stop()
    finally:
        child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except TimeoutError:
            child.kill()
            await child.wait()
    rows = {key: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for key, runs in samples.items()}
    return {"config": {**vars(args), "json": None, "load_average": os.getloadavg()}, "rows": rows, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=24 << 20, help="bytes per fetch (default 24 MiB, hello_world's encoder output at 8 MiB)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--gates", type=int, nargs="+", default=[1024, 1, 2, 4], help="FetchGate sizes (1024: ungated)")
    parser.add_argument("--fetches", type=int, default=64, help="fetches per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.size))
        return
    report = asyncio.run(main_async(args))
    print(f"\n{'in flight/gate':>15} {'fetch/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/fetch (consumer+producer)':>34}")
    for key, r in report["rows"].items():
        print(f"{key:>15} {r['per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['consumer_cpu_ms'] + r['producer_cpu_ms']:34.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
