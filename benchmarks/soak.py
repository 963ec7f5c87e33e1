"""Soak: hello_world at a fixed, moderate rate for minutes; does anything grow without bound?

A deployment (default ``deployments/hello_world_python.yaml``) runs in this process, driven at
``--rate`` requests per second (every ``--large-every``-th request large enough to go through the
data plane), every answer checked. Every ``--sample-s`` seconds it records, per process (each
worker, the HTTP ingress, nats-server and this caller): resident memory and open file descriptors
(from /proc); per worker (its stats): asyncio tasks, requests unfinished, calls open and tensors
held in its data-plane store; per JetStream work queue: messages and bytes waiting.

Each series is judged once the first ``--warmup-s`` seconds are past: the median of its last half
against the median of its first half. A series grows when the difference passes its tolerance
(absolute plus relative to the level, by kind: see ``TOLERANCES``). Once the load stops, every
store, queue and count of unfinished work must be back to zero. The exit status is 0 when every
series levels off, every request was answered correctly and everything drained, 1 otherwise.

Writes a table to stdout and, on request, JSON (``--json``), the samples as CSV (``--csv``) and
a plot (``--png``, needs matplotlib: ``pip install -e '.[bench]'``).

    python benchmarks/soak.py --minutes 20 --json benchmarks/results/soak.json \\
        --csv benchmarks/results/soak.csv --png benchmarks/results/soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from process_cpu import TreeCpu  # noqa: E402

DEFAULT_DEPLOYMENT = REPO / "deployments" / "hello_world_python.yaml"
# How long, after the load stops, stores and queues may take to empty: the caller's timeout plus
# the data plane's lease grace and sweep.
DRAIN_EXTRA_S = 8.0


@dataclass(frozen=True)
class Tolerance:
    """How much a series may rise between the medians of its halves: ``absolute + relative * level``."""

    absolute: float
    relative: float = 0.0

    def allowed(self, level: float) -> float:
        return self.absolute + self.relative * abs(level)


# By the series' kind (the part of its name before the colon).
TOLERANCES: dict[str, Tolerance] = {
    "rss_mib": Tolerance(2.0, 0.02),
    "fds": Tolerance(2.0),
    "tasks": Tolerance(16.0, 0.1),
    "unfinished": Tolerance(16.0),
    "open_calls": Tolerance(16.0),
    "stored_tensors": Tolerance(16.0),
    "stored_mib": Tolerance(8.0),
    "stream_msgs": Tolerance(32.0),
    "stream_kib": Tolerance(1024.0),
}
# Kinds that must be back at zero once the load has stopped and leases ran out.
MUST_DRAIN = ("unfinished", "open_calls", "stored_tensors", "stream_msgs")


@dataclass
class Verdict:
    """Whether one series levelled off."""

    series: str
    samples: int
    first_half_median: float
    last_half_median: float
    growth: float
    allowed: float
    slope_first_per_min: float
    slope_last_per_min: float
    last: float
    grows: bool


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    t = np.array([p[0] for p in points])
    v = np.array([p[1] for p in points])
    if np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, v, 1)[0] * 60.0)


def judge(name: str, points: list[tuple[float, float]], warmup_s: float) -> Verdict:
    """Judge one series of ``(seconds since start, value)`` points (see the module docstring)."""
    kind = name.split(":", 1)[0]
    tolerance = TOLERANCES.get(kind, Tolerance(0.0, 0.05))
    judged = [p for p in points if p[0] >= warmup_s] or points
    half = len(judged) // 2
    first, last = judged[:half] or judged, judged[half:]
    first_median = statistics.median(v for _, v in first)
    last_median = statistics.median(v for _, v in last)
    growth = last_median - first_median
    allowed = tolerance.allowed(first_median)
    return Verdict(
        series=name,
        samples=len(judged),
        first_half_median=first_median,
        last_half_median=last_median,
        growth=growth,
        allowed=allowed,
        slope_first_per_min=_slope_per_min(first),
        slope_last_per_min=_slope_per_min(last),
        last=judged[-1][1],
        grows=growth > allowed,
    )


# --- the load --------------------------------------------------------------------------------


@dataclass
class LoadTally:
    """What happened to the requests the driver sent."""

    sent: int = 0
    ok: int = 0
    wrong: int = 0
    failed: int = 0
    timed_out: int = 0
    not_sent_in_flight_cap: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ended(self) -> int:
        return self.ok + self.wrong + self.failed + self.timed_out

    def summary(self) -> dict[str, Any]:
        ms = np.array(self.latencies_s or [0.0]) * 1000
        return {
            "sent": self.sent,
            "ok": self.ok,
            "wrong": self.wrong,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "lost": self.sent - self.ended,
            "not_sent_in_flight_cap": self.not_sent_in_flight_cap,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
            "errors": dict(self.errors.most_common(5)),
        }


async def drive(
    operator: Any, *, rate: float, until: float, inputs: list[np.ndarray], timeout_s: float,
    max_in_flight: int, tally: LoadTally,
) -> None:  # fmt: skip
    """Start a request every ``1 / rate`` seconds until ``until``; wait for all to end."""
    from pipeline_runner.errors import RequestTimeoutError, RunnerError

    async def one(expected: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            response = await operator.infer({"input": expected}, timeout_s=timeout_s)
            try:
                got = await response.array("output")
            finally:
                response.release()
        except RequestTimeoutError as exc:
            tally.timed_out += 1
            tally.errors[f"timeout: {exc}"[:200]] += 1
        except RunnerError as exc:
            tally.failed += 1
            tally.errors[str(exc)[:200]] += 1
        else:
            if got.dtype == expected.dtype and np.array_equal(got, expected):
                tally.ok += 1
                tally.latencies_s.append(time.perf_counter() - started)
            else:
                tally.wrong += 1

    in_flight: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate
    next_at = time.monotonic()
    index = 0
    while time.monotonic() < until:
        if len(in_flight) < max_in_flight:
            task = asyncio.create_task(one(inputs[index % len(inputs)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tally.sent += 1
        else:
            tally.not_sent_in_flight_cap += 1
        index += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if in_flight:
        await asyncio.wait(in_flight)


# --- sampling --------------------------------------------------------------------------------


def _process_sample(pid: int | None) -> tuple[float, int] | None:
    """Resident MiB and open fds of ``pid`` (from /proc), None when it is gone."""
    if pid is None:
        return None
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        process = psutil.Process(pid)
        return process.memory_info().rss / 2**20, process.num_fds()
    return None


class Sampler:
    """Reads every series once per call and keeps ``(t, value)`` points by series name."""

    def __init__(self, deployment: Any, connection: Any, started: float):
        self.deployment = deployment
        self.connection = connection
        self.started = started
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.rows: list[dict[str, float]] = []

    def _processes(self) -> dict[str, int | None]:
        processes: dict[str, int | None] = {w.name: w.pid for w in self.deployment.workers}
        processes.update({p.name: p.pid for p in self.deployment.ingress})
        processes["nats-server"] = self.deployment.state().nats_pid
        processes["caller"] = os.getpid()
        return processes

    async def read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, pid in self._processes().items():
            sample = _process_sample(pid)
            if sample is not None:
                values[f"rss_mib:{name}"], values[f"fds:{name}"] = sample
        workers = len(self.deployment.workers)
        for stats in await self.connection.worker_stats(expected=workers, timeout_s=3.0):
            name = stats["worker"]
            values[f"tasks:{name}"] = stats.get("asyncio_tasks", 0)
            values[f"unfinished:{name}"] = stats["unfinished"]
            values[f"open_calls:{name}"] = stats.get("open_calls", 0)
            values[f"stored_tensors:{name}"] = stats["data_plane"]["stored_tensors"]
            values[f"stored_mib:{name}"] = stats["data_plane"]["stored_bytes"] / 2**20
        caller_store = self.connection.data_plane.store
        values["stored_tensors:caller"] = len(caller_store)
        values["stored_mib:caller"] = caller_store.nbytes / 2**20
        values["open_calls:caller"] = self.connection.plane.open_calls
        values["tasks:caller"] = len(asyncio.all_tasks())
        with contextlib.suppress(Exception):  # no JetStream (every operator at_most_once)
            for info in await self.connection.plane.nats.jsm(timeout=3.0).streams_info():
                values[f"stream_msgs:{info.config.name}"] = info.state.messages
                values[f"stream_kib:{info.config.name}"] = info.state.bytes / 1024
        t = time.monotonic() - self.started
        for name, value in values.items():
            self.series.setdefault(name, []).append((t, float(value)))
        self.rows.append({"t_s": round(t, 2), **values})
        return values


async def wait_drained(sampler: Sampler, timeout_s: float) -> dict[str, float]:
    """Sample until every MUST_DRAIN series reads 0, or ``timeout_s``; the last non-zero ones."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = await sampler.read()
        left = {k: v for k, v in values.items() if k.split(":", 1)[0] in MUST_DRAIN and v}
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(1.0)


# --- output ----------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    columns = ["t_s", *sorted({k for row in rows for k in row} - {"t_s"})]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_png(path: Path, series: dict[str, list[tuple[float, float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("rss_mib", "resident memory (MiB)"),
        ("fds", "open file descriptors"),
        ("tasks", "asyncio tasks"),
        ("stored_tensors", "tensors held in data-plane stores"),
        ("stream_msgs", "messages waiting in JetStream work queues"),
        ("unfinished", "requests unfinished per worker"),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 3.0 * len(panels)), sharex=True)
    for axis, (kind, label) in zip(axes, panels, strict=True):
        for name, points in sorted(series.items()):
            if name.split(":", 1)[0] == kind:
                axis.plot([p[0] / 60 for p in points], [p[1] for p in points], label=name.split(":", 1)[1], lw=1)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=5, loc="upper left")
    axes[-1].set_xlabel("minutes")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def print_report(console: Console, verdicts: list[Verdict], load: dict[str, Any], drain_left: dict[str, float]) -> None:
    table = Table(title="soak: does each series level off? (medians of the judged halves)")
    for column in ("series", "first half", "last half", "growth", "allowed", "slope 1st/min", "slope 2nd/min", "verdict"):
        table.add_column(column, justify="left" if column == "series" else "right")
    for v in sorted(verdicts, key=lambda v: (not v.grows, v.series)):
        table.add_row(
            v.series, f"{v.first_half_median:.1f}", f"{v.last_half_median:.1f}", f"{v.growth:+.2f}",
            f"{v.allowed:.2f}", f"{v.slope_first_per_min:+.2f}", f"{v.slope_last_per_min:+.2f}",
            "[red]GROWS[/red]" if v.grows else "levels off",
        )  # fmt: skip
    console.print(table)
    console.print(f"load: {json.dumps(load)}")
    console.print(f"after the load: {'drained' if not drain_left else f'NOT drained: {drain_left}'}")


# --- main ------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline_runner import Connection
    from pipeline_runner.client import make_inputs
    from pipeline_runner.config_loader import load_deployment
    from pipeline_runner.deployment import Deployment

    phases: dict[str, float] = {}
    phase_started = time.monotonic()

    def phase(name: str) -> None:
        nonlocal phase_started
        now = time.monotonic()
        phases[name] = round(now - phase_started, 2)
        phase_started = now

    config = load_deployment(args.deployment)
    deployment = Deployment(
        config, drain_timeout_s=10.0, http_port=0 if config.http is not None else None,
    )  # fmt: skip
    await deployment.start()
    phase("deploy")
    try:
        assert deployment.nats_url is not None
        connection = await Connection.connect(
            deployment.nats_url, config.name, default_timeout_s=args.timeout_s, data_plane=config.data_plane
        )
        try:
            small = make_inputs(args.size, "int32", 16, seed=1)
            large = make_inputs(args.large_size, "int32", 4, seed=2)
            inputs = [
                large[i % len(large)] if args.large_every and i % args.large_every == 0 else small[i % len(small)]
                for i in range(64)
            ]
            await connection.data_plane.start()
            started = time.monotonic()
            duration_s = args.minutes * 60
            sampler = Sampler(deployment, connection, started)
            roots = [p for p in (*(w.pid for w in deployment.workers), *(p.pid for p in deployment.ingress),
                                 deployment.state().nats_pid, os.getpid()) if p]  # fmt: skip
            cpu = TreeCpu(roots)
            cpu.start()
            tally = LoadTally()
            load = asyncio.create_task(drive(
                connection.operator(args.operator), rate=args.rate, until=started + duration_s, inputs=inputs,
                timeout_s=args.timeout_s, max_in_flight=args.max_in_flight, tally=tally,
            ))  # fmt: skip
            while not load.done():
                await sampler.read()
                if not args.quiet:
                    print(f"  {time.monotonic() - started:7.0f} s  sent {tally.sent}  ok {tally.ok}  "
                          f"failed {tally.failed + tally.timed_out + tally.wrong}", file=sys.stderr, flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(load), timeout=args.sample_s)
            await load
            cpu_s = cpu.stop()
            phase("load")
            loaded_series = {k: list(v) for k, v in sampler.series.items()}
            drain_left = await wait_drained(sampler, args.timeout_s + DRAIN_EXTRA_S)
            phase("drain")
            restarts = {w.name: w.restarts for w in deployment.workers if w.restarts}
        finally:
            await connection.close()
    finally:
        await deployment.stop()
    phase("stop")
    verdicts = [judge(name, points, args.warmup_s) for name, points in loaded_series.items()]
    summary = tally.summary()
    summary["cpu_ms_per_request"] = round(cpu_s * 1000 / max(tally.ended, 1), 3)
    summary["req_per_s"] = round(tally.ended / duration_s, 1)
    ok = (
        not any(v.grows for v in verdicts) and not drain_left and not restarts
        and summary["lost"] == 0 and tally.ended == tally.ok
    )  # fmt: skip
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load": summary,
        "worker_restarts": restarts,
        "phases_s": phases,
        "verdicts": [asdict(v) for v in verdicts],
        "growing": sorted(v.series for v in verdicts if v.grows),
        "not_drained": drain_left,
        "levels_off": not any(v.grows for v in verdicts),
        "ok": ok,
        "rows": sampler.rows,
        "series": sampler.series,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the load runs")
    parser.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    parser.add_argument("--operator", default="encoder_decoder", help="the operator the load calls")
    parser.add_argument("--rate", type=float, default=50.0, help="requests started per second")
    parser.add_argument("--size", type=int, default=1024, help="int32 elements of a small request (inline)")
    parser.add_argument("--large-size", type=int, default=32768, help="int32 elements of a large request (data plane)")
    parser.add_argument("--large-every", type=int, default=4, help="every n-th request is large (0: none)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each request")
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests not started beyond this many in flight")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup-s", type=float, default=None, help="not judged (default: 10%% of the run, 10 s to 120 s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--csv", type=Path, help="write the samples here")
    parser.add_argument("--png", type=Path, help="plot the series here (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args()
    if args.warmup_s is None:
        args.warmup_s = min(max(args.minutes * 6.0, 10.0), 120.0)
    # Its own state directory: the embedded nats-server's files never meet another run's.
    with tempfile.TemporaryDirectory(prefix="soak-") as state:
        os.environ.setdefault("PIPELINE_RUNNER_STATE_DIR", state)
        from pipeline_runner.process import use_fast_event_loop

        use_fast_event_loop()
        report = asyncio.run(soak(args))
    verdicts = [Verdict(**v) for v in report["verdicts"]]
    print_report(Console(width=160), verdicts, report["load"], report["not_drained"])
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in report.items() if k not in ("rows", "series")}, indent=1))
    if args.csv:
        write_csv(args.csv, report["rows"])
    if args.png:
        load = report["load"]
        title = (f"soak: {Path(args.deployment).name}, {args.rate:g} req/s for {args.minutes:g} min, "
                 f"{load['ok']} ok / {load['sent']} sent")  # fmt: skip
        write_png(args.png, report["series"], title)
    print("soak:", "OK: every series levels off, every request answered correctly, all drained"
          if report["ok"] else f"FAILED: growing {report['growing']}, not drained {report['not_drained']}, "
          f"restarts {report['worker_restarts']}, load {report['load']}")  # fmt: skip
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
