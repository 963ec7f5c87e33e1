"""What Prometheus metrics cost: per request in a worker, and per scrape of a deployment.

A worker reports each request to its :class:`~pipeline_runner.metrics.observers.WorkerMetrics`
three times (admitted, its batch closed, finished); a hello_world request passes three workers
(encoder_decoder, encoder, decoder). Each row runs those calls ``--repeat`` times in one process
and reports CPU-µs per request (``time.process_time``, so other load on the machine counts
little), side by side:

* ``off``: metrics disabled (the plain counts ``runner status`` shows);
* ``multiprocess``: what workers do, values in files of ``PROMETHEUS_MULTIPROC_DIR`` (a child
  process, as the deployment starts them);
* ``multiprocess, batching operator``: the same for an operator with ``max_batch_size`` > 1,
  which also observes its batches' size and wait (here one request a batch, the worst case);
* ``single process``: prometheus-client's default in-memory values, for comparison.

The in-flight and queued gauges are published twice a second, not per request: not counted.

Then the scrape: the deployment process's ``/metrics`` answer summing the files of ``--workers``
workers, in CPU-ms per scrape.

    python benchmarks/metrics_cost.py [--repeat 200000] [--workers 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HOPS_PER_HELLO_WORLD_REQUEST = 3
_CHILD = """
import json, sys, time
from pipeline_runner.metrics.observers import ProcessLabels, WorkerMetrics
mode, repeat, worker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
labels = None if mode == "off" else ProcessLabels("bench", "encoder", worker)
metrics = WorkerMetrics(labels, batches=mode == "batches")
waits = [0.0004]
def one_request():
    metrics.request_received()
    metrics.batch_closed(1, 0.00001, waits)
    metrics.request_finished("ok", 0.0012, executed=True)
for _ in range(2000):
    one_request()
runs = []
for _ in range(5):
    start = time.process_time()
    for _ in range(repeat // 5):
        one_request()
    runs.append((time.process_time() - start) / (repeat // 5) * 1e6)
print(json.dumps(runs))
"""


def per_request_us(mode: str, repeat: int, env: dict[str, str], worker: str = "encoder.0") -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(repeat), worker],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    runs: list[float] = json.loads(out.stdout)
    return runs


def scrape_ms(directory: Path, scrapes: int) -> list[float]:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    runs = []
    for _ in range(scrapes):
        start = time.process_time()
        generate_latest(registry)
        runs.append((time.process_time() - start) * 1e3)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200_000, help="requests per row")
    parser.add_argument("--workers", type=int, default=6, help="workers whose files one scrape sums")
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        directory = Path(tmp)
        plain = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        multi = {**plain, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        rows: dict[str, list[float]] = {}
        for _ in range(2):  # alternate the rows, so a burst of other load hits them alike
            rows.setdefault("off", []).extend(per_request_us("off", args.repeat, plain))
            rows.setdefault("multiprocess", []).extend(per_request_us("on", args.repeat, multi))
            rows.setdefault("multiprocess, batching operator", []).extend(per_request_us("batches", args.repeat, multi))
            rows.setdefault("single process", []).extend(per_request_us("on", args.repeat, plain))
        for index in range(1, args.workers):  # the other workers' files, for the scrape
            per_request_us("on", 10_000, multi, worker=f"encoder.{index}")
        scrape = scrape_ms(directory, args.scrapes)

    medians = {key: statistics.median(runs) for key, runs in rows.items()}
    table = Table(title=f"metrics cost per request ({args.repeat} requests per run, median of {len(rows['off'])} runs)")
    for column in ("values", "CPU µs per worker hop", f"× {HOPS_PER_HELLO_WORLD_REQUEST} hops (hello_world)", "over off"):
        table.add_column(column, justify="left" if column == "values" else "right")
    for key, median in medians.items():
        table.add_row(key, f"{median:.2f}", f"{median * HOPS_PER_HELLO_WORLD_REQUEST:.1f}",
                      f"{median - medians['off']:+.2f}")  # fmt: skip
    Console(width=120).print(table)
    print(f"one scrape summing {args.workers} workers' files: {statistics.median(scrape):.2f} CPU-ms (median of {len(scrape)})")
    if args.json:
        report: dict[str, Any] = {
            "repeat": args.repeat,
            "per_request_us": {k: {"median": medians[k], "runs": rows[k]} for k in rows},
            "hops_per_hello_world_request": HOPS_PER_HELLO_WORLD_REQUEST,
            "scrape_ms": {"workers": args.workers, "median": statistics.median(scrape), "runs": scrape},
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
