"""What a typed @endpoint costs: the same JSON request answered by a plain execute() and by an
@endpoint whose pydantic models are checked in the worker (and, for OperatorHandle.request, in
the caller too).

One nats-server, one worker per operator, the client in this process. CPU per request is the
CPU time of the worker serving the operator, the nats-server and this process (from /proc),
summed, over the requests of the measurement.

    python benchmarks/typed_endpoint.py --requests 3000 --json benchmarks/results/typed_endpoint.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from pipeline_runner import BadInputError, Connection, DeploymentConfig, Operator, OperatorHandle, Request, endpoint
from pipeline_runner.deployment import Deployment
from pipeline_runner.nats_server import NatsServer

REPO = Path(__file__).resolve().parent.parent


class GreetRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    times: int = Field(1, ge=1, le=10)
    tags: list[str] = Field(default_factory=list, max_length=8)


class Greeting(BaseModel):
    text: str
    tags: list[str]


class PlainGreeter(Operator):
    """The same checks written by hand against request.parameters."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            p = request.parameters
            name, times, tags = p.get("name"), p.get("times", 1), p.get("tags", [])
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise BadInputError("name must be a string of 1 to 64 characters")
            if not isinstance(times, int) or not 1 <= times <= 10:
                raise BadInputError("times must be an integer from 1 to 10")
            if not isinstance(tags, list) or len(tags) > 8 or not all(isinstance(t, str) for t in tags):
                raise BadInputError("tags must be a list of up to 8 strings")
            await request.respond(parameters={"text": " ".join([f"hello {name}"] * times), "tags": tags})


class TypedGreeter(Operator):
    @endpoint
    async def greet(self, request: GreetRequest) -> Greeting:
        return Greeting(text=" ".join([f"hello {request.name}"] * request.times), tags=request.tags)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(call: Callable[[], Awaitable[Any]], requests: int, concurrency: int, pids: list[int]) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    remaining = iter(range(requests))
    latencies: list[float] = []

    async def lane() -> None:
        for _ in remaining:
            started = loop.time()
            await call()
            latencies.append(loop.time() - started)

    cpu_before = sum(_cpu_s(pid) for pid in pids)
    started = loop.time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = loop.time() - started
    cpu = sum(_cpu_s(pid) for pid in pids) - cpu_before
    latencies.sort()
    return {
        "req_per_s": requests / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "cpu_us_per_req": cpu / requests * 1e6,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements per path")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    os.environ.setdefault("PIPELINE_RUNNER_STATE_DIR", tempfile.mkdtemp(prefix="pr-bench-"))
    server = NatsServer(Path(os.environ["PIPELINE_RUNNER_STATE_DIR"]) / "nats")
    url = await server.start()
    here = Path(__file__).resolve().relative_to(REPO)
    config = DeploymentConfig.model_validate({
        "name": "typed_bench",
        "working_dir": str(REPO),
        "operators": [
            {"name": "plain", "implementation": f"{here}:PlainGreeter", "max_inflight_requests": 64},
            {"name": "typed_greeter", "implementation": f"{here}:TypedGreeter", "max_inflight_requests": 64},
        ],
    })  # fmt: skip
    deployment = Deployment(config, nats_url=url)
    rows: list[dict[str, Any]] = []
    params = {"name": "ada", "times": 2, "tags": ["a", "b"]}
    try:
        await deployment.start()
        conn = await Connection.connect(url, "typed_bench")
        worker_pid = {w.spec.operator.name: w.pid for w in deployment.workers}
        assert server.pid is not None
        handle = OperatorHandle(TypedGreeter, connection=conn)
        paths: dict[str, tuple[str, Callable[[], Awaitable[Any]]]] = {
            "plain execute, JSON call": ("plain", lambda: conn.operator("plain").infer(parameters=params)),
            "@endpoint, JSON call": ("typed_greeter", lambda: conn.operator("typed_greeter").infer(parameters=params)),
            "@endpoint, OperatorHandle.request": ("typed_greeter", lambda: handle.request(GreetRequest(**params))),
        }
        for _, call in paths.values():  # warm-up, and every path answers alike
            await _measure(call, 300, 8, [os.getpid()])
        plain = (await conn.operator("plain").infer(parameters=params)).parameters
        assert plain == (await handle.request(GreetRequest(**params))).model_dump() == {"text": "hello ada hello ada", "tags": ["a", "b"]}
        for concurrency in args.concurrency:
            samples: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
            for _ in range(args.rounds):
                for path, (operator, call) in paths.items():
                    pids = [os.getpid(), server.pid, worker_pid[operator]]
                    samples[path].append(await _measure(call, args.requests, concurrency, pids))  # type: ignore[list-item]
            for path, runs in samples.items():
                rows.append({
                    "path": path,
                    "concurrency": concurrency,
                    **{key: statistics.median(r[key] for r in runs) for key in ("req_per_s", "p50_ms", "cpu_us_per_req")},
                    "req_per_s_runs": [r["req_per_s"] for r in runs],
                })  # fmt: skip
        await conn.close()
    finally:
        await deployment.stop()
        await server.stop()

    table = Table(title=f"typed @endpoint vs plain execute, one JSON request ({os.cpu_count()} CPUs, medians of {args.rounds})")
    for column in ("path", "concurrency", "req/s", "p50 ms", "CPU µs/req", "req/s vs plain", "CPU vs plain"):
        table.add_column(column, justify="left" if column == "path" else "right", no_wrap=True)
    base = {r["concurrency"]: r for r in rows if r["path"].startswith("plain")}
    for r in rows:
        b = base[r["concurrency"]]
        table.add_row(
            r["path"], str(r["concurrency"]), f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['cpu_us_per_req']:.0f}",
            f"{r['req_per_s'] / b['req_per_s']:.2f}", f"{r['cpu_us_per_req'] / b['cpu_us_per_req']:.2f}",
        )  # fmt: skip
    Console(width=140).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"requests": args.requests, "rounds": args.rounds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
