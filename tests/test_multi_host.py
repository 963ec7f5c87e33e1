"""hello_world across seven hosts: a three-member NATS cluster, encoder, decoder, the
encoder_decoder front and the client, each in its own network (and pid) namespace.

Only the network joins them, as on separate machines: every process reaches the others through
the addresses of a bridged /24, tensors above the inline threshold are fetched over UCX/tcp
between hosts, and a NATS cluster member is SIGKILLed in the middle of a run without losing a
request. Three members rather than two: JetStream needs a majority to elect the leader of the
replicated work queues (``delivery.replicas: 3``) after one of them dies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.netns import Network, can_create_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.multihost, pytest.mark.timeout(600)]

_why_not = can_create_namespaces()
if _why_not is not None:
    pytestmark.append(pytest.mark.skip(reason=f"cannot build test hosts: {_why_not}"))

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
NATS_HOSTS = ("nats1", "nats2", "nats3")
DEPLOYMENT = "hw_multi"
SIZE = 32768  # int32 elements: 128 KiB inputs, above the 64 KiB inline threshold


def _deployment_file(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO_ROOT / "deployments" / "hello_world_python.yaml").read_text())
    config["name"] = DEPLOYMENT
    config["working_dir"] = str(REPO_ROOT)
    for operator in config["operators"]:
        operator["delivery"] = {"replicas": 3}
    path = tmp_path / "hello_world_multi.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _nats(net: Network, *hosts: str) -> str:
    return ",".join(f"nats://{net.hosts[h].address}:4222" for h in hosts)


def _worker_stats(net: Network, expected: int) -> list[dict[str, Any]]:
    script = (
        "import asyncio, json\n"
        "from pipeline_runner import Connection\n"
        "async def main():\n"
        f"    c = await Connection.connect({_nats(net, 'nats2')!r}, {DEPLOYMENT!r})\n"
        f"    print(json.dumps(await c.worker_stats(expected={expected}, timeout_s=5)))\n"
        "    await c.close()\n"
        "asyncio.run(main())\n"
    )
    result = net.run("client", [sys.executable, "-c", script], timeout_s=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _client(net: Network, tmp_path: Path, name: str, requests: int) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / f"{name}.json"
    argv = RUNNER + [
        "client", "--nats", _nats(net, "nats1"), "--deployment", DEPLOYMENT,
        "--operator", "encoder_decoder", "--requests", str(requests), "--concurrency", "16",
        "--size", str(SIZE), "--timeout", "60", "--data-plane-host", net.hosts["client"].address,
        "--json", str(out),
    ]  # fmt: skip
    return net.start("client", argv, tmp_path / "logs" / f"{name}.log"), out


@pytest.fixture
def cluster(tmp_path: Path):
    net = Network()
    try:
        for name in (*NATS_HOSTS, "enc", "dec", "front", "client"):
            net.add_host(name)
        members: dict[str, subprocess.Popen[bytes]] = {}
        for name in NATS_HOSTS:
            routes = ",".join(f"nats-route://{net.hosts[o].address}:6222" for o in NATS_HOSTS if o != name)
            argv = RUNNER + [
                "nats-server", "--host", net.hosts[name].address, "--port", "4222", "--name", name,
                "--cluster-port", "6222", "--routes", routes, "--store-dir", str(tmp_path / name),
            ]  # fmt: skip
            members[name] = net.start(name, argv, tmp_path / "logs" / f"{name}.log")
        file = _deployment_file(tmp_path)
        # The encoder and the client know only nats1 (the member killed below); they learn
        # the others from the cluster.
        placement = {"enc": ("encoder", ("nats1",)), "dec": ("decoder", ("nats2",)),
                     "front": ("encoder_decoder", ("nats3", "nats2"))}  # fmt: skip
        for host, (operator, servers) in placement.items():
            argv = RUNNER + [
                "deploy", str(file), "--nats", _nats(net, *servers), "--only", operator,
                "--data-plane-host", net.hosts[host].address,
                "--health-port", "8080", "--health-host", net.hosts[host].address,
            ]  # fmt: skip
            env = {"PIPELINE_RUNNER_STATE_DIR": str(tmp_path / "state" / host)}
            net.start(host, argv, tmp_path / "logs" / f"{host}.log", env=env)
        deadline = time.monotonic() + 180
        waiting = set(placement)
        while waiting and time.monotonic() < deadline:
            waiting = {host for host in waiting if not net.ready(host, 8080)}
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
        assert not waiting, f"not ready after 180 s: {sorted(waiting)}\n{logs}"
        yield net, members
    finally:
        net.close()


def _result(proc: subprocess.Popen[bytes], out: Path, tmp_path: Path, timeout_s: float) -> dict[str, Any]:
    code = proc.wait(timeout=timeout_s)
    log = (tmp_path / "logs" / f"{out.stem}.log").read_text()[-3000:]
    assert out.exists(), f"client exited with {code} and wrote no results:\n{log}"
    return json.loads(out.read_text())


def test_hello_world_across_hosts_moves_large_tensors_over_the_network(cluster, tmp_path: Path) -> None:
    net, _ = cluster
    rx_before = net.rx_bytes("dec")
    proc, out = _client(net, tmp_path, "plain", requests=200)
    result = _result(proc, out, tmp_path, timeout_s=300)
    assert (result["ok"], result["failed"], result["timed_out"]) == (200, 0, 0), result

    stats = {s["worker"]: s for s in _worker_stats(net, expected=6)}
    assert len(stats) == 6, sorted(stats)
    # Each host's workers ran there (their own pid namespace: every host has its own hostname
    # view, but the NATS server a worker is on tells the hosts apart).
    assert {stats[w]["nats_server"] for w in ("encoder.0", "encoder.1")} == {"nats1"}
    assert {stats[w]["nats_server"] for w in ("decoder.0", "decoder.1")} == {"nats2"}
    # Decoders fetched the encoders' 384 KiB outputs from another host, and those bytes came in
    # through the decoder host's network interface, not through shared memory.
    fetched = sum(stats[w]["data_plane"]["bytes_fetched"] for w in ("decoder.0", "decoder.1"))
    assert fetched >= 200 * SIZE * 4 * 3
    assert net.rx_bytes("dec") - rx_before >= fetched


def test_killing_a_nats_cluster_member_mid_run_loses_no_request(cluster, tmp_path: Path) -> None:
    net, members = cluster
    requests = 1500
    proc, out = _client(net, tmp_path, "chaos", requests=requests)
    time.sleep(4)  # well into the run
    assert proc.poll() is None, "the client finished before the kill: make the run longer"
    Network.kill(members["nats1"])
    result = _result(proc, out, tmp_path, timeout_s=400)
    assert (result["ok"], result["failed"], result["timed_out"]) == (requests, 0, 0), result

    stats = {s["worker"]: s for s in _worker_stats(net, expected=6)}
    # The kill hit the workers that were on nats1: they reconnected to another member.
    for worker in ("encoder.0", "encoder.1"):
        assert stats[worker]["reconnects"] >= 1, stats[worker]
        assert stats[worker]["nats_server"] in ("nats2", "nats3")
