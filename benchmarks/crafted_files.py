"""How long loading a deployment file takes, crafted files beside legitimate ones, in one run.

Each file is loaded in this process (``load_deployment``: YAML, schema, model, preflight) ``--repeat``
times; the table gives the median wall and CPU time, and the ratio to hello_world_python.yaml.

    python benchmarks/crafted_files.py [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline_runner.config_loader import MAX_ALIAS_NODES, load_deployment
from pipeline_runner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ENCODER = "operators.hello_world.encoder:Encoder"


def laughs(levels: int, merge: bool) -> str:
    head = f"name: laughs\nworking_dir: {REPO}\noperators:\n  - name: encoder\n    implementation: {ENCODER}\n    parameters:\n"
    if merge:
        lines = ["      l0: &l0 {a: lol, b: lol}"]
        lines += [f"      l{n}: &l{n} {{<<: [{', '.join([f'*l{n - 1}'] * 9)}]}}" for n in range(1, levels)]
    else:
        lines = ["      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"      l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return head + "\n".join(lines) + "\n"


def many_operators(count: int) -> str:
    lines = [f"name: many\nworking_dir: {REPO}\noperators:", "  - &defaults", "    name: op0",
             f"    implementation: {ENCODER}", "    max_inflight_requests: 4",
             "    parameters: {scale: 1.5, labels: [a, b, c], nested: {k: v}}"]  # fmt: skip
    for index in range(1, count):
        lines += ["  - <<: *defaults", f"    name: op{index}"]
    return "\n".join(lines) + "\n"


def measure(path: Path, repeat: int) -> dict[str, object]:
    walls, cpus, outcome = [], [], ""
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            load_deployment(path)
            outcome = "loads"
        except ConfigError as exc:
            outcome = "refused: " + exc.problems[0].split(": ", 1)[1][:48]
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms": statistics.median(walls) * 1000, "cpu_ms": statistics.median(cpus) * 1000, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"hello_world_python.yaml": REPO / "deployments" / "hello_world_python.yaml"}
        crafted = {
            "billion laughs, 9 levels of lists": laughs(9, merge=False),
            "billion laughs, 9 levels of merge keys": laughs(9, merge=True),
            "5 levels of lists (66 430 nodes, within the bound)": laughs(5, merge=False),
            "100 operators sharing defaults (<<)": many_operators(100),
            "1000 operators sharing defaults (<<)": many_operators(1000),
        }
        for index, (name, text) in enumerate(crafted.items()):
            files[name] = Path(tmp) / f"{index}.yaml"
            files[name].write_text(text)
        results = {name: measure(path, args.repeat) for name, path in files.items()}
    base = results["hello_world_python.yaml"]["wall_ms"]
    table = Table(title=f"load_deployment, median of {args.repeat} (alias bound {MAX_ALIAS_NODES} nodes)")
    for column in ("file", "wall ms", "CPU ms", "x hello_world", "outcome"):
        table.add_column(column, justify="left" if column in ("file", "outcome") else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['wall_ms']:.1f}", f"{r['cpu_ms']:.1f}", f"{r['wall_ms'] / base:.1f}", str(r["outcome"]))  # type: ignore[operator]
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
