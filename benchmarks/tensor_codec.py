"""Tensor codec cost per call: turning arrays into message bytes and back, for two checkouts.

Each hello_world request encodes and decodes 8 inline tensors (4 requests, 4 responses). This
times, in CPU-µs (``time.process_time``: other load on the machine does not count), the three
steps of one: ``encode_inline_tensors`` (descriptor and bytes of a 1024-int32 array that arrived
in a message, as an operator hands it on), ``tensor_bytes`` alone, and ``inline_array`` (the
array a received descriptor points at). ``--compare PATH`` runs the same in child processes on
another checkout, alternating with this one ``--rounds`` times.

    python benchmarks/tensor_codec.py [--compare /tmp/base] [--repeat 50000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from checkouts import run_in_checkout
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
STEPS = ("encode_inline_tensors", "tensor_bytes", "inline_array")


def child(repeat: int) -> dict[str, float]:
    """CPU-µs per call of each step, in this process, on whichever pipeline_runner it imports."""
    import numpy as np

    from pipeline_runner.protocol import (
        encode_inline_tensors,
        inline_array,
        tensor_bytes,
    )

    received = np.frombuffer(np.arange(1024, dtype=np.int32).tobytes(), dtype=np.int32)
    descriptors, buffers = encode_inline_tensors({"input": received})
    body = memoryview(b"".join(bytes(b) for b in buffers))
    steps: dict[str, Any] = {
        "encode_inline_tensors": lambda: encode_inline_tensors({"input": received}),
        "tensor_bytes": lambda: tensor_bytes("input", received),
        "inline_array": lambda: inline_array(descriptors[0], body),
    }
    out: dict[str, float] = {}
    for name, step in steps.items():
        for _ in range(repeat // 10):
            step()  # warm
        start = time.process_time()
        for _ in range(repeat):
            step()
        out[name] = (time.process_time() - start) / repeat * 1e6
    return out


def run_child(checkout: Path, repeat: int) -> dict[str, float]:
    return run_in_checkout(__file__, checkout, ["--child", "--repeat", str(repeat)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="another checkout to measure side by side")
    parser.add_argument("--repeat", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeat)))
        return
    checkouts = {"this": REPO} | ({"compare": args.compare.resolve()} if args.compare else {})
    rounds: dict[str, list[dict[str, float]]] = {key: [] for key in checkouts}
    for _ in range(args.rounds):
        for key, path in checkouts.items():
            rounds[key].append(run_child(path, args.repeat))
    medians = {key: {s: statistics.median(r[s] for r in runs) for s in STEPS} for key, runs in rounds.items()}
    table = Table(title=f"CPU µs per call, median of {args.rounds} rounds of {args.repeat}")
    table.add_column("step")
    for key in checkouts:
        table.add_column(key, justify="right")
    if "compare" in checkouts:
        table.add_column("this / compare", justify="right")
    for step in STEPS:
        cells = [f"{medians[key][step]:.2f}" for key in checkouts]
        if "compare" in checkouts:
            cells.append(f"{medians['this'][step] / medians['compare'][step]:.2f}")
        table.add_row(step, *cells)
    Console().print(table)
    if args.json:
        report = {"command": sys.argv, "checkouts": {k: str(v) for k, v in checkouts.items()},
                  "medians_us": medians, "rounds": rounds}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
