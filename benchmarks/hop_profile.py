"""Where the CPU of one hello_world request goes, by category, from py-spy and /proc.

Deploys deployments/hello_world_python.yaml on a private nats-server, runs ``runner client``
against it (on a pseudo-terminal, as a user does) and, while it runs, records one worker of
every stage and the client with ``py-spy record --nonblocking``. Each process's CPU time in the
same window (from /proc) is split over categories in proportion to its samples, and divided by
the requests served in the window; nats-server is one category of its own.

    python benchmarks/hop_profile.py [--concurrency 1] [--seconds 8] [--rate 200] [--json out.json]

Needs py-spy (``pip install py-spy``) and permission to read other processes (root, or
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]

# Frames that say nothing about why the CPU was spent: the caller above them decides.
_TRANSPARENT = ("/numpy/", "/json/", "contextlib.py", "typing.py", "enum.py", "functools.py", "abc.py",
                "/collections/", "<frozen", "copy.py", "struct.py", "weakref.py", "_weakrefset.py")  # fmt: skip
_HEADER_FUNCS = {"encode_message", "_decode", "decode_request", "decode_response", "_split", "_first_error"}
_NATS_SEND = {"publish", "_send_command", "_flush_pending", "_flusher", "_build_message", "respond"}
_NATS_RECV = {"_process_msg", "_wait_for_msgs", "_read_loop", "parse", "_process_info", "_process_pong", "_process_ping"}
KERNEL = "kernel: syscalls (socket send/recv, epoll, wake-ups)"
SYSCALL_CATEGORIES = ("socket writes (asyncio transport)", "socket reads (asyncio transport)", "epoll wait")
_NATS_REQUEST = {"request", "_request_new_style", "_init_request_sub", "_request_old_style", "new_inbox"}


def categorize(stack: list[tuple[str, str]]) -> tuple[str, str]:
    """The category of one sample and the frame that decided it; ``stack`` is (function, file)
    from the root to the leaf."""
    saw_numpy = False  # a NumPy frame below the deciding one
    for func, path in reversed(stack):
        if not any(t in path for t in _TRANSPARENT):
            return _category(func, path, saw_numpy), f"{func} ({os.path.basename(path)})"
        saw_numpy = saw_numpy or "/numpy/" in path
    return _category("", "", saw_numpy), "-"


def _category(qualified: str, path: str, saw_numpy: bool) -> str:
    func = qualified.rsplit(".", 1)[-1]  # py-spy names methods Class.method
    if path:
        name = os.path.basename(path)
        if "/asyncio/" in path or "/uvloop/" in path:
            if name == "selector_events.py" and func in ("write", "_write_ready", "_write_send", "sendto"):
                return "socket writes (asyncio transport)"
            if name == "selector_events.py" and func.startswith("_read_ready"):
                return "socket reads (asyncio transport)"
            if name == "streams.py" or name == "sslproto.py":
                return "socket reads (asyncio transport)"
            return "asyncio scheduling (loop, tasks, futures, queues, wait_for)"
        if name == "selectors.py":
            return "epoll wait"
        if "/pydantic/" in path or "pydantic_core" in path:
            return "pydantic header codec"
        if "/rich/" in path:
            return "progress bar and console (rich)"
        if "/logging/" in path:
            return "logging"
        if name == "secrets.py" or name == "random.py":
            return "request ids (secrets.token_hex)"
        if "/nats/js/" in path or (path.endswith("nats/aio/msg.py") and func in ("ack", "in_progress", "metadata", "_get_metadata_fields")):
            return "JetStream (acks, pulls, metadata)"
        if "/nats/" in path:
            if func in _NATS_SEND:
                return "nats-py publish"
            if func in _NATS_RECV:
                return "nats-py receive and parse"
            if func in _NATS_REQUEST:
                return "nats-py request/inbox"
            return "nats-py other"
        if "pipeline_runner/" in path or "/operators/" in path:
            if name == "work_queue.py":
                return "JetStream (acks, pulls, metadata)"
            if name == "protocol.py":
                return "pydantic header codec" if func in _HEADER_FUNCS else "tensor encode/decode"
            if name == "tensor.py":
                return "tensor encode/decode"
            if "/data_plane/" in path:
                return "data plane"
            if "/kernels/" in path or "/operators/" in path:
                return "operator code and numpy math"
            if name == "client.py":
                return "answer check (numpy.array_equal)" if saw_numpy else "runner client load loop"
            if name == "remote.py":
                return "RemoteOperator.call"
            if name == "request_plane.py":
                return "request plane (streams, journal)"
            if name == "worker.py":
                return "worker serving loop"
            if name == "operator.py":
                return "Request/Response objects"
            if name == "cli.py":
                return "runner client load loop"
            return f"pipeline_runner {name}"
        if name in ("threading.py", "queue.py"):
            return "threads"
        return f"other ({name})"
    return "numpy (no Python caller)" if saw_numpy else "no Python frame"


def parse_raw(text: str) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Samples per category, and per deciding frame within each, from ``py-spy record -f raw``
    output (``frame;frame;... count``)."""
    counts: Counter[str] = Counter()
    frames: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stack = []
        for frame in filter(None, stack_text.split(";")):
            func, _, where = frame.strip().partition(" (")
            stack.append((func, where.rsplit(":", 1)[0]))
        category, frame = categorize(stack)
        counts[category] += int(count)
        frames.setdefault(category, Counter())[frame] += int(count)
    return counts, frames


def _native_category(comm: str, dso: str, sym: str) -> str:
    if "kernel" in dso:
        if any(k in sym for k in ("tcp", "skb", "ip_", "inet", "sock", "loopback", "netif", "napi", "__dev_", "copy_", "memcpy")):
            return "kernel: TCP over loopback (send/recv, copies)"
        if any(k in sym for k in ("epoll", "ep_", "poll")):
            return "kernel: epoll"
        if any(k in sym for k in ("futex", "sched", "switch", "wake", "enqueue", "dequeue", "pick_", "idle", "hrtimer", "timer", "update_", "_raw_spin", "tick", "cpu")):
            return "kernel: scheduling, futex, timers, wake-ups"
        if any(k in sym for k in ("syscall", "entry_", "do_", "__x64", "exit_to_user", "irq")):
            return "kernel: syscall entry/exit, interrupts"
        return "kernel: other"
    if comm == "nats-server":
        if "runtime." in sym[:16] or "internal/runtime" in sym:
            if any(k in sym for k in ("scan", "Scan", "gc", "GC", "mark", "Mark", "sweep", "Sweep", "findObject", "greyobject", "heapBits", "typePointers", "wbBuf", "span", "Span")):
                return "Go runtime: garbage collector"
            if any(k in sym for k in ("malloc", "newobject", "growslice", "makeslice", "memmove", "memclr", "concatstring", "slicebytetostring", "mapassign", "mapaccess", "memHash", "maps.")):
                return "Go runtime: allocation, copies, maps"
            return "Go runtime: scheduler, timers, locks, netpoll"
        if any(k in sym for k in ("syscall.", "internal/poll", "net.(*", "net.")):
            return "Go syscall and net wrappers"
        if any(k in sym.lower() for k in ("jetstream", "stream)", "consumer", "memstore", "filestore", "raft", "(*stream", "(*msgblock", "ack")):
            return "NATS JetStream (streams, consumers, acks)"
        if "nats-server" in sym or "server." in sym:
            return "NATS core (parsing, routing, subscriptions)"
        return "Go other"
    if "pydantic" in dso:
        return "pydantic_core (header codec)"
    if "multiarray" in dso or "numpy" in dso:
        return "NumPy"
    if "python" in dso:
        return "CPython interpreter"
    if "libc" in dso:
        return "libc (malloc, memcpy, ...)"
    return f"other ({dso})"


def perf_categories(text: str) -> dict[str, Any]:
    """Share of each process's samples by category, from ``perf report --sort comm,dso,sym``."""
    by_comm: dict[str, Counter[str]] = {}
    symbols: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%"):
            continue
        pct, comm, dso, sym = float(parts[0].rstrip("%")), parts[1], parts[2], " ".join(parts[3:])
        by_comm.setdefault(comm, Counter())[_native_category(comm, dso, sym)] += pct
        symbols.setdefault(comm, Counter())[f"{dso} {sym}"] += pct
    out: dict[str, Any] = {}
    for comm, counts in by_comm.items():
        total = sum(counts.values())
        out[comm] = {c: round(v / total, 4) for c, v in counts.most_common()}
        out[f"{comm} top symbols"] = {s: round(v / total, 4) for s, v in symbols[comm].most_common(20)}
    return out


def cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``, all its threads."""
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return t.user, t.system
    return 0.0, 0.0


async def served(conn: Any, workers: int) -> int:
    stats = await conn.worker_stats(expected=workers, timeout_s=2.0)
    return sum(s["served"] for s in stats if s["operator"] == "encoder_decoder")


async def profile(args: argparse.Namespace, py_spy: str, workdir: Path) -> dict[str, Any]:
    from pipeline_runner import Connection
    from pipeline_runner.config_loader import load_deployment
    from pipeline_runner.deployment import Deployment
    from pipeline_runner.nats_server import NatsServer

    server = NatsServer(workdir / "nats")
    url = await server.start()
    assert server.pid is not None
    config = load_deployment(REPO / "deployments" / "hello_world_python.yaml").model_copy(update={"http": None})  # the NATS path only: no ingress process, no fixed port
    deployment = Deployment(config, nats_url=url, drain_timeout_s=5.0)
    client: subprocess.Popen[bytes] | None = None
    try:
        await deployment.start()
        conn = await Connection.connect(url, config.name)
        workers = {w.name: w.pid for w in deployment.workers}
        master, slave = pty.openpty()
        client = subprocess.Popen(
            [sys.executable, "-m", "pipeline_runner.cli", "client", "--nats", url, "--deployment", config.name,
             "--requests", "1000000", "--concurrency", str(args.concurrency)],
            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        )  # fmt: skip
        os.close(slave)

        loading = threading.Event()  # set when the client prints that its load test starts

        def drain() -> None:
            seen = b""
            with contextlib.suppress(OSError):
                while chunk := os.read(master, 65536):
                    seen = (seen + chunk)[-4000:]
                    if b" requests to " in seen:
                        loading.set()

        threading.Thread(target=drain, daemon=True).start()
        if not await asyncio.to_thread(loading.wait, 120):
            raise RuntimeError("runner client did not start its load test within 120 s")
        await asyncio.sleep(args.warmup)
        # Every worker (both of a stage, for twice the samples) and the client.
        targets = {**workers, "runner client": client.pid}
        pids = {**{name: pid for name, pid in workers.items()}, "runner client": client.pid, "nats-server": server.pid}
        n0, cpu0 = await served(conn, len(workers)), {k: cpu_s(p) for k, p in pids.items()}
        spies = {
            role: subprocess.Popen(
                [py_spy, "record", "--nonblocking", "-r", str(args.rate), "-d", str(args.seconds), "-f", "raw",
                 "--full-filenames", "-o", str(workdir / f"{role}.txt"), "--pid", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            for role, pid in targets.items()
        }
        perf = None
        if args.perf:
            perf_pids = f"{server.pid},{workers['encoder_decoder.0']}"
            perf = subprocess.Popen(
                ["perf", "record", "-F", "499", "-g", "-p", perf_pids, "-o", str(workdir / "perf.data"),
                 "--", "sleep", str(args.seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for role, spy in spies.items():
            _, err = await asyncio.to_thread(spy.communicate, timeout=args.seconds + 60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy on {role} failed: {err.decode(errors='replace')[-500:]}")
        n1, cpu1 = await served(conn, len(workers)), {k: cpu_s(p) for k, p in pids.items()}
        if perf is not None:
            await asyncio.to_thread(perf.wait, args.seconds + 60)
        await conn.close()
    finally:
        if client is not None:
            client.kill()
            client.wait()
        await deployment.stop()
        await server.stop()
    requests = n1 - n0

    def per_request(key: str, part: int | None = None) -> float:
        spent = [b - a for a, b in zip(cpu0[key], cpu1[key])]
        return (sum(spent) if part is None else spent[part]) / requests * 1e6

    us = {k: per_request(k) for k in pids}
    stages = ("encoder_decoder", "encoder", "decoder")
    user = {s: sum(per_request(k, 0) for k in pids if k.rsplit(".", 1)[0] == s) for s in stages}
    kernel = {s: sum(per_request(k, 1) for k in pids if k.rsplit(".", 1)[0] == s) for s in stages}
    user["runner client"], kernel["runner client"] = per_request("runner client", 0), per_request("runner client", 1)
    processes = {}
    for role in (*stages, "runner client"):
        samples: Counter[str] = Counter()
        frames: dict[str, Counter[str]] = {}
        for name in targets:
            if name.rsplit(".", 1)[0] == role:
                s_, f_ = parse_raw((workdir / f"{name}.txt").read_text())
                samples.update(s_)
                for c, f in f_.items():
                    frames.setdefault(c, Counter()).update(f)
        # Kernel time is known exactly (/proc stime): it is the syscall frames' category. The
        # samples in those frames are not used: on a loaded machine a thread woken from epoll,
        # or preempted in a send that woke its peer, is sampled there while it waits for a CPU.
        in_syscalls = {c: samples.pop(c, 0) for c in SYSCALL_CATEGORIES}
        total = sum(samples.values())
        categories = {c: user[role] * n / total for c, n in samples.most_common()}
        categories[KERNEL] = kernel[role]
        processes[role] = {
            "cpu_us_per_request": user[role] + kernel[role],
            "user_us_per_request": user[role],
            "kernel_us_per_request": kernel[role],
            "samples": total,
            "samples_in_syscall_frames": in_syscalls,
            "categories_us": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_frames": {c: dict(f.most_common(6)) for c, f in frames.items()},
        }
    combined: Counter[str] = Counter()
    for p in processes.values():
        for c, v in p["categories_us"].items():
            combined[c] += v
    combined["nats-server (Go, from /proc)"] = us["nats-server"]
    perf_report: dict[str, Any] = {}
    if args.perf and (workdir / "perf.data").exists():
        text = subprocess.run(
            ["perf", "report", "-i", str(workdir / "perf.data"), "--stdio", "--no-children",
             "--sort", "comm,dso,sym", "-g", "none", "--percent-limit", "0"],
            capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip
        perf_report = perf_categories(text)
    return {
        "perf_nats_and_encoder_decoder": perf_report,
        "concurrency": args.concurrency, "seconds": args.seconds, "rate_hz": args.rate,
        "requests_in_window": requests, "req_per_s": requests / args.seconds,
        "cpu_us_per_request_by_process": us,
        "cpu_us_per_request_total": sum(us.values()),
        "processes": processes, "combined_us": dict(combined.most_common()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=8, help="py-spy recording window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before recording")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--perf", action="store_true", help="also `perf record` nats-server and encoder_decoder.0")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        sys.exit("py-spy not found: pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="pr-hop-profile-"))
    os.environ["PIPELINE_RUNNER_STATE_DIR"] = str(workdir / "state")
    try:
        report = asyncio.run(profile(args, py_spy, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    console = Console(width=140)
    total = report["cpu_us_per_request_total"]
    table = Table(title=f"CPU-µs per hello_world request by category, {args.concurrency} in flight "
                        f"({report['req_per_s']:.0f} req/s, {total:.0f} µs in all processes)")  # fmt: skip
    roles = list(report["processes"])
    for column in ("category", "all", *roles):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category, value in report["combined_us"].items():
        cells = [f"{report['processes'][r]['categories_us'].get(category, 0):.0f}" for r in roles]
        table.add_row(category, f"{value:.0f} ({value / total:.0%})", *cells)
    table.add_row("process total", f"{total:.0f}", *[f"{report['processes'][r]['cpu_us_per_request']:.0f}" for r in roles])
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
