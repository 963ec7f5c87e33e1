"""The cost of one hop, side by side in one run: raw nats-py, the runner's floor, the runner.

Rows (each at every ``--concurrency``, 1024 int32 per request like ``runner client``):

* ``raw_rr``: raw nats-py request/reply, one responder process (core NATS);
* ``raw_js_rr``: the same through a JetStream work queue (PubAck, pull with credit, ack);
* ``raw_chain``: a raw 3-hop chain shaped like hello_world_python (caller -> encoder_decoder,
  which calls encoder then decoder; 2 processes per stage, input_copies 3): the floor of the
  architecture; ``raw_js_chain``: the same through JetStream work queues (the floor with the
  ``at_least_once`` guarantee); ``*_uvloop``: the same processes on uvloop;
* ``echo``: the runner's ``operators/echo`` (one worker) called through ``RemoteOperator``;
* ``hello_world``: deployments/hello_world_python.yaml called through the library, no answer
  check; ``hello_world_amo``: the same with every operator ``at_most_once``;
  ``hello_world_uvloop``: the same file with every worker and the caller on uvloop (through a
  ``sitecustomize`` on PYTHONPATH); workers run on uvloop by default, so ``hello_world_asyncio``
  puts them on asyncio's own loop (``PIPELINE_RUNNER_EVENT_LOOP=asyncio``) for comparison;
  every deployment serves Prometheus metrics (the default); ``hello_world_no_metrics`` is the
  same file with ``metrics: {enabled: false}`` (nothing scrapes during the run);
* ``echo_baseline``, ``hello_world_baseline`` (with ``--baseline PATH``): the same two on the
  code of another checkout (``PYTHONPATH``), for before/after in one run;
* ``hello_world_traced``: the same with tracing on in every worker and the caller (each span
  appended to a JSON-lines file; on request, ``--rows``), beside ``hello_world`` (tracing off);
  ``hello_world_sampled``: the same recording 1 trace in 10 (``OTEL_TRACES_SAMPLER``);
* ``runner_client``: ``runner client`` (a subprocess on a pseudo-terminal, as a user runs it:
  answer checks and progress bar) against hello_world; on request (``--rows``) also
  ``runner_client_no_check`` (``--no-check``), ``runner_client_no_tty`` (output to a pipe,
  so no progress bar is drawn) and ``runner_client_asyncio`` (on asyncio's own loop).

Every row reports req/s, p50, p99 and CPU time per request summed over every process involved
(nats-server, workers or responders, the caller, this process), read from /proc around the
timed section, with the caller's own share apart, and the messages nats-server took in and sent
out per request (its ``/varz`` counters). All deployments run at once on one nats-server and
the rows alternate, ``--rounds`` times; the table shows medians.

    python benchmarks/hop.py [--requests 2000] [--max-seconds 6] [--rounds 2] [--json out.json]
    python benchmarks/hop.py --quick            # a short smoke run
    python benchmarks/hop.py --baseline /tmp/base   # also rows of another checkout's code
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pty
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
PROCESSES = Path(__file__).with_name("hop_processes.py")
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 120.0
SITECUSTOMIZE_UVLOOP = (
    "import asyncio, uvloop\nasyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
)


class NatsMonitor:
    """Message counters of the nats-server, from its monitoring endpoint (``/varz``)."""

    def __init__(self, url: str):
        self.url = url

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/varz", timeout=5) as answer:
            varz = json.load(answer)
        return {k: varz[k] for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}


@dataclass
class Row:
    """One path to measure: who calls, and which processes' CPU counts."""

    key: str
    label: str
    caller: Caller | None = None  # None: runner client, started per measurement
    roles: dict[str, list[int]] = field(default_factory=dict)
    monitor: NatsMonitor | None = None


class Caller:
    """A long-lived hop_processes.py caller, driven one JSON command at a time."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"caller pid {self.pid} exited (code {await self.proc.wait()})")
        return json.loads(line)

    async def command(self, cmd: str, concurrency: int, requests: int, max_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        line = json.dumps({"cmd": cmd, "concurrency": concurrency, "requests": requests, "max_s": max_s})
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        answer = await self.read(max_s + COMMAND_TIMEOUT_S)
        if "error" in answer:
            raise RuntimeError(f"caller pid {self.pid}: {answer['error']}")
        return answer


class Processes:
    """Every child this benchmark starts directly; all are stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def spawn(self, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        from pipeline_runner.process import die_with_parent

        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(PROCESSES), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    async def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(roles: dict[str, list[int]]) -> dict[str, float]:
    """user + system CPU seconds of each role's processes (all their threads), from /proc."""
    out: dict[str, float] = {}
    for role, pids in roles.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        out[role] = total
    return out


def per_request_us(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    return {role: (after[role] - before[role]) / requests * 1e6 for role in before}


async def wait_ready(proc: asyncio.subprocess.Process, what: str) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
    if b"ready" not in line:
        raise RuntimeError(f"{what} (pid {proc.pid}) did not start: exit code {proc.returncode}")


# --- what runs -----------------------------------------------------------------------------


async def start_raw(
    procs: Processes, url: str, prefix: str, mode: str, kinds: dict[str, int], uvloop: bool
) -> dict[str, list[int]]:
    """Raw responders, ``kinds[kind]`` processes each; their pids by kind."""
    started: dict[str, list[asyncio.subprocess.Process]] = {}
    for kind, count in kinds.items():
        for _ in range(count):
            args = ["serve", "--url", url, "--prefix", prefix, "--kind", kind, "--mode", mode]
            started.setdefault(kind, []).append(await procs.spawn(*args, *(["--uvloop"] if uvloop else [])))
    for kind, plist in started.items():
        for proc in plist:
            await wait_ready(proc, f"raw {mode} {kind}")
    return {kind: [p.pid for p in plist] for kind, plist in started.items()}


async def start_caller(procs: Processes, url: str, *args: str, env: dict[str, str] | None = None) -> Caller:
    caller = Caller(await procs.spawn("call", "--url", url, *args, env=env))
    first = await caller.read(START_TIMEOUT_S)
    if first.get("event") != "ready":
        raise RuntimeError(f"caller {args} did not start: {first}")
    return caller


def deployment_roles(deployment: Any) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {}
    for worker in deployment.workers:
        roles.setdefault(worker.spec.operator.name, []).append(worker.pid)
    return roles


def hello_world_variant(base: Any, name: str, mode: str | None, metrics: bool = True) -> Any:
    from pipeline_runner import DeploymentConfig

    data = base.model_dump(mode="json")
    data["name"] = name
    data["working_dir"] = str(base.root)
    data.pop("http", None)  # several copies run at once; they cannot share the file's HTTP port
    data["metrics"]["enabled"] = metrics
    for op in data["operators"]:
        if mode is not None:
            op["delivery"]["mode"] = mode
    return DeploymentConfig.model_validate(data)


async def run_client(
    url: str, deployment: str, concurrency: int, requests: int, roles: dict[str, list[int]], workdir: Path,
    variant: str = "",
) -> dict[str, Any]:
    """``runner client`` on a pseudo-terminal, as a user runs it.

    CPU counts from the line it prints just before its load test starts (after imports and
    connecting) to its exit: its own from wait4, the other processes' from /proc.
    """
    out = workdir / f"client-{concurrency}-{requests}.json"
    args = [
        sys.executable, "-m", "pipeline_runner.cli", "client", "--nats", url, "--deployment", deployment,
        "--requests", str(requests), "--concurrency", str(concurrency), "--json", str(out),
        *(["--no-check"] if variant == "no_check" else []),
    ]  # fmt: skip
    env = dict(os.environ, TERM=os.environ.get("TERM", "xterm-256color"))
    if variant == "asyncio":
        env["PIPELINE_RUNNER_EVENT_LOOP"] = "asyncio"
    # A terminal, as a user has; with variant "no_tty" a pipe (rich then draws no progress bar).
    master, slave = os.pipe() if variant == "no_tty" else pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    watched = {**roles, "caller": [proc.pid]}
    at_start: dict[str, float] = {}
    seen = bytearray()

    def drain() -> None:  # what a terminal does with the output, and the start of the load test
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 65536):
                if not at_start:
                    seen.extend(chunk)
                    if b" requests to " in seen:  # (digits and colours before it)
                        at_start.update(cpu_seconds(watched))
                else:
                    seen[:] = (seen + chunk)[-4000:]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    waiting = asyncio.ensure_future(asyncio.to_thread(os.wait4, proc.pid, 0))
    try:
        # Bounded like every measurement: a client that hangs is killed, and the run fails.
        _, status, usage = await asyncio.wait_for(asyncio.shield(waiting), COMMAND_TIMEOUT_S + requests / 20)
    except BaseException:
        proc.kill()
        await waiting  # reap it
        raise
    finally:
        reader.join(timeout=2.0)
        os.close(master)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    after = cpu_seconds(roles)
    after["caller"] = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0 or not out.exists() or not at_start:
        text = bytes(seen).decode(errors="replace")[-800:]
        raise RuntimeError(f"runner client failed (exit {proc.returncode}): {text}")
    return {
        "summary": json.loads(out.read_text()),
        "cpu_s": {role: after[role] - at_start[role] for role in watched},
        "startup_cpu_s": at_start["caller"],
    }


# --- measuring -----------------------------------------------------------------------------


async def measure_caller_row(row: Row, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    assert row.caller is not None
    await row.caller.command("warm", concurrency, max(args.warmup, concurrency), min(2.0, args.max_seconds))
    roles = {**row.roles, "caller": [row.caller.pid]}
    msgs0 = row.monitor.counts() if row.monitor else {}
    before = cpu_seconds(roles)
    result = await row.caller.command("run", concurrency, args.requests, args.max_seconds)
    after = cpu_seconds(roles)
    msgs1 = row.monitor.counts() if row.monitor else {}
    n = result["requests"]
    return {
        "requests": n, "req_per_s": result["req_per_s"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "cpu_us": per_request_us(before, after, n),
        # Messages into / out of nats-server per request (every process's, background included).
        "nats_msgs_per_request": {k: (msgs1[k] - msgs0[k]) / n for k in msgs0},
    }  # fmt: skip


def client_variant(key: str) -> str:
    return key.removeprefix("runner_client").removeprefix("_")


async def measure_client_row(
    row: Row, concurrency: int, args: argparse.Namespace, url: str, rate: float | None,
    baseline: dict[str, float], workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    # Bounded like the other rows: as many requests as fit in --max-seconds at the library's rate.
    n = args.requests if rate is None else min(args.requests, int(rate * args.max_seconds))
    n = max(n, 4 * concurrency, 10)
    run = await run_client(url, "hello_world_python", concurrency, n, row.roles, workdir, client_variant(row.key))
    summary = run["summary"]
    if summary["ok"] != n:
        raise RuntimeError(f"runner client: {summary['ok']} of {n} ok: {summary['errors']}")
    # What a one-request run costs after its start (its exit, mostly) is taken off each share.
    cpu_us = {role: max(spent - baseline.get(role, 0.0), 0.0) / (n - 1) * 1e6 for role, spent in run["cpu_s"].items()}
    return {
        "requests": n, "req_per_s": summary["throughput_rps"], "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"], "cpu_us": cpu_us,
        "client_startup_cpu_s": run["startup_cpu_s"],
    }  # fmt: skip


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds, with every round's req/s and total CPU kept."""
    totals = [sum(s["cpu_us"].values()) for s in samples]
    roles = samples[0]["cpu_us"].keys()
    return {
        "requests": [s["requests"] for s in samples],
        "req_per_s": statistics.median(s["req_per_s"] for s in samples),
        "req_per_s_runs": [round(s["req_per_s"], 1) for s in samples],
        "p50_ms": statistics.median(s["p50_ms"] for s in samples),
        "p99_ms": statistics.median(s["p99_ms"] for s in samples),
        "cpu_us_per_request": statistics.median(totals),
        "cpu_us_per_request_runs": [round(t) for t in totals],
        "caller_cpu_us_per_request": statistics.median(s["cpu_us"]["caller"] for s in samples),
        "cpu_us_by_process": {r: statistics.median(s["cpu_us"][r] for s in samples) for r in roles},
        **({"client_startup_cpu_s": samples[0]["client_startup_cpu_s"]} if "client_startup_cpu_s" in samples[0] else {}),
        **({"nats_msgs_per_request": {k: statistics.median(s["nats_msgs_per_request"][k] for s in samples)
                                      for k in samples[0]["nats_msgs_per_request"]}}
           if samples[0].get("nats_msgs_per_request") else {}),
    }  # fmt: skip


async def idle_cpu_percent(rows: list[Row], seconds: float) -> dict[str, float]:
    """CPU % of each process role while nothing is measured: background that every row pays."""
    roles: dict[str, list[int]] = {"nats-server": rows[0].roles["nats-server"], "this process": [os.getpid()]}
    for row in rows:
        for role, pids in row.roles.items():
            if role not in roles:
                roles[f"{row.key}:{role}"] = pids
        if row.caller is not None:
            roles[f"{row.key}:caller"] = [row.caller.pid]
    before = cpu_seconds(roles)
    await asyncio.sleep(seconds)
    after = cpu_seconds(roles)
    return {role: round((after[role] - before[role]) / seconds * 100, 2) for role in roles}


def ratios(results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's goals as ratios of this run's rows."""
    out = []

    def add(what: str, num: str, den: str, key: str, goal: str) -> None:
        for c in results.get(num, {}):
            if c in results.get(den, {}):
                a, b = results[num][c][key], results[den][c][key]
                out.append({"what": what, "concurrency": c, "ratio": a / b if b else math.nan, "goal": goal})

    add("echo req/s / raw request/reply req/s", "echo", "raw_rr", "req_per_s", ">= 0.7")
    add("hello_world req/s / raw 3-hop chain req/s", "hello_world", "raw_chain", "req_per_s", ">= 0.5")
    add("hello_world req/s / raw JetStream chain req/s", "hello_world", "raw_js_chain", "req_per_s", "")
    add("hello_world CPU / raw JetStream chain CPU", "hello_world", "raw_js_chain", "cpu_us_per_request", "")
    add("hello_world CPU / raw 3-hop chain CPU", "hello_world", "raw_chain", "cpu_us_per_request", "cut 3x")
    add("hello_world CPU, metrics on / off", "hello_world", "hello_world_no_metrics", "cpu_us_per_request", "")
    add("hello_world req/s, metrics on / off", "hello_world", "hello_world_no_metrics", "req_per_s", "")
    add("echo CPU / --baseline echo CPU", "echo", "echo_baseline", "cpu_us_per_request", "")
    add("hello_world CPU / --baseline hello_world CPU", "hello_world", "hello_world_baseline", "cpu_us_per_request", "")
    add("hello_world req/s / --baseline hello_world req/s", "hello_world", "hello_world_baseline", "req_per_s", "")
    add("hello_world CPU, tracing on / off", "hello_world_traced", "hello_world", "cpu_us_per_request", "")
    add("hello_world CPU, 1 trace in 10 / off", "hello_world_sampled", "hello_world", "cpu_us_per_request", "")
    add("hello_world req/s, tracing on / off", "hello_world_traced", "hello_world", "req_per_s", "")
    add("runner client caller CPU / raw chain caller CPU", "runner_client", "raw_chain", "caller_cpu_us_per_request", "<= 1.5")
    return out


def print_table(results: dict[str, dict[int, dict[str, Any]]], labels: dict[str, str], title: str) -> None:
    table = Table(title=title)
    for column in ("path", "in flight", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "caller", "nats-server", "workers", "CPU runs", "msgs in/out"):
        table.add_column(column, justify="left" if column == "path" else "right", no_wrap=column != "path")
    for key, by_c in results.items():
        for c, r in by_c.items():
            by = r["cpu_us_by_process"]
            workers = sum(v for k, v in by.items() if k not in ("caller", "nats-server", "this process"))
            table.add_row(
                labels[key], str(c), f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                f"{r['cpu_us_per_request']:.0f}", f"{r['caller_cpu_us_per_request']:.0f}",
                f"{by['nats-server']:.0f}", f"{workers:.0f}", " ".join(map(str, r["cpu_us_per_request_runs"])),
                f"{msgs['in_msgs']:.1f}/{msgs['out_msgs']:.1f}" if (msgs := r.get("nats_msgs_per_request")) else "",
            )  # fmt: skip
    Console(width=160).print(table)


# --- main ----------------------------------------------------------------------------------

ALL_ROWS = {
    "raw_rr": "raw nats-py request/reply",
    "raw_rr_uvloop": "raw nats-py request/reply, uvloop",
    "raw_js_rr": "raw JetStream work-queue request/reply",
    "raw_chain": "raw 3-hop chain, core NATS",
    "raw_chain_uvloop": "raw 3-hop chain, core NATS, uvloop",
    "raw_js_chain": "raw 3-hop chain, JetStream work queues",
    "echo": "runner echo operator (at_least_once)",
    "hello_world": "hello_world_python via library",
    "hello_world_amo": "hello_world_python via library, at_most_once",
    "hello_world_uvloop": "hello_world_python via library, uvloop everywhere",
    "hello_world_asyncio": "hello_world_python via library, workers on asyncio's own loop",
    "hello_world_no_metrics": "hello_world_python via library, metrics off",
    "echo_baseline": "runner echo operator, --baseline code",
    "hello_world_baseline": "hello_world_python via library, --baseline code",
    "hello_world_traced": "hello_world_python via library, tracing on (every span to a file)",
    "hello_world_sampled": "hello_world_python via library, tracing on, 1 trace in 10 recorded",
    "runner_client": "runner client -> hello_world_python",
    "runner_client_asyncio": "runner client on asyncio's own loop -> hello_world_python",
    "runner_client_no_check": "runner client --no-check",
    "runner_client_no_tty": "runner client, output to a pipe (no progress bar)",
}
BASELINE_ROWS = ("echo_baseline", "hello_world_baseline")
DEFAULT_ROWS = [
    k for k in ALL_ROWS
    if k not in ("runner_client_no_check", "runner_client_no_tty", "runner_client_asyncio",
                 "hello_world_traced", "hello_world_sampled", *BASELINE_ROWS)
]  # fmt: skip


async def setup(args: argparse.Namespace, keys: list[str], procs: Processes, workdir: Path, stack: contextlib.AsyncExitStack) -> tuple[str, list[Row]]:
    from pipeline_runner import DeploymentConfig
    from pipeline_runner.config_loader import load_deployment
    from pipeline_runner.deployment import Deployment
    from pipeline_runner.nats_server import NatsServer, embedded_max_procs

    monitor_port = free_port()
    # As a deployment's embedded server unless told: its GOMAXPROCS, or Go's own default ("go").
    max_procs = None if args.nats_max_procs == "go" else embedded_max_procs(None if args.nats_max_procs == "auto" else int(args.nats_max_procs))
    server = NatsServer(workdir / "nats", config_text=f"http: 127.0.0.1:{monitor_port}\n", max_procs=max_procs)
    url = await server.start()
    monitor = NatsMonitor(f"http://127.0.0.1:{monitor_port}")
    stack.push_async_callback(server.stop)
    stack.push_async_callback(procs.stop_all)  # before the server stops (last in, first out)
    assert server.pid is not None
    base_roles = {"nats-server": [server.pid], "this process": [os.getpid()]}
    size = ["--size", str(args.size)]
    chain = {"encoder": args.workers, "decoder": args.workers, "encoder_decoder": args.workers}
    rows: list[Row] = []

    async def raw(key: str, prefix: str, mode: str, kinds: dict[str, int], uvloop: bool, target: str) -> None:
        pids = await start_raw(procs, url, prefix, mode, kinds, uvloop)
        caller = await start_caller(procs, url, "--target", target, "--prefix", prefix, *size, *(["--uvloop"] if uvloop else []))
        rows.append(Row(key, ALL_ROWS[key], caller, {**base_roles, **pids}, monitor))

    async def deploy(config: Any, env_extra: dict[str, str] | None = None) -> Any:
        saved = {k: os.environ.get(k) for k in (env_extra or {})}
        os.environ.update(env_extra or {})  # the workers inherit this process's environment
        try:
            deployment = Deployment(config, nats_url=url, drain_timeout_s=5.0)
            stack.push_async_callback(deployment.stop)
            await deployment.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return deployment

    async def library(key: str, config: Any, operator: str, uvloop: bool = False, env: dict[str, str] | None = None) -> Any:
        if uvloop:
            site = workdir / "uvloop-site"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(SITECUSTOMIZE_UVLOOP)
            env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
        deployment = await deploy(config, env)
        caller_env = dict(os.environ, **env) if env else None
        caller = await start_caller(procs, url, "--target", "library", "--deployment", config.name, "--operator", operator, *size, env=caller_env)
        rows.append(Row(key, ALL_ROWS[key], caller, {**base_roles, **deployment_roles(deployment)}, monitor))
        return deployment

    hw_base = load_deployment(REPO / "deployments" / "hello_world_python.yaml").model_copy(update={"http": None})  # the NATS path only: no ingress process, no fixed port
    for key in keys:
        if key == "raw_rr":
            await raw(key, "hop.rr", "core", {"echo": 1}, False, "raw_rr")
        elif key == "raw_rr_uvloop":
            await raw(key, "hop.rru", "core", {"echo": 1}, True, "raw_rr")
        elif key == "raw_js_rr":
            await raw(key, "hop.jsrr", "js", {"echo": 1}, False, "raw_js_rr")
        elif key == "raw_chain":
            await raw(key, "hop.chain", "core", chain, False, "raw_chain")
        elif key == "raw_chain_uvloop":
            await raw(key, "hop.chainu", "core", chain, True, "raw_chain")
        elif key == "raw_js_chain":
            await raw(key, "hop.jschain", "js", chain, False, "raw_js_chain")
        elif key == "echo":
            config = DeploymentConfig.model_validate({
                "name": "hop_echo", "working_dir": str(REPO),
                "operators": [{"name": "echo", "implementation": "operators.echo.echo:Echo", "max_inflight_requests": 128}],
            })  # fmt: skip
            await library(key, config, "echo")
        elif key == "hello_world":
            hw = await library(key, hw_base, "encoder_decoder")
        elif key in BASELINE_ROWS:
            # Another checkout's code, side by side with this one: its package and operators
            # come first on the workers' and the caller's path.
            env = {"PYTHONPATH": str(args.baseline)}
            if key == "echo_baseline":
                config = DeploymentConfig.model_validate({
                    "name": "hop_echo_baseline", "working_dir": str(args.baseline),
                    "operators": [{"name": "echo", "implementation": "operators.echo.echo:Echo", "max_inflight_requests": 128}],
                })  # fmt: skip
                await library(key, config, "echo", env=env)
            else:
                config = hello_world_variant(hw_base, "hw_baseline", None).model_copy(update={"working_dir": str(args.baseline)})
                await library(key, config, "encoder_decoder", env=env)
        elif key == "hello_world_amo":
            await library(key, hello_world_variant(hw_base, "hw_at_most_once", "at_most_once"), "encoder_decoder")
        elif key == "hello_world_uvloop":
            await library(key, hello_world_variant(hw_base, "hw_uvloop", None), "encoder_decoder", uvloop=True)
        elif key == "hello_world_no_metrics":
            await library(key, hello_world_variant(hw_base, "hw_no_metrics", None, metrics=False), "encoder_decoder")
        elif key == "hello_world_asyncio":
            await library(
                key, hello_world_variant(hw_base, "hw_asyncio", None), "encoder_decoder",
                env={"PIPELINE_RUNNER_EVENT_LOOP": "asyncio"},
            )  # fmt: skip
        elif key == "hello_world_traced":
            await library(
                key, hello_world_variant(hw_base, "hw_traced", None), "encoder_decoder",
                env={"PIPELINE_RUNNER_TRACE_FILE": str(workdir / "spans.jsonl")},
            )  # fmt: skip
        elif key == "hello_world_sampled":
            await library(
                key, hello_world_variant(hw_base, "hw_sampled", None), "encoder_decoder",
                env={"PIPELINE_RUNNER_TRACE_FILE": str(workdir / "sampled.jsonl"),
                     "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
            )  # fmt: skip
        elif key.startswith("runner_client"):
            rows.append(Row(key, ALL_ROWS[key], None, {**base_roles, **deployment_roles(hw)}))
    return url, rows


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    keys = [k for k in ALL_ROWS if k in args.rows]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        print("uvloop is not installed: the uvloop rows are left out (pip install uvloop)")
        keys = [k for k in keys if "uvloop" not in k]
    if any(k.startswith("runner_client") for k in keys) and "hello_world" not in keys:
        keys.insert(0, "hello_world")
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM ends the run like Ctrl-C: the task is cancelled and everything started is stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="pr-hop-"))
    os.environ["PIPELINE_RUNNER_STATE_DIR"] = str(workdir / "state")
    procs = Processes()
    results: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in args.concurrency} for k in keys}
    idle: dict[str, float] = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            t0 = time.perf_counter()
            url, rows = await setup(args, keys, procs, workdir, stack)
            setup_s = time.perf_counter() - t0
            everything = {f"{r.key}:{role}": pids for r in rows for role, pids in r.roles.items()}
            everything.update({f"{r.key}:caller": [r.caller.pid] for r in rows if r.caller})
            started_pids = sorted({pid for pids in everything.values() for pid in pids} - {os.getpid()})
            msgs0 = rows[0].monitor.counts() if rows[0].monitor else {}
            idle = await idle_cpu_percent(rows, args.idle_seconds)
            msgs1 = rows[0].monitor.counts() if rows[0].monitor else {}
            idle_msgs_per_s = {k: (msgs1[k] - msgs0[k]) / args.idle_seconds for k in msgs0}
            client_baseline: dict[str, dict[str, float]] = {}
            for round_index in range(args.rounds):
                for concurrency in args.concurrency:
                    for row in rows:
                        if row.caller is not None:
                            sample = await measure_caller_row(row, concurrency, args)
                        else:
                            if row.key not in client_baseline:
                                one = await run_client(url, "hello_world_python", 1, 1, row.roles, workdir, client_variant(row.key))
                                client_baseline[row.key] = one["cpu_s"]
                            rate = results["hello_world"][concurrency][-1]["req_per_s"]
                            sample = await measure_client_row(row, concurrency, args, url, rate, client_baseline[row.key], workdir)
                        results[row.key][concurrency].append(sample)
                        print(
                            f"round {round_index + 1} {row.key:<20} c={concurrency:<3} {sample['req_per_s']:8.0f} req/s "
                            f"{sum(sample['cpu_us'].values()):8.0f} CPU-us/req", flush=True,
                        )  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {k: {c: summarize(s) for c, s in by_c.items()} for k, by_c in results.items()}
    return {
        "config": {
            "size_int32": args.size, "requests_max": args.requests, "max_seconds": args.max_seconds,
            "rounds": args.rounds, "concurrency": args.concurrency, "workers_per_stage": args.workers,
            "cpus": os.cpu_count(), "setup_s": round(setup_s, 1), "nats_max_procs": args.nats_max_procs,
        },
        "idle_cpu_percent": idle,
        "idle_nats_per_s": idle_msgs_per_s,  # background traffic every row's message counts include
        "pids": started_pids,  # every process measured: all stopped by now
        "labels": {k: ALL_ROWS[k] for k in keys},
        "rows": summary,
        "samples": results,
        "ratios": ratios(summary),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=2000, help="most requests per measurement")
    parser.add_argument("--max-seconds", type=float, default=6.0, help="longest one measurement runs")
    parser.add_argument("--warmup", type=int, default=200, help="requests before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements per row and concurrency")
    parser.add_argument("--size", type=int, default=1024, help="int32 elements per request")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="window of the idle (background) CPU reading")
    parser.add_argument("--workers", type=int, default=2, help="processes per stage of the raw chains")
    parser.add_argument("--rows", type=lambda s: s.split(","), default=DEFAULT_ROWS, help=f"comma-separated subset of {','.join(ALL_ROWS)} (default: all but the runner_client_no_* variants)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (few requests, 1 and 8 in flight)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--nats-max-procs", default="auto", help="GOMAXPROCS of the nats-server: auto (what a deployment's embedded server gets), go (Go's default: every CPU) or a number")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. `git worktree add /tmp/base main`): adds its echo and hello_world rows")
    args = parser.parse_args()
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "pipeline_runner").is_dir():
            parser.error(f"--baseline {args.baseline} is not a pipeline_runner checkout")
        args.rows += [k for k in BASELINE_ROWS if k not in args.rows]
    elif set(BASELINE_ROWS) & set(args.rows):
        parser.error(f"rows {', '.join(BASELINE_ROWS)} need --baseline PATH")
    unknown = set(args.rows) - set(ALL_ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ALL_ROWS)}")
    if args.quick:
        args.concurrency, args.requests, args.max_seconds, args.warmup, args.rounds = [1, 8], 200, 1.0, 10, 1
        args.idle_seconds = 1.0
    report = asyncio.run(main_async(args))
    title = f"one hop, {args.size} int32 per request ({os.cpu_count()} CPUs, medians of {args.rounds} rounds)"
    print_table(report["rows"], report["labels"], title)
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
