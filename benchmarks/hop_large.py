"""Large tensors through hello_world, next to the raw ucxx + NumPy floor, in one run.

Rows (each at every ``--concurrency``; ``--size`` int32 per request, default 2 Mi = 8 MiB):

* ``raw_floor``: plain ucxx between a caller and ``--lanes`` encoder -> decoder pairs, with the same
  NumPy kernels (benchmarks/hop_large_processes.py): the bytes hello_world moves per request
  (the input to the encoder, 3 copies to the decoder, 1 copy back: 8 + 24 + 8 MiB at 8 MiB)
  and the same compute, without NATS, operators or the runner's data plane;
* ``hello_world``: deployments/hello_world_python.yaml (2 workers per stage) called through the
  library; the caller fetches every answer;
* ``hello_world_ungated``: the same with ``data_plane.parallel_fetches: 1024`` in every
  worker (every fetch at once, as before the fetch gate).

Before and after a change: run it once more with ``PYTHONPATH`` set to a checkout of the code
before it (``git worktree add --detach /tmp/before main``) and ``--rows raw_floor,hello_world``;
every process then imports that code, and the floor row of each run is the yardstick.

Each row reports req/s, p50, p99 and CPU time per request summed over every process involved
(from /proc around the timed section; nats-server and this process included for the library
rows). Rows alternate, ``--rounds`` times; the table shows medians, then the issue's goals as
ratios of this run (hello_world req/s >= 0.6x the floor; p99 <= 3x p50 at 8 in flight).

    python benchmarks/hop_large.py [--size 2097152] [--requests 200] [--max-seconds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hop import Processes, cpu_seconds, deployment_roles, per_request_us, summarize

REPO = Path(__file__).resolve().parents[1]
PROCESSES = Path(__file__).with_name("hop_large_processes.py")
PREFIX = b"@@ "
START_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 180.0

ROWS = {
    "raw_floor": "raw ucxx + NumPy chain (the floor)",
    "hello_world": "hello_world_python via library",
    "hello_world_ungated": "hello_world_python, every fetch at once (parallel_fetches 1024)",
}


class Child:
    """A hop_large_processes.py process, spoken to in JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"pid {self.pid} exited (code {await self.proc.wait()})")
                if line.startswith(PREFIX):  # (UCX may print on stdout too)
                    answer: dict[str, Any] = json.loads(line[len(PREFIX) :])
                    if "error" in answer:
                        raise RuntimeError(f"pid {self.pid}: {answer['error']}")
                    return answer

    async def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self.proc.stdin.drain()

    async def run(self, concurrency: int, requests: int, max_s: float) -> dict[str, Any]:
        await self.send(concurrency=concurrency, requests=requests, max_s=max_s)
        return await self.read(max_s + COMMAND_TIMEOUT_S)


async def spawn(procs: Processes, *args: str) -> Child:
    """Started like hop.py's children (own session, dies with this process), by this script."""
    from pipeline_runner.process import die_with_parent

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PROCESSES), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    procs.procs.append(proc)
    return Child(proc)


async def start_raw_floor(procs: Processes, size: int, lanes: int) -> tuple[Child, dict[str, list[int]]]:
    """The caller and ``lanes`` encoder -> decoder pairs, connected in a ring per lane."""
    caller = await spawn(procs, "raw", "--stage", "caller", "--size", str(size))
    pairs = [
        {name: await spawn(procs, "raw", "--stage", name, "--lane", str(lane), "--size", str(size)) for name in ("encoder", "decoder")}
        for lane in range(lanes)
    ]  # fmt: skip
    address = {child.pid: (await child.read(START_TIMEOUT_S))["address"] for child in [caller, *(c for p in pairs for c in p.values())]}
    await caller.send(next=[address[pair["encoder"].pid] for pair in pairs])
    for pair in pairs:
        await pair["encoder"].send(next=[address[pair["decoder"].pid]])
        await pair["decoder"].send(next=[address[caller.pid]])
    for child in [caller, *(c for p in pairs for c in p.values())]:
        await child.read(START_TIMEOUT_S)  # ready
    return caller, {name: [pair[name].pid for pair in pairs] for name in ("encoder", "decoder")}


async def start_library(procs: Processes, url: str, deployment: str, size: int) -> Child:
    caller = await spawn(procs, "library", "--url", url, "--deployment", deployment, "--size", str(size))
    await caller.read(START_TIMEOUT_S)
    return caller


async def measure(caller: Child, roles: dict[str, list[int]], concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    await caller.run(concurrency, max(args.warmup, concurrency), min(3.0, args.max_seconds))
    roles = {**roles, "caller": [caller.pid]}
    before = cpu_seconds(roles)
    result = await caller.run(concurrency, args.requests, args.max_seconds)
    after = cpu_seconds(roles)
    n = result["requests"]
    return {
        "requests": n, "req_per_s": result["req_per_s"], "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"], "cpu_us": per_request_us(before, after, n),
    }  # fmt: skip


def ratios(rows: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for key in ("hello_world", "hello_world_ungated"):
        for c, r in rows.get(key, {}).items():
            floor = rows.get("raw_floor", {}).get(c)
            if floor:
                out.append({"what": f"{key} req/s / floor req/s", "concurrency": c,
                            "ratio": r["req_per_s"] / floor["req_per_s"], "goal": ">= 0.6"})
                out.append({"what": f"{key} CPU / floor CPU", "concurrency": c,
                            "ratio": r["cpu_us_per_request"] / floor["cpu_us_per_request"], "goal": ""})
            if c == 8:
                out.append({"what": f"{key} p99 / p50", "concurrency": c, "ratio": r["p99_ms"] / r["p50_ms"], "goal": "<= 3"})
    return out  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline_runner.config_loader import load_deployment
    from pipeline_runner.deployment import Deployment
    from pipeline_runner.nats_server import NatsServer

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="pr-hop-large-"))
    os.environ["PIPELINE_RUNNER_STATE_DIR"] = str(workdir / "state")
    procs = Processes()
    keys = [k for k in ROWS if k in args.rows]
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in args.concurrency} for k in keys}
    try:
        async with contextlib.AsyncExitStack() as stack:
            server = NatsServer(workdir / "nats")
            url = await server.start()
            stack.push_async_callback(server.stop)
            stack.push_async_callback(procs.stop_all)
            assert server.pid is not None
            base = {"nats-server": [server.pid], "this process": [os.getpid()]}
            rows: dict[str, tuple[Child, dict[str, list[int]]]] = {}
            hw = load_deployment(REPO / "deployments" / "hello_world_python.yaml").model_copy(update={"http": None})
            for key in keys:
                if key == "raw_floor":
                    caller, roles = await start_raw_floor(procs, args.size, args.lanes)
                    rows[key] = (caller, roles)
                    continue
                data = hw.model_dump(mode="json")
                data["name"], data["working_dir"] = key, str(hw.root)
                if key == "hello_world_ungated":
                    data["data_plane"]["parallel_fetches"] = 1024
                config = type(hw).model_validate(data)
                deployment = Deployment(config, nats_url=url, drain_timeout_s=5.0)
                stack.push_async_callback(deployment.stop)
                await deployment.start()
                caller = await start_library(procs, url, key, args.size)
                rows[key] = (caller, {**base, **deployment_roles(deployment)})
            pids = sorted({pid for caller, roles in rows.values() for pid in [caller.pid, *sum(roles.values(), [])]} - {os.getpid()})
            for round_index in range(args.rounds):
                for concurrency in args.concurrency:
                    for key, (caller, roles) in rows.items():
                        sample = await measure(caller, roles, concurrency, args)
                        samples[key][concurrency].append(sample)
                        print(
                            f"round {round_index + 1} {key:<20} c={concurrency:<3} {sample['req_per_s']:7.1f} req/s "
                            f"p50 {sample['p50_ms']:8.1f} ms p99 {sample['p99_ms']:8.1f} ms "
                            f"{sum(sample['cpu_us'].values()) / 1000:7.1f} CPU-ms/req", flush=True,
                        )  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {k: {c: summarize(s) for c, s in by_c.items()} for k, by_c in samples.items()}
    return {
        "config": {"size_int32": args.size, "bytes_per_request_moved": args.size * 4 * 5, "requests_max": args.requests,
                   "max_seconds": args.max_seconds, "rounds": args.rounds, "concurrency": args.concurrency,
                   "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "labels": {k: ROWS[k] for k in keys},
        "pids": pids,  # every process measured: all stopped by now
        "rows": summary,
        "samples": samples,
        "ratios": ratios(summary),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--size", type=int, default=2 << 20, help="int32 elements per request (default 8 MiB)")
    parser.add_argument("--requests", type=int, default=200, help="most requests per measurement")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="longest one measurement runs")
    parser.add_argument("--warmup", type=int, default=8, help="requests before each measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lanes", type=int, default=2, help="encoder -> decoder pairs of the floor (hello_world: 2 workers per stage)")
    parser.add_argument("--rows", type=lambda s: s.split(","), default=list(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if unknown := set(args.rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    report = asyncio.run(main_async(args))
    table = Table(title=f"large tensors: {args.size * 4 / 2**20:g} MiB int32 in, hello_world's bytes moved "
                        f"({os.cpu_count()} CPUs, medians of {args.rounds} rounds)")  # fmt: skip
    for column in ("path", "in flight", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "req/s runs"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for key, by_c in report["rows"].items():
        for c, r in by_c.items():
            table.add_row(ROWS[key], str(c), f"{r['req_per_s']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                          f"{r['cpu_us_per_request'] / 1000:.1f}", " ".join(map(str, r["req_per_s_runs"])))  # fmt: skip
    Console(width=160).print(table)
    ratio_table = Table(title="goals as ratios of this run")
    for column in ("ratio", "in flight", "value", "goal"):
        ratio_table.add_column(column, justify="left" if column == "ratio" else "right")
    for r in report["ratios"]:
        ratio_table.add_row(r["what"], str(r["concurrency"]), f"{r['ratio']:.2f}", r["goal"])
    Console(width=160).print(ratio_table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
