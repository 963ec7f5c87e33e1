"""UCX data-plane bandwidth: plain ucxx against ``UcxTransport.fetch``, side by side.

Every measurement runs in a fresh pair of processes: a server that holds the bytes and a client
that fetches them, one request at a time, into a preallocated NumPy array (each size is warmed
up first, then timed for at least ``repeats`` iterations and 0.2 s). Bandwidth is bytes per
wall-clock second of the whole request/response exchange, as the client sees it.

* raw ucxx (the baseline, the fastest way found): ucxx's low-level API
  (``ucxx._lib.libucxx``), endpoints created from exchanged worker addresses without error
  handling (so UCX picks shared memory: sysv eager, cma zero-copy rendezvous), a tag receive
  posted into the output and an 8-byte request to the server, which answers with a tag send;
  both processes busy-poll ``worker.progress()`` outside asyncio.
* raw ucxx, no cma: the same with ``UCX_TLS=^cma``, what UcxTransport allows itself (a cma read
  from a producer that dies mid-transfer aborts the consumer; see data_plane/ucx_lib.py).
* raw ucxx asyncio API: the same exchange through ucxx's public asyncio API
  (``create_endpoint_from_worker_address``, ``ep.send``/``ep.recv``), in ucxx's ``polling``
  progress mode (its fastest).
* UcxTransport: ``UcxTransport.fetch`` against a ``UcxTransport`` serving the bytes.

    python benchmarks/ucx_raw.py [--repeats 20] [--runs 3] [--max-size 268435456] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# ucxx sets UCX_MEMTYPE_CACHE, which this UCX no longer knows; UCX prints its warnings on stdout,
# where the process pairs below talk.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

REPO = Path(__file__).resolve().parents[1]
CTRL_TAG = 0x5241_5752_0000_0001  # the requests the server receives
REPLY_TAG = 0x2
MIN_SECONDS = 0.2
_REQ = struct.Struct("<Q")  # the size wanted; 2**64 - 1 stops the server


def _reps(repeats: int, seconds_per_iteration: float) -> int:
    return max(repeats, int(MIN_SECONDS / max(seconds_per_iteration, 1e-7)))


# ------------------------------------------------------------------ raw ucxx, low-level API


def _core_worker() -> tuple[Any, Any, Any]:
    import ucxx._lib.libucxx as ucx_api
    from ucxx._lib.arr import Array

    ctx = ucx_api.UCXContext(feature_flags=(ucx_api.Feature.TAG,))
    return ucx_api, Array, (ctx, ucx_api.UCXWorker(ctx))


def _core_wait(worker: Any, *reqs: Any) -> None:
    while not all(r.completed for r in reqs):
        worker.progress()
    for r in reqs:
        r.check_error()


def _core_server(max_size: int) -> None:
    ucx, Array, (_ctx, worker) = _core_worker()
    data = np.random.default_rng(0).integers(0, 256, max_size, dtype=np.uint8)
    print(base64.b64encode(bytes(worker.address)).decode(), flush=True)
    peer = ucx.UCXAddress.create_from_buffer(base64.b64decode(sys.stdin.readline()))
    ep = ucx.UCXEndpoint.create_from_worker_address(worker, peer, False)
    req = np.zeros(1, np.uint64)
    sends: list[Any] = []
    while True:
        _core_wait(worker, worker.tag_recv(Array(req), ucx.UCXXTag(CTRL_TAG)))
        size = int(req[0])
        if size == 2**64 - 1:
            break
        sends = [s for s in sends if not s.completed]
        sends.append(ep.tag_send(Array(data[:size]), ucx.UCXXTag(REPLY_TAG)))
    _core_wait(worker, *sends)


def _core_client(sizes: list[int], repeats: int) -> dict[int, float]:
    ucx, Array, (_ctx, worker) = _core_worker()
    print(base64.b64encode(bytes(worker.address)).decode(), flush=True)
    peer = ucx.UCXAddress.create_from_buffer(base64.b64decode(sys.stdin.readline()))
    ep = ucx.UCXEndpoint.create_from_worker_address(worker, peer, False)
    results: dict[int, float] = {}

    def fetch(out: np.ndarray, req: np.ndarray) -> None:
        r = ep.tag_recv(Array(out), ucx.UCXXTag(REPLY_TAG))
        s = ep.tag_send(Array(req), ucx.UCXXTag(CTRL_TAG))
        _core_wait(worker, r, s)

    for size in sizes:
        out = np.ones(size, np.uint8)
        req = np.array([size], np.uint64)
        t0 = time.perf_counter()
        fetch(out, req)
        fetch(out, req)
        reps = _reps(repeats, (time.perf_counter() - t0) / 2)
        t0 = time.perf_counter()
        for _ in range(reps):
            fetch(out, req)
        results[size] = (time.perf_counter() - t0) / reps
    _core_wait(worker, ep.tag_send(Array(np.array([2**64 - 1], np.uint64)), ucx.UCXXTag(CTRL_TAG)))
    return results


# ------------------------------------------------------------------ raw ucxx, asyncio API


async def _async_server(max_size: int) -> None:
    import ucxx

    data = np.random.default_rng(0).integers(0, 256, max_size, dtype=np.uint8)
    print(base64.b64encode(bytes(ucxx.get_worker_address())).decode(), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    peer = ucxx.get_ucx_address_from_buffer(base64.b64decode(line))
    ep = await ucxx.create_endpoint_from_worker_address(peer, endpoint_error_handling=False)
    req = np.zeros(1, np.uint64)
    while True:
        await ucxx.recv(req, tag=CTRL_TAG)
        size = int(req[0])
        if size == 2**64 - 1:
            break
        await ep.send(data[:size], tag=REPLY_TAG, force_tag=True)
    await ep.close()


async def _async_client(sizes: list[int], repeats: int) -> dict[int, float]:
    import ucxx

    print(base64.b64encode(bytes(ucxx.get_worker_address())).decode(), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    peer = ucxx.get_ucx_address_from_buffer(base64.b64decode(line))
    ep = await ucxx.create_endpoint_from_worker_address(peer, endpoint_error_handling=False)
    results: dict[int, float] = {}

    async def fetch(out: np.ndarray, req: np.ndarray) -> None:
        await asyncio.gather(ep.recv(out, tag=REPLY_TAG, force_tag=True), ep.send(req, tag=CTRL_TAG, force_tag=True))

    for size in sizes:
        out = np.ones(size, np.uint8)
        req = np.array([size], np.uint64)
        t0 = time.perf_counter()
        await fetch(out, req)
        await fetch(out, req)
        reps = _reps(repeats, (time.perf_counter() - t0) / 2)
        t0 = time.perf_counter()
        for _ in range(reps):
            await fetch(out, req)
        results[size] = (time.perf_counter() - t0) / reps
    await ep.send(np.array([2**64 - 1], np.uint64), tag=CTRL_TAG, force_tag=True)
    await ep.close()
    return results


# ------------------------------------------------------------------ UcxTransport


async def _transport_server(max_size: int) -> None:
    from pipeline_runner.data_plane.ucx_transport import UcxTransport

    data = np.random.default_rng(0).integers(0, 256, max_size, dtype=np.uint8)
    tensors = {str(n): data[:n] for n in _sizes(max_size)}
    transport = UcxTransport(tensors.get)
    await transport.start()
    print(transport.address, flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the client's address (unused)
    await asyncio.to_thread(sys.stdin.readline)  # EOF: the client is done
    await transport.stop()


async def _transport_client(sizes: list[int], repeats: int) -> dict[int, float]:
    from pipeline_runner.data_plane.ucx_transport import UcxTransport

    transport = UcxTransport(lambda _: None)
    await transport.start()
    print(transport.address, flush=True)
    server = (await asyncio.to_thread(sys.stdin.readline)).strip()
    results: dict[int, float] = {}
    for size in sizes:
        out = np.ones(size, np.uint8)
        t0 = time.perf_counter()
        await transport.fetch(server, str(size), out, 30.0)
        await transport.fetch(server, str(size), out, 30.0)
        reps = _reps(repeats, (time.perf_counter() - t0) / 2)
        t0 = time.perf_counter()
        for _ in range(reps):
            await transport.fetch(server, str(size), out, 30.0)
        results[size] = (time.perf_counter() - t0) / reps
    await transport.stop()
    return results


# ------------------------------------------------------------------ process pairs


def _sizes(max_size: int) -> list[int]:
    sizes, n = [], 1024
    while n <= max_size:
        sizes.append(n)
        n *= 4
    return sizes


async def _pair(kind: str, sizes: list[int], repeats: int, env: dict[str, str] | None = None) -> dict[int, float]:
    """Run server and client of ``kind`` in two fresh processes; seconds per fetch by size."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    me = str(Path(__file__).resolve())
    max_size = max(sizes)
    server = await asyncio.create_subprocess_exec(
        sys.executable, me, "--role", f"{kind}-server", "--max-size", str(max_size),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    client = await asyncio.create_subprocess_exec(
        sys.executable, me, "--role", f"{kind}-client", "--sizes", ",".join(map(str, sizes)),
        "--repeats", str(repeats), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert server.stdin and server.stdout and client.stdin and client.stdout
    try:
        server_address = await server.stdout.readline()
        client_address = await client.stdout.readline()
        server.stdin.write(client_address)
        client.stdin.write(server_address)
        await server.stdin.drain()
        await client.stdin.drain()
        result = json.loads(await client.stdout.readline())
        server.stdin.close()
        await asyncio.wait_for(client.wait(), 30)
        await asyncio.wait_for(server.wait(), 30)
    finally:
        for proc in (server, client):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return {int(size): seconds for size, seconds in result.items()}


def _gib_s(seconds: dict[int, float]) -> dict[int, float]:
    return {size: size / s / 2**30 for size, s in seconds.items()}


async def raw_ucxx_bandwidth(sizes: list[int], repeats: int) -> dict[int, float]:
    """GiB/s of plain ucxx, fastest way (low-level API, shared memory incl. cma, busy polling)."""
    return _gib_s(await _pair("core", sizes, repeats))


async def raw_ucxx_no_cma_bandwidth(sizes: list[int], repeats: int) -> dict[int, float]:
    """The same with UCX_TLS=^cma, the transports UcxTransport allows itself (see its module)."""
    return _gib_s(await _pair("core", sizes, repeats, {"UCX_TLS": "^cma"}))


async def raw_ucxx_async_bandwidth(sizes: list[int], repeats: int) -> dict[int, float]:
    """GiB/s of ucxx's public asyncio API in its polling progress mode."""
    return _gib_s(await _pair("async", sizes, repeats, {"UCXPY_PROGRESS_MODE": "polling"}))


async def transport_bandwidth(sizes: list[int], repeats: int) -> dict[int, float]:
    """GiB/s of ``UcxTransport.fetch`` from another process's ``UcxTransport``."""
    return _gib_s(await _pair("transport", sizes, repeats))


CANDIDATES = {
    "raw": ("core", {}),
    "raw_no_cma": ("core", {"UCX_TLS": "^cma"}),
    "ucxx_async": ("async", {"UCXPY_PROGRESS_MODE": "polling"}),
    "transport": ("transport", {}),
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed fetches per size, at least")
    parser.add_argument("--runs", type=int, default=1, help="process pairs per candidate; the best run counts")
    parser.add_argument("--max-size", type=int, default=256 << 20)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:  # one side of a process pair
        kind, side = args.role.rsplit("-", 1)
        if side == "server":
            if kind == "core":
                _core_server(args.max_size)
            else:
                await {"async": _async_server, "transport": _transport_server}[kind](args.max_size)
            return
        sizes = [int(s) for s in args.sizes.split(",")]
        if kind == "core":
            result = _core_client(sizes, args.repeats)
        else:
            result = await {"async": _async_client, "transport": _transport_client}[kind](sizes, args.repeats)
        print(json.dumps(result), flush=True)
        return

    from rich.console import Console
    from rich.table import Table

    sizes = _sizes(args.max_size)
    seconds: dict[str, dict[int, float]] = {}
    for run in range(args.runs):  # interleaved, so that a noisy moment hits every candidate
        for name, (kind, env) in CANDIDATES.items():
            result = await _pair(kind, sizes, args.repeats, env)
            best = seconds.setdefault(name, result)
            for size, s in result.items():
                best[size] = min(best[size], s)

    table = Table(title=f"UCX fetch, one at a time, between two processes ({os.cpu_count()} CPUs, best of {args.runs})")
    columns = ["size", "raw ucxx GiB/s", "raw us", "raw no-cma GiB/s", "ucxx asyncio GiB/s",
               "UcxTransport GiB/s", "UcxTransport us", "vs raw", "vs raw no-cma"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    rows = []
    for size in sizes:
        gib = {name: size / seconds[name][size] / 2**30 for name in CANDIDATES}
        row = {
            "size": size,
            **{f"{name}_gib_s": value for name, value in gib.items()},
            "raw_us": seconds["raw"][size] * 1e6,
            "transport_us": seconds["transport"][size] * 1e6,
            "transport_vs_raw": gib["transport"] / gib["raw"],
            "transport_vs_raw_no_cma": gib["transport"] / gib["raw_no_cma"],
        }
        rows.append(row)
        table.add_row(
            _human(size), f"{gib['raw']:.2f}", f"{row['raw_us']:.1f}", f"{gib['raw_no_cma']:.2f}",
            f"{gib['ucxx_async']:.2f}", f"{gib['transport']:.2f}", f"{row['transport_us']:.1f}",
            f"{row['transport_vs_raw']:.2f}", f"{row['transport_vs_raw_no_cma']:.2f}",
        )  # fmt: skip
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "runs": args.runs, "rows": rows}, indent=2) + "\n")


def _human(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size >> shift} {unit}"
    return f"{size} B"


if __name__ == "__main__":
    asyncio.run(main())
