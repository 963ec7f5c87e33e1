"""hello_world on one host against the same pipeline spread over hosts, in one run.

Hosts are Linux network namespaces joined by a bridge (tests/netns.py; needs root), each with its
own pid and IPC namespace, so the data plane between them goes over UCX tcp through veth pairs,
as between machines, while on one host it uses shared memory. Both layouts run at once on one
nats-server (in a host of its own) and are measured alternately:

- **one host:** encoder, decoder, encoder_decoder and the client in one namespace;
- **four hosts:** encoder, decoder, encoder_decoder and the client each in their own.

    sudo python benchmarks/multi_host.py [--requests 500] [--rounds 3] [--json out.json]

Prints throughput and latency of ``runner client`` per input size (int32 elements: 1024 rides
inline in NATS, the larger ones go through the data plane) and the ratio four hosts / one host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.netns import Network, can_create_namespaces  # noqa: E402

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
SPLIT = {"enc": "encoder", "dec": "decoder", "front": "encoder_decoder"}


def deployment_file(directory: Path, name: str) -> Path:
    config = yaml.safe_load((REPO / "deployments" / "hello_world_python.yaml").read_text())
    config["name"], config["working_dir"] = name, str(REPO)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def client(net: Network, host: str, deployment: str, nats: str, size: int, requests: int, work: Path) -> dict[str, Any]:
    out = work / f"{deployment}-{size}-{time.monotonic_ns()}.json"
    argv = RUNNER + [
        "client", "--nats", nats, "--deployment", deployment, "--operator", "encoder_decoder",
        "--requests", str(requests), "--concurrency", "8", "--size", str(size), "--timeout", "60",
        "--data-plane-host", net.hosts[host].address, "--json", str(out),
    ]  # fmt: skip
    # On the one host, the client shares the workers' pid namespace: the data plane then takes
    # it for a local peer and uses shared memory, as processes of one machine do.
    proc = net.start(host, argv, work / "logs" / "client.log", own_pids=host != "solo")
    if proc.wait(timeout=600) != 0 or not out.exists():
        raise SystemExit(f"client failed: see {work / 'logs' / 'client.log'}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1024,32768,262144", help="int32 elements per input")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    why_not = can_create_namespaces()
    if why_not:
        raise SystemExit(f"cannot build hosts: {why_not}")
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="multi_host_bench."))
    net = Network()
    try:
        for name in ("nats", "solo", *SPLIT, "client"):
            net.add_host(name)
        nats = f"nats://{net.hosts['nats'].address}:4222"
        net.start("nats", RUNNER + ["nats-server", "--host", net.hosts["nats"].address, "--cluster-port", "0",
                                    "--store-dir", str(work / "nats")], work / "logs" / "nats.log")  # fmt: skip
        one, split = deployment_file(work, "hw_one"), deployment_file(work, "hw_split")
        layouts = {"solo": (one, None), **{host: (split, op) for host, op in SPLIT.items()}}
        for host, (file, only) in layouts.items():
            argv = RUNNER + ["deploy", str(file), "--nats", nats, "--data-plane-host", net.hosts[host].address,
                             "--health-port", "8080", "--health-host", net.hosts[host].address]  # fmt: skip
            if only:
                argv += ["--only", only]
            net.start(host, argv, work / "logs" / f"{host}.log", own_pids=host != "solo",
                      env={"PIPELINE_RUNNER_STATE_DIR": str(work / "state" / host)})
        deadline = time.monotonic() + 180
        waiting = set(layouts)
        while waiting and time.monotonic() < deadline:
            waiting = {h for h in waiting if not net.ready(h, 8080)}
            time.sleep(0.5)
        if waiting:
            raise SystemExit(f"not ready: {sorted(waiting)}; logs in {work / 'logs'}")
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for size in sizes:  # warm-up: endpoints, buffers
            for deployment, host in (("hw_one", "solo"), ("hw_split", "client")):
                client(net, host, deployment, nats, size, 50, work)
        for _ in range(args.rounds):
            for size in sizes:
                for layout, deployment, host in (("one host", "hw_one", "solo"), ("four hosts", "hw_split", "client")):
                    results.setdefault((layout, size), []).append(
                        client(net, host, deployment, nats, size, args.requests, work))
    finally:
        net.close()

    table = Table(title=f"hello_world, {args.requests} requests x {args.rounds} rounds, concurrency 8 (medians)")
    for column in ("input", "layout", "req/s", "p50 ms", "p99 ms", "throughput vs one host"):
        table.add_column(column, justify="right")
    rows = []
    for size in sizes:
        base = statistics.median(r["throughput_rps"] for r in results[("one host", size)])
        for layout in ("one host", "four hosts"):
            runs = results[(layout, size)]
            assert all(r["ok"] == r["requests"] for r in runs), runs
            row = {
                "size_bytes": size * 4, "layout": layout,
                "throughput_rps": statistics.median(r["throughput_rps"] for r in runs),
                "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in runs),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs),
            }  # fmt: skip
            row["ratio"] = row["throughput_rps"] / base
            rows.append(row)
            table.add_row(f"{size * 4 // 1024} KiB", layout, f"{row['throughput_rps']:.0f}", f"{row['p50_ms']:.2f}",
                          f"{row['p99_ms']:.2f}", f"{row['ratio']:.2f}")  # fmt: skip
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"requests": args.requests, "rounds": args.rounds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
