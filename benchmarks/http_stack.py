"""Which HTTP stack the ingress runs on: the same JSON echo app on each candidate, loaded by wrk.

Each candidate serves ``POST /echo`` (parse a JSON body, answer it back as JSON) and
``GET /v2/health/live`` from one process on loopback. ``wrk`` (Debian package ``wrk``) drives
each in turn with ``--connections`` open connections for ``--seconds``; the server's CPU time
comes from ``/proc/PID/stat`` (user + system) and is divided by the requests served. Ratios are
against the first candidate, in the same run.

    python benchmarks/http_stack.py [--seconds 5] [--connections 1 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CANDIDATES = {
    "uvicorn+httptools+uvloop, Starlette": "starlette",
    "uvicorn+httptools+uvloop, raw ASGI": "raw_asgi",
    "granian (Rust), raw ASGI": "granian",
    "aiohttp.web + uvloop": "aiohttp",
}
BODY = json.dumps({"text": "hello world", "max_tokens": 16, "values": list(range(32))})

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %%d, "errors": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


# --- the candidate servers (run as ``--serve NAME --port P`` in a child process) -------------------


async def _raw_asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    payload = json.dumps(json.loads(body)).encode() if scope["method"] == "POST" else b'{"live": true}'
    await send({
        "type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


def _starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await request.json())

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/v2/health/live", live)])


def serve(name: str, port: int) -> None:
    if name in ("starlette", "raw_asgi"):
        import uvicorn

        app = _starlette_app() if name == "starlette" else _raw_asgi_app
        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)
    elif name == "granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        Server(
            "benchmarks.http_stack:_raw_asgi_app", address="127.0.0.1", port=port, interface=Interfaces.ASGI,
            workers=1, loop=Loops.uvloop, log_enabled=False,
        ).serve()  # fmt: skip
    elif name == "aiohttp":
        import uvloop
        from aiohttp import web

        async def echo(request: web.Request) -> web.Response:
            return web.json_response(await request.json())

        async def live(request: web.Request) -> web.Response:
            return web.json_response({"live": True})

        app = web.Application()
        app.add_routes([web.post("/echo", echo), web.get("/v2/health/live", live)])
        uvloop.install()
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    else:
        raise SystemExit(f"unknown candidate {name!r}")


# --- measuring -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pending.extend(int(c) for c in children)
    return total


def _wait_listening(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


def measure(name: str, connections: int, seconds: float, script: Path) -> dict[str, Any]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", name, "--port", str(port)], cwd=Path(__file__).resolve().parents[1]
    )
    try:
        _wait_listening(port)
        url = f"http://127.0.0.1:{port}/echo"
        subprocess.run(["wrk", "-t1", "-c8", "-d1s", "-s", str(script), url], check=True, capture_output=True)  # warm-up
        cpu_before = _process_tree_cpu_s(server.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        cpu = _process_tree_cpu_s(server.pid) - cpu_before
    finally:
        server.terminate()
        server.wait(10)
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "connections": connections,
        "req_per_s": result["requests"] / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": result["errors"],
        "server_cpu_us_per_request": cpu / max(result["requests"], 1) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % BODY)
        script = Path(f.name)
    rows = []
    for connections in args.connections:
        for label, name in CANDIDATES.items():
            rows.append({"stack": label, **measure(name, connections, args.seconds, script)})
    table = Table(title="HTTP stacks: JSON echo, one server process, wrk -t1")
    for column in ("stack", "conns", "req/s", "× first", "p50 ms", "p99 ms", "CPU µs/req", "errors"):
        table.add_column(column, justify="left" if column == "stack" else "right")
    for row in rows:
        first = next(r for r in rows if r["connections"] == row["connections"])
        table.add_row(
            row["stack"], str(row["connections"]), f"{row['req_per_s']:.0f}",
            f"{row['req_per_s'] / first['req_per_s']:.2f}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
            f"{row['server_cpu_us_per_request']:.0f}", str(row["errors"]),
        )  # fmt: skip
    Console(width=150).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
