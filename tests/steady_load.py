"""A steady load for fault tests run on another (namespace) host: one line of JSON per request.

``python tests/steady_load.py --nats URL --deployment D --operator OP --seconds S --out FILE``
sends hello_world requests (output must equal input) from ``--lanes`` lanes for ``S`` seconds
and writes, for every request, when it started and ended (``time.time()``, which every host
shares), its
outcome (``ok``, ``wrong``, ``timeout``, ``fetch_timeout`` or the operator's error code) and the error text.
``FILE`` with the suffix ``.started`` appears once the load begins. The test reading the file decides what is acceptable; this script only records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from pipeline_runner import Connection
from pipeline_runner.config import DataPlaneConfig
from pipeline_runner.data_plane.errors import DataPlaneError
from pipeline_runner.errors import OperatorError, RequestTimeoutError, RunnerError


async def main(args: argparse.Namespace) -> None:
    conn = await Connection.connect(
        args.nats, args.deployment, default_timeout_s=args.timeout,
        data_plane=DataPlaneConfig(host=args.data_plane_host),
    )  # fmt: skip
    pipeline = conn.operator(args.operator)
    records: list[dict[str, object]] = []
    begin = time.monotonic()
    numbers = iter(range(10**9))

    async def lane() -> None:
        while time.monotonic() - begin < args.seconds:
            number = next(numbers)
            sent = np.arange(number, number + args.size, dtype=np.int32)
            started = time.time()
            outcome, error = "ok", ""
            try:
                response = await pipeline.infer({"input": sent}, timeout_s=args.timeout)
                try:
                    if not np.array_equal(await response.array("output"), sent):
                        outcome = "wrong"
                finally:
                    response.release()
            except RequestTimeoutError as exc:
                outcome, error = "timeout", str(exc)
            except DataPlaneError as exc:
                outcome = "fetch_timeout" if "gave up" in str(exc) or "timed out" in str(exc) else "DataPlaneError"
                error = str(exc)
            except OperatorError as exc:
                outcome, error = exc.code, str(exc)
            except RunnerError as exc:
                outcome, error = type(exc).__name__, str(exc)
            records.append({"n": number, "start": started, "end": time.time(),
                            "outcome": outcome, "error": error[:300]})  # fmt: skip

    await conn.data_plane.start()
    Path(args.out).with_suffix(".started").touch()
    begin = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(args.lanes)))
    summary = {"records": records, "late_responses": conn.plane.late_responses,
               "resent_requests": conn.plane.resent_requests}  # fmt: skip
    await conn.close()
    Path(args.out).write_text(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--operator", default="encoder_decoder")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--size", type=int, default=32768, help="int32 elements per input")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--data-plane-host", required=True)
    parser.add_argument("--out", required=True)
    asyncio.run(main(parser.parse_args()))
