"""hello_world across network-namespace hosts while the decoder host's link fails.

Five hosts on one bridge, as in tests/test_multi_host.py: the NATS server, the encoders, the
decoders, the encoder_decoder front and a client, which keeps 16 requests of 128 KiB in flight
(above the inline threshold, so tensors cross hosts over UCX). Mid-run the decoder host's cable
is pulled out of the switch and plugged back in, or its link turns lossy and slow. Every request
must end, within its deadline (and the lease of its answer's tensors), in its correct answer or
a clear timeout / worker_lost error;
none may end twice or not at all; and once the link is back the deployment serves as before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline_runner.data_plane.plane import LEASE_GRACE_S
from tests.conftest import REPO_ROOT, TESTS_DIR
from tests.netns import Network, can_create_namespaces, can_impair_links

pytestmark = [pytest.mark.slow, pytest.mark.multihost, pytest.mark.timeout(240)]

_why_not = can_create_namespaces()
if _why_not is not None:
    pytestmark.append(pytest.mark.skip(reason=f"cannot build test hosts: {_why_not}"))

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
DEPLOYMENT = "hw_partitions"
TIMEOUT_S = 15.0
# The answer's tensors may be fetched until their producer's lease on them ends, LEASE_GRACE_S
# after the request's deadline; a little more goes to the client's own bookkeeping.
LONGEST_S = TIMEOUT_S + LEASE_GRACE_S + 2.0
# Outcomes a request may have while its path is broken; anything else is a bug.
FAULT_OUTCOMES = {"ok", "timeout", "fetch_timeout", "worker_lost"}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("partitions")
    net = Network()
    try:
        for name in ("nats", "enc", "dec", "front", "client"):
            net.add_host(name)
        nats = net.hosts["nats"].address
        net.start("nats", RUNNER + ["nats-server", "--host", nats, "--port", "4222", "--name", "nats",
                                    "--cluster-port", "0", "--store-dir", str(tmp_path / "nats")],
                  tmp_path / "logs" / "nats.log")  # fmt: skip
        config = yaml.safe_load((REPO_ROOT / "deployments" / "hello_world_python.yaml").read_text())
        config.update(name=DEPLOYMENT, working_dir=str(REPO_ROOT))
        config.pop("http", None)
        file = tmp_path / "hello_world_partitions.yaml"
        file.write_text(yaml.safe_dump(config, sort_keys=False))
        placement = {"enc": "encoder", "dec": "decoder", "front": "encoder_decoder"}
        for host, operator in placement.items():
            argv = RUNNER + [
                "deploy", str(file), "--nats", f"nats://{nats}:4222", "--only", operator,
                "--data-plane-host", net.hosts[host].address,
                "--health-port", "8080", "--health-host", net.hosts[host].address,
            ]  # fmt: skip
            env = {"PIPELINE_RUNNER_STATE_DIR": str(tmp_path / "state" / host)}
            net.start(host, argv, tmp_path / "logs" / f"{host}.log", env=env)
        deadline = time.monotonic() + 120
        waiting = set(placement)
        while waiting and time.monotonic() < deadline:
            waiting = {host for host in waiting if not net.ready(host, 8080)}
            time.sleep(0.5)
        assert not waiting, f"not ready after 120 s: {sorted(waiting)}\n{_logs(tmp_path)}"
        yield net, tmp_path
    finally:
        net.close()


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))


class Load:
    """``tests/steady_load.py`` running on the client host."""

    def __init__(self, net: Network, tmp_path: Path, name: str, seconds: float):
        self.seconds = seconds
        self.out = tmp_path / f"{name}.json"
        argv = [
            sys.executable, str(TESTS_DIR / "steady_load.py"), "--nats", f"nats://{net.hosts['nats'].address}:4222",
            "--deployment", DEPLOYMENT, "--seconds", str(seconds), "--timeout", str(TIMEOUT_S),
            "--data-plane-host", net.hosts["client"].address, "--out", str(self.out),
        ]  # fmt: skip
        self.proc = net.start("client", argv, tmp_path / "logs" / f"{name}.log")
        self.log = tmp_path / "logs" / f"{name}.log"
        deadline = time.monotonic() + 30
        while not self.out.with_suffix(".started").exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def result(self) -> dict[str, Any]:
        """The records, once the client exits by itself (it must: nothing may hang)."""
        try:
            self.proc.wait(timeout=self.seconds + TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the client hung past its last deadline:\n{self.log.read_text()[-3000:]}")
        assert self.out.exists(), f"client exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
        return json.loads(self.out.read_text())


def _check_every_request_ended_once_in_time(records: list[dict[str, Any]], allowed: set[str]) -> Counter[str]:
    outcomes = Counter(r["outcome"] for r in records)
    numbers = Counter(r["n"] for r in records)
    assert max(numbers.values()) == 1, "a request ended twice"
    assert sorted(numbers) == list(range(len(records))), "a request never ended"
    unexpected = {r["outcome"]: r["error"] for r in records if r["outcome"] not in allowed}
    assert not unexpected, (outcomes, unexpected)
    late = [r for r in records if r["end"] - r["start"] > LONGEST_S]
    assert not late, f"{len(late)} requests outlived their deadline, e.g. {late[0]}"
    return outcomes


def _serves_normally(net: Network, tmp_path: Path, name: str) -> int:
    records = Load(net, tmp_path, name, seconds=4).result()["records"]
    outcomes = _check_every_request_ended_once_in_time(records, {"ok"})
    assert outcomes["ok"] >= 50, outcomes
    return outcomes["ok"]


def _hit(records: list[dict[str, Any]], since: float, until: float) -> list[dict[str, Any]]:
    """Requests in flight at some moment between ``since`` and ``until``."""
    return [r for r in records if r["start"] < until and r["end"] > since]


@pytest.mark.skipif(can_impair_links() is not None, reason=f"cannot impair links: {can_impair_links()}")
def test_a_lossy_slow_decoder_link_slows_requests_but_answers_them_all(hosts) -> None:
    net, tmp_path = hosts
    load = Load(net, tmp_path, "lossy", seconds=20)
    time.sleep(3)
    impaired_at = time.time()
    # 5 % of packets lost each way, 100 Mbit/s: each request moves ~1.5 MiB in and out of the
    # decoder host (three 128 KiB copies fetched, 128 KiB answered, NATS traffic).
    net.impair("dec", loss_percent=5, rate="100mbit")
    time.sleep(10)
    net.heal("dec")
    healed_at = time.time()
    result = load.result()
    records = result["records"]
    outcomes = _check_every_request_ended_once_in_time(records, {"ok"})
    hit = _hit(records, impaired_at, healed_at)
    assert len(hit) >= 16, "no request crossed the impaired link"
    slow = sorted(r["end"] - r["start"] for r in hit)
    before = sorted(r["end"] - r["start"] for r in records if r["end"] < impaired_at)
    normal = _serves_normally(net, tmp_path, "lossy_after")
    print(f"\nlossy slow link 10 s: {len(records)} requests, {len(hit)} while impaired "
          f"(p50 {slow[len(slow) // 2]:.2f} s, max {slow[-1]:.2f} s; before: p50 "
          f"{before[len(before) // 2]:.2f} s), outcomes {dict(outcomes)}; "
          f"afterwards {normal} of {normal} ok")


@pytest.mark.parametrize(
    "cut_s",
    [
        # Longer than the work queues' redeliver_after_s (5 s): JetStream takes the decoders
        # for dead and offers their requests again, to workers just as unreachable.
        8,
        # Longer than a request's deadline and the fetch deadlines: requests caught in the cut
        # time out, consumers give up on their endpoints to the cut host, and TCP's
        # retransmission backoff has grown to seconds when the cable comes back.
        20,
    ],
)
def test_pulling_the_decoder_hosts_cable_mid_run_ends_every_request_in_time(hosts, cut_s: int) -> None:
    net, tmp_path = hosts
    load = Load(net, tmp_path, f"cut{cut_s}", seconds=3 + cut_s + 18)
    time.sleep(3)
    cut_at = time.time()
    net.cut("dec")
    time.sleep(cut_s)
    net.restore("dec")
    restored_at = time.time()
    result = load.result()
    records = result["records"]
    outcomes = _check_every_request_ended_once_in_time(records, FAULT_OUTCOMES)
    hit = _hit(records, cut_at, restored_at)
    assert len(hit) >= 16, "the cut came when no request was in flight"
    # Requests sent once the link was back and its backlog cleared were answered.
    after = [r for r in records if r["start"] > restored_at + 12]
    assert after and all(r["outcome"] == "ok" for r in after), Counter(r["outcome"] for r in after)
    first_ok = min(r["end"] for r in records if r["outcome"] == "ok" and r["start"] > cut_at) - restored_at
    normal = _serves_normally(net, tmp_path, f"cut{cut_s}_after")
    print(f"\ncable pulled {cut_s} s: {len(records)} requests, {len(hit)} in flight during the cut, "
          f"outcomes {dict(outcomes)}, first answer {first_ok:.1f} s after the restore, "
          f"late answers dropped {result['late_responses']}, resent {result['resent_requests']}; "
          f"afterwards {normal} of {normal} ok")
