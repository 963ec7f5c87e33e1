"""A UcxTransport producer in its own process, driven by JSON lines on stdin (for the tests).

    python -m fixture_operators.ucx_peer        (from tests/)

Answers are JSON lines on stdout prefixed with ``@@ `` (UCX prints its own log lines on stdout).
The first is ``{"address": ...}`` once the transport is started, then one per command:

* ``{"cmd": "put", "id": ..., "size": n, "seed": s}``: serve ``pattern(n, s)`` under ``id``
* ``{"cmd": "free", "id": ...}``: forget ``id`` (fetches of it fail from now on)
* ``{"cmd": "released"}``: the ids ``on_release`` received so far
* ``{"cmd": "stats"}``: the transport's counters
* ``{"cmd": "fetch", "address": ..., "id": ..., "size": n}``: fetch from another transport and
  answer with the sum of the bytes that arrived
* ``{"cmd": "stop"}``: stop the transport (twice: it must be idempotent) and exit

With ``--other-host`` the transport claims to run on another machine, so peers reach it the way
they reach remote ones: over tcp, with UCX error handling, and without watching its pid.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np

from pipeline_runner.data_plane.peers import HostIdentity
from pipeline_runner.data_plane.ucx_transport import UcxTransport

PREFIX = "@@ "


def pattern(size: int, seed: int) -> np.ndarray:
    """Deterministic pseudo-random bytes, the same in every process."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    other_host = HostIdentity("another-host", "1") if "--other-host" in sys.argv else None
    tensors: dict[str, Any] = {}
    released: list[str] = []
    transport = UcxTransport(tensors.get, on_release=released.extend, identity=other_host)
    await transport.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    answer({"address": transport.address})
    while line := await reader.readline():
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "put":
            tensors[msg["id"]] = pattern(msg["size"], msg.get("seed", 0))
            answer({"ok": True})
        elif cmd == "free":
            tensors.pop(msg["id"], None)
            answer({"ok": True})
        elif cmd == "released":
            answer({"ids": released})
        elif cmd == "stats":
            answer(transport.stats)
        elif cmd == "fetch":
            out = np.empty(msg["size"], np.uint8)
            try:
                await transport.fetch(msg["address"], msg["id"], out, msg.get("timeout", 5.0))
                answer({"sum": int(out.sum(dtype=np.uint64))})
            except Exception as exc:
                answer({"error": f"{type(exc).__name__}: {exc}"})
        elif cmd == "stop":
            await transport.stop()
            await transport.stop()
            answer({"ok": True})
            return


if __name__ == "__main__":
    asyncio.run(main())
