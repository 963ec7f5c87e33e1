"""The HTTP front door, side by side in one run, at concurrency 1, 8 and 64 by default.

(a) HTTP:   wrk POSTing an Open Inference Protocol body to the ingress of ``runner deploy``
            (hello_world_python.yaml unless --deployment), /v2/models/encoder_decoder/infer,
            as JSON and with the binary tensor extension (both checked against a plain Triton);
(b) NATS:   ``runner client`` against the same deployment, same input size and dtype;
(c) Ray:    Ray Serve's HTTP proxy on the same pipeline (the peer in ../shared/peers/ray_serve),
            driven by the same wrk (raw int64 body, which is what that app takes) and by the
            peer's own bench.py --http driver; only with --ray-venv PATH (a venv with ray[serve]);
(d) Triton: tritonclient.http calling the hello_world encoder model through the ingress (a
            ``kind: triton`` operator) and on a plain Triton server, one request at a time.

wrk does not look at bodies: a sample of answers is checked separately before each wrk run. CPU
per request is the user + system time of every process of the system under test (from /proc),
and of the load generator, over the timed window. The deployment's ingress is enabled by adding
an ``http:`` section (127.0.0.1, a free port) to a temporary copy of the deployment file.

    python benchmarks/http_ingress.py [--quick] [--ray-venv /work/ray-venv] [--json out.json]
    python benchmarks/http_ingress.py --without-ingress ...   # (b), (c), plain Triton only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import tritonclient.http as httpclient
import yaml
from process_cpu import ChildrenCpu, SelfCpu, TreeCpu
from rich.console import Console
from rich.table import Table
from wrk_load import WrkMissing, run_wrk

from pipeline_runner.client import make_inputs
from pipeline_runner.config_loader import parse_deployment
from pipeline_runner.errors import ConfigError
from pipeline_runner.triton.environment import setup_triton
from pipeline_runner.triton.server import TritonServer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "operators" / "hello_world" / "triton_models"
RAY_PEER = REPO.parent / "shared" / "peers" / "ray_serve"
OIP_DATATYPES = {"int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8",
                 "float32": "FP32", "float64": "FP64"}  # fmt: skip
console = Console(width=160)


class IngressMissing(RuntimeError):
    """This checkout's ``runner deploy`` has no HTTP ingress (no ``http:`` section)."""


@dataclass
class Row:
    part: str
    path: str
    concurrency: int
    requests: int = 0
    req_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu_us: float | None = None  # per request, every process of the system under test
    client_cpu_us: float | None = None  # per request, the load generator
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""
    round_index: int | None = None  # which round measured it (None in a row of medians)
    rounds: int = 1  # how many rounds' measurements the row holds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def per_request_us(cpu_s: float, requests: int) -> float | None:
    return cpu_s / requests * 1e6 if requests else None


# --- a deployment started by `runner deploy`, as a user starts it ----------------------------


def deployment_file(source: Path, workdir: Path, http: dict[str, Any] | None) -> Path:
    """A copy of ``source`` in ``workdir`` with an absolute working_dir and ``http`` (if given)."""
    doc = yaml.safe_load(source.read_text())
    doc["working_dir"] = str((source.parent / doc.get("working_dir", ".")).resolve())
    doc.pop("http", None)
    if http is not None:
        doc["http"] = http
    path = workdir / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def check_ingress(path: Path) -> None:
    """Raise IngressMissing when this checkout cannot validate the ``http:`` section of ``path``."""
    try:
        parse_deployment(path.read_text(), path)
    except ConfigError as exc:
        if any("unknown key 'http'" in problem for problem in exc.problems):
            raise IngressMissing(
                "this checkout has no HTTP ingress yet: `runner deploy` refuses the http: section ("
                + "; ".join(exc.problems)
                + "). Merge the ingress (issue 13), or pass --without-ingress to run only the NATS, "
                "Ray Serve and plain-Triton parts."
            ) from None
        raise


class Deployed:
    """``runner deploy FILE`` in a child process, its output in a log file."""

    def __init__(self, path: Path, workdir: Path, env: dict[str, str]):
        self.path, self.env = path, env
        self.log = workdir / f"{path.stem}.deploy.log"
        self.name = yaml.safe_load(path.read_text())["name"]
        self.proc: asyncio.subprocess.Process | None = None
        self.http_url: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, http_port: int | None, timeout_s: float = 240.0) -> None:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pipeline_runner.cli", "deploy", str(self.path),
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=self.env,
            )  # fmt: skip
        until = time.monotonic() + timeout_s
        while True:
            text = self.log.read_text(errors="replace")
            if self.proc.returncode is not None:
                raise RuntimeError(f"runner deploy {self.path.name} exited ({self.proc.returncode}):\n{text[-3000:]}")
            if "Press Ctrl-C to stop" in text:
                break
            if time.monotonic() > until:
                await self.stop()
                raise RuntimeError(f"runner deploy {self.path.name} not up after {timeout_s:g} s:\n{text[-3000:]}")
            await asyncio.sleep(0.2)
        if http_port is not None:
            printed = re.search(r"HTTP:\s+(http://\S+)", text)
            self.http_url = printed.group(1).rstrip("/") if printed else f"http://127.0.0.1:{http_port}"
            try:
                await wait_ready(self.http_url + "/v2/health/ready", until)
            except BaseException:
                await self.stop()
                raise

    async def stop(self, timeout_s: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: drain, then stop
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def wait_ready(url: str, until: float) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > until:
                raise RuntimeError(f"{url} did not answer 200 in time")
            await asyncio.sleep(0.2)


# --- request bodies, and checking answers (wrk does not) ----------------------------------


@dataclass(frozen=True)
class Wire:
    """How an input array goes into an HTTP request, and how the answer's array is read back."""

    name: str
    request: Callable[[np.ndarray], tuple[dict[str, str], bytes]]  # headers and body
    answer: Callable[[Mapping[str, str], bytes], np.ndarray]


def _oip_json_request(x: np.ndarray) -> tuple[dict[str, str], bytes]:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": OIP_DATATYPES[x.dtype.name], "data": x.tolist()}
    return {"Content-Type": "application/json"}, json.dumps({"inputs": [tensor]}).encode()


def _oip_binary_request(x: np.ndarray) -> tuple[dict[str, str], bytes]:
    """The binary tensor extension: a JSON header, then the raw tensor bytes, both ways."""
    raw = x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": OIP_DATATYPES[x.dtype.name],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return headers, header + raw


def _oip_answer(headers: Mapping[str, str], raw: bytes) -> np.ndarray:
    length = headers.get("Inference-Header-Content-Length")
    header = json.loads(raw if length is None else raw[: int(length)])
    (output,) = [o for o in header["outputs"] if o["name"] == "output"]
    dtype = np.dtype({v: k for k, v in OIP_DATATYPES.items()}[output["datatype"]])
    if length is None:
        values = np.asarray(output["data"], dtype=dtype)
    else:
        values = np.frombuffer(raw[int(length) :], dtype=dtype.newbyteorder("<")).astype(dtype)
    return values.reshape(output["shape"])


OIP_JSON = Wire("OIP JSON", _oip_json_request, _oip_answer)
OIP_BINARY = Wire("OIP binary", _oip_binary_request, _oip_answer)
# The peer's Ray Serve app: the raw little-endian int64 bytes, both ways.
RAY_RAW = Wire(
    "raw int64",
    lambda x: ({"Content-Type": "application/octet-stream"}, x.astype("<i8").tobytes()),
    lambda _, raw: np.frombuffer(raw, dtype="<i8"),
)


async def check_answers(url: str, inputs: list[np.ndarray], wire: Wire) -> list[str]:
    """POST every input once; the problems found (wrong answers, errors), empty when all right."""
    problems = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for x in inputs:
            headers, body = wire.request(x)
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    raw = await response.read()
                    if response.status != 200:
                        problems.append(f"HTTP {response.status}: {raw[:200]!r}")
                        continue
                    got = wire.answer(response.headers, raw)
                if got.dtype != x.dtype or not np.array_equal(got, x):
                    problems.append(f"wrong answer: {got[:4]}... for {x[:4]}...")
            except (aiohttp.ClientError, OSError, ValueError, KeyError, TimeoutError) as exc:
                problems.append(f"{wire.name}: {type(exc).__name__}: {exc}")
    return problems


# --- load levels -----------------------------------------------------------------------------


async def wrk_level(
    part: str, path: str, url: str, request: tuple[dict[str, str], bytes], concurrency: int,
    args: argparse.Namespace, server_pids: list[int], workdir: Path,
) -> Row:
    server, client = TreeCpu(server_pids), ChildrenCpu()
    server.start()
    client.start()
    result = await run_wrk(url, *request, concurrency, args.duration, workdir, args.timeout)
    server_s, client_s = server.stop(), client.stop()
    return Row(
        part, path, concurrency, result.requests, result.req_per_s, result.p50_ms, result.p99_ms,
        per_request_us(server_s, result.requests), per_request_us(client_s, result.requests),
        result.failed, result.errors,
    )  # fmt: skip


async def runner_client_level(
    deployed: Deployed, concurrency: int, requests: int, args: argparse.Namespace, workdir: Path
) -> Row:
    out = workdir / f"client_{concurrency}.json"
    server, client = TreeCpu([deployed.pid]), ChildrenCpu()
    server.start()
    client.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline_runner.cli", "client", "--deployment", deployed.name,
        "--operator", args.operator, "--requests", str(requests), "--concurrency", str(concurrency),
        "--size", str(args.size), "--dtype", args.dtype, "--timeout", str(args.timeout), "--json", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=deployed.env,
    )  # fmt: skip
    _, stderr = await proc.communicate()
    server_s, client_s = server.stop(), client.stop()
    if not out.exists():
        raise RuntimeError(f"runner client failed ({proc.returncode}): {stderr.decode(errors='replace')[-1000:]}")
    summary = json.loads(out.read_text())
    return Row(
        "b", "runner client (NATS)", concurrency, summary["ok"], summary["throughput_rps"],
        summary["latency_ms"]["p50"], summary["latency_ms"]["p99"],
        per_request_us(server_s, summary["ok"]), per_request_us(client_s, summary["ok"]),
        summary["failed"] + summary["timed_out"], summary["errors"],
        note="client CPU includes its start (imports, connect)",
    )  # fmt: skip


# --- (a) + (b): the deployment over HTTP and over NATS --------------------------------------


async def http_and_nats(args: argparse.Namespace, workdir: Path, env: dict[str, str], ingress: bool) -> list[Row]:
    port = free_port() if ingress else None
    http = {"host": "127.0.0.1", "port": port, "workers": args.ingress_workers} if ingress else None
    deployed = Deployed(deployment_file(args.deployment, workdir, http), workdir, env)
    inputs = make_inputs(args.size, args.dtype, count=16)
    rows: list[Row] = []
    console.print(f"(a, b) runner deploy {args.deployment.name}" + (f" with HTTP on port {port}" if ingress else ""))
    await deployed.start(port)
    try:
        url = f"{deployed.http_url}/v2/models/{args.operator}/infer" if ingress else ""
        wires = [OIP_JSON, OIP_BINARY] if ingress else []
        for wire in wires:
            if problems := await check_answers(url, inputs, wire):
                raise RuntimeError(f"the ingress answered wrongly: {problems[:3]}")
            await run_wrk(url, *wire.request(inputs[0]), 8, 1, workdir, args.timeout)  # warm-up
        if not ingress:
            await runner_client_level(deployed, 8, 100, args, workdir)  # warm-up
        for concurrency in args.concurrency:  # the paths alternate: the machine drifts
            for wire in wires:
                console.print(f"  wrk -c{concurrency} {url} ({wire.name})")
                rows.append(await wrk_level(
                    "a", f"wrk -> ingress ({wire.name})", url, wire.request(inputs[0]), concurrency, args,
                    [deployed.pid], workdir,
                ))  # fmt: skip
            console.print(f"  runner client --concurrency {concurrency}")
            rows.append(await runner_client_level(deployed, concurrency, args.requests, args, workdir))
        for wire in wires:
            if problems := await check_answers(url, inputs, wire):
                raise RuntimeError(f"the ingress answered wrongly after the load: {problems[:3]}")
    finally:
        await deployed.stop()
    return rows


# --- (c): Ray Serve's HTTP proxy -----------------------------------------------------------


async def ray_serve(args: argparse.Namespace, workdir: Path, first_round: bool) -> list[Row]:
    python = args.ray_venv / "bin" / "python"
    rows = await ray_with_wrk(python, args, workdir)
    if first_round:  # a check of the load generator, not part of the comparison: once is enough
        rows += await ray_with_its_driver(python, args, workdir)
    return rows


async def ray_with_wrk(python: Path, args: argparse.Namespace, workdir: Path) -> list[Row]:
    port = free_port()
    console.print(f"(c) Ray Serve hello_world, HTTP proxy on port {port} (takes ~15 s to start)")
    proc = await asyncio.create_subprocess_exec(
        str(python), str(REPO / "benchmarks" / "ray_serve_host.py"), "--peer", str(args.ray_peer),
        "--port", str(port), "--replicas", str(args.ray_replicas),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    rows: list[Row] = []
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 180)).decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"Ray Serve did not come up: {line!r}")
        url = line.split()[1] + f"?input_copies={args.input_copies}"
        inputs = make_inputs(args.size, "int64", count=16)
        if problems := await check_answers(url, inputs, RAY_RAW):
            raise RuntimeError(f"Ray Serve answered wrongly: {problems[:3]}")
        await run_wrk(url, *RAY_RAW.request(inputs[0]), 8, 1, workdir, args.timeout)  # warm-up
        for concurrency in args.concurrency:
            console.print(f"  wrk -c{concurrency} {url}")
            rows.append(await wrk_level(
                "c", f"wrk -> Ray Serve proxy ({RAY_RAW.name})", url, RAY_RAW.request(inputs[0]), concurrency,
                args, [proc.pid], workdir,
            ))  # fmt: skip
    finally:
        proc.stdin.close()  # the host shuts Ray down and reaps its processes
        try:
            await asyncio.wait_for(proc.wait(), 90)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return rows


async def ray_with_its_driver(python: Path, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """The peer's bench.py --http (its aiohttp driver checks every answer); no CPU figures."""
    out = workdir / "ray_bench.json"
    replicas = str(args.ray_replicas)
    console.print("(c) Ray Serve through the peer's bench.py --http")
    proc = await asyncio.create_subprocess_exec(
        str(python), str(args.ray_peer / "bench.py"), "--http", "--http-port", str(free_port()),
        "--input-copies", str(args.input_copies), "--encoder-replicas", replicas, "--decoder-replicas", replicas,
        "--encoder-decoder-replicas", replicas, "--size", str(args.size), "--requests", str(args.requests),
        "--concurrency", *map(str, args.concurrency), "--json", str(out), "--deadline", "1200",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    text = (await proc.communicate())[0].decode(errors="replace")
    measured = json.loads(out.read_text())["rows"] if out.exists() else []
    if proc.returncode not in (0, 1) or not measured:  # 1: some requests failed (counted below)
        console.print(f"[red]bench.py --http failed (exit {proc.returncode}):[/red]\n{text[-1500:]}")
        return [Row("c", "bench.py --http -> Ray Serve proxy", 0, failed=1, errors={"bench.py exit": proc.returncode or 0})]
    return [
        Row("c", "bench.py --http -> Ray Serve proxy", r["concurrency"], r["ok"], r["rps"], r["p50_ms"], r["p99_ms"],
            failed=r["failed"], errors=r["errors"], note="the peer's aiohttp driver")
        for r in measured
    ]  # fmt: skip


# --- (d): tritonclient.http, through the ingress and on a plain Triton ---------------------


def triton_calls(url: str, requests: int, size: int) -> tuple[list[float], int]:
    """``requests`` sequential encoder calls with tritonclient.http; latencies (s) and wrong answers."""
    client = httpclient.InferenceServerClient(url, network_timeout=30.0)
    rng = np.random.default_rng(0)
    xs = [rng.integers(-1000, 1000, size, dtype=np.int32) for _ in range(16)]
    latencies, wrong = [], 0
    try:
        for i in range(requests):
            x = xs[i % len(xs)]
            tensor = httpclient.InferInput("input", [size], "INT32")
            tensor.set_data_from_numpy(x)
            started = time.perf_counter()
            result = client.infer("encoder", [tensor])
            latencies.append(time.perf_counter() - started)
            wrong += not np.array_equal(result.as_numpy("output"), np.invert(np.tile(x, 3)))
    finally:
        client.close()
    return latencies, wrong


async def triton_level(path: str, url: str, server_pids: list[int], args: argparse.Namespace) -> Row:
    await asyncio.to_thread(triton_calls, url, 50, args.size)  # warm-up
    server, client = TreeCpu(server_pids), SelfCpu()
    server.start()
    client.start()
    started = time.perf_counter()
    latencies, wrong = await asyncio.to_thread(triton_calls, url, args.triton_requests, args.size)
    wall = time.perf_counter() - started
    server_s, client_s = server.stop(), client.stop()
    ms = np.array(latencies) * 1e3
    n = len(latencies) - wrong
    return Row(
        "d", path, 1, n, n / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
        per_request_us(server_s, n), per_request_us(client_s, n), wrong, {"wrong answer": wrong} if wrong else {},
    )  # fmt: skip


async def plain_triton(server: TritonServer, args: argparse.Namespace) -> list[Row]:
    await server.start()
    try:
        await server.load_model("encoder")
        tritons = [p.pid for p in psutil.Process().children() if p.name().startswith("tritonserver")]
        return [await triton_level("tritonclient.http -> plain Triton", f"127.0.0.1:{server.http_port}", tritons, args)]
    finally:
        await server.stop()


async def triton_both_ways(args: argparse.Namespace, workdir: Path, env: dict[str, str], ingress: bool) -> list[Row]:
    console.print("(d) plain Triton server, hello_world encoder model (its log: triton.log)")
    server = TritonServer(await asyncio.to_thread(setup_triton, None, lambda _: None), MODELS)
    # The server copies Triton's log to stderr; here it would bury the tables.
    with (workdir / "triton.log").open("w") as log, contextlib.redirect_stderr(log):
        rows = await plain_triton(server, args)
    if not ingress:
        return rows
    console.print("(d) the same model as a kind: triton operator behind the ingress")
    port = free_port()
    source = workdir / "triton_encoder_source.yaml"
    source.write_text(yaml.safe_dump({
        "name": "bench_http_triton", "working_dir": str(REPO),
        "operators": [{"name": "encoder", "kind": "triton", "repository": str(MODELS), "workers": 1,
                       "max_inflight_requests": 64}],
    }))  # fmt: skip
    http = {"host": "127.0.0.1", "port": port, "workers": args.ingress_workers}
    deployed = Deployed(deployment_file(source, workdir, http), workdir, env)
    await deployed.start(port)
    try:
        assert deployed.http_url is not None
        rows.append(await triton_level(
            "tritonclient.http -> ingress -> kind: triton", deployed.http_url.removeprefix("http://"), [deployed.pid], args
        ))  # fmt: skip
    finally:
        await deployed.stop()
    return rows


# --- report ----------------------------------------------------------------------------------


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per path and concurrency: medians over the rounds, counts summed."""
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.part, row.path, row.concurrency), []).append(row)

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.median(known)) if known else None

    out = []
    for (part, path, concurrency), group in groups.items():
        errors: dict[str, int] = {}
        for row in group:
            for kind, count in row.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        out.append(Row(
            part, path, concurrency, sum(r.requests for r in group),
            *(median([getattr(r, name) for r in group]) for name in
              ("req_per_s", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")),
            failed=sum(r.failed for r in group), errors=errors, note=group[0].note, rounds=len(group),
        ))  # fmt: skip
    return out


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    def find(part: str, concurrency: int, starts: str = "") -> Row | None:
        return next((r for r in rows if r.part == part and r.concurrency == concurrency and r.path.startswith(starts)), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    out = []
    for concurrency in sorted({r.concurrency for r in rows if r.part in "abc"}):
        http, nats, ray = find("a", concurrency), find("b", concurrency), find("c", concurrency, "wrk")
        if http and nats:
            out.append({"what": "HTTP / NATS", "concurrency": concurrency,
                        "req_per_s": ratio(http.req_per_s, nats.req_per_s), "p50": ratio(http.p50_ms, nats.p50_ms),
                        "server_cpu_per_request": ratio(http.server_cpu_us, nats.server_cpu_us)})  # fmt: skip
        if http and ray:
            out.append({"what": "ours HTTP / Ray Serve HTTP (both wrk)", "concurrency": concurrency,
                        "req_per_s": ratio(http.req_per_s, ray.req_per_s), "p50": ratio(http.p50_ms, ray.p50_ms),
                        "server_cpu_per_request": ratio(http.server_cpu_us, ray.server_cpu_us)})  # fmt: skip
    plain = next((r for r in rows if r.part == "d" and "plain" in r.path), None)
    ours = next((r for r in rows if r.part == "d" and "ingress" in r.path), None)
    if plain and ours:
        out.append({"what": "tritonclient.http: ingress / plain Triton", "concurrency": 1,
                    "req_per_s": ratio(ours.req_per_s, plain.req_per_s), "p50": ratio(ours.p50_ms, plain.p50_ms),
                    "p99": ratio(ours.p99_ms, plain.p99_ms),
                    "server_cpu_per_request": ratio(ours.server_cpu_us, plain.server_cpu_us)})  # fmt: skip
    return out


def show(rows: list[Row], found: list[dict[str, Any]], title: str) -> None:
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title=title)
    for column in ("part", "path", "conc", "ok", "req/s", "p50 ms", "p99 ms", "server CPU µs/req",
                   "client CPU µs/req", "failed"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("part", "path") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r.part, r.path, str(r.concurrency), str(r.requests), num(r.req_per_s), num(r.p50_ms, 2),
                      num(r.p99_ms, 2), num(r.server_cpu_us, 0), num(r.client_cpu_us, 0), str(r.failed))  # fmt: skip
    console.print(table)
    if found:
        table = Table(title="ratios (same run)")
        for column in ("what", "conc", "req/s", "p50", "p99", "server CPU/req"):
            table.add_column(column, justify="left" if column == "what" else "right", no_wrap=True)
        for f in found:
            table.add_row(f["what"], str(f["concurrency"]), *(num(f.get(k), 2) for k in
                          ("req_per_s", "p50", "p99", "server_cpu_per_request")))  # fmt: skip
        console.print(table)
    for r in rows:
        if r.errors:
            console.print(f"[red]{r.path} at concurrency {r.concurrency}: {r.errors}[/red]")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", type=Path, default=REPO / "deployments" / "hello_world_python.yaml")
    parser.add_argument("--operator", default="encoder_decoder", help="operator to call (encoder_decoder)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--size", type=int, default=1024, help="elements per input (1024)")
    parser.add_argument("--dtype", default="int64", choices=sorted(OIP_DATATYPES), help="input dtype (int64, as Ray's app)")
    parser.add_argument("--input-copies", type=int, default=3, help="for Ray's app; the deployment file sets ours (3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per level (10)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level of runner client and bench.py (2000)")
    parser.add_argument("--triton-requests", type=int, default=1000, help="sequential tritonclient.http requests (1000)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds (30)")
    parser.add_argument("--ingress-workers", type=int, default=1, help="http.workers of the deployment (1)")
    parser.add_argument("--ray-venv", type=Path, help="venv with ray[serve] (see the peer's README); absent: no Ray")
    parser.add_argument("--ray-peer", type=Path, default=RAY_PEER, help="the peer's directory (bench.py, hello_world.py)")
    parser.add_argument("--ray-replicas", type=int, default=2, help="replicas per Ray deployment, as our workers (2)")
    parser.add_argument("--no-triton", action="store_true", help="skip (d)")
    parser.add_argument("--without-ingress", action="store_true",
                        help="run what needs no ingress ((b), (c), plain Triton) where this checkout has none")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, alternating; report medians (1)")
    parser.add_argument("--quick", action="store_true", help="short levels: 3 s of wrk, 300 requests")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.requests, args.triton_requests = 3.0, 300, 200
    args.deployment = args.deployment.resolve()
    return args


async def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="pr-bench-http-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "PIPELINE_RUNNER_STATE_DIR": str(workdir / "state")}
        try:
            probe = deployment_file(args.deployment, workdir, {"host": "127.0.0.1", "port": free_port()})
            check_ingress(probe)
            ingress = True
        except IngressMissing as exc:
            if not args.without_ingress:
                console.print(f"[red]error: {exc}[/red]")
                return 2
            console.print(f"[yellow]{exc}[/yellow]\n[yellow]running without it.[/yellow]")
            ingress = False
        rows: list[Row] = []
        try:
            for round_ in range(args.rounds):  # the systems alternate: the machine drifts
                if args.rounds > 1:
                    console.print(f"[bold]round {round_ + 1} of {args.rounds}[/bold]")
                done = len(rows)
                rows += await http_and_nats(args, workdir, env, ingress)
                if args.ray_venv is not None:
                    rows += await ray_serve(args, workdir, first_round=round_ == 0)
                elif round_ == 0:
                    console.print("(c) Ray Serve skipped: pass --ray-venv PATH (a venv with ray[serve])")
                if not args.no_triton:
                    rows += await triton_both_ways(args, workdir, env, ingress)
                for row in rows[done:]:
                    row.round_index = round_
        except WrkMissing as exc:
            console.print(f"[red]error: {exc}[/red]")
            return 2
        except ConfigError as exc:
            console.print("[red]" + "\n".join(exc.problems) + "[/red]")
            return 2
    medians = median_rows(rows)
    found = ratios(medians)
    title = (f"HTTP front door: {args.deployment.name}, {args.size} × {args.dtype}, "
             f"{os.cpu_count()} CPUs, wrk {args.duration:g} s / {args.requests} requests per level"
             + (f", medians of {args.rounds} rounds" if args.rounds > 1 else ""))  # fmt: skip
    show(medians, found, title)
    if args.json:
        doc = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "ingress": ingress, "rows": [asdict(r) for r in rows], "medians": [asdict(r) for r in medians],
            "ratios": found,
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
