"""Pieces of a deployment spread over hosts, checked on one machine: ``--only``/``--workers``,
health endpoints, ``runner nats-server`` and a three-member NATS cluster.

The same pieces across real network boundaries are in test_multi_host.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import pytest

from pipeline_runner.deployment import Deployment
from pipeline_runner.errors import OperatorError, RunnerError
from pipeline_runner.health import HealthServer
from pipeline_runner.nats_server import ClusterSpec, NatsServer

from .conftest import REPO_ROOT, connected, free_port, make_config, op, running
from .test_cli import RUNNER, runner



def _chain():
    return make_config(
        op("hop1", "echo:Deadline", parameters={"next": "hop2"}, workers=2),
        op("hop2", "echo:Deadline", workers=3),
    )


async def test_a_pipeline_split_over_two_deployments_on_one_nats_serves_as_one(nats_url: str) -> None:
    config = _chain()
    async with running(config, nats_url, only=["hop2"]) as back, running(config, nats_url, only=["hop1"], workers=1) as front:
        assert [w.name for w in back.workers] == ["hop2.0", "hop2.1", "hop2.2"]
        assert [w.name for w in front.workers] == ["hop1.0"]
        async with connected(front) as conn:
            response = await conn.operator("hop1").infer(timeout_s=10)
            assert len(response.parameters["chain"]) == 2  # hop1 reached hop2 on the other side


def test_only_names_an_unknown_operator_and_lists_the_real_ones() -> None:
    with pytest.raises(RunnerError, match=r"no operator 'hop3'.*its operators: hop1, hop2"):
        Deployment(_chain(), only=["hop3"])


def test_deploy_only_with_an_unknown_operator_exits_with_a_message_not_a_traceback() -> None:
    result = runner("deploy", str(REPO_ROOT / "deployments" / "hello_world_python.yaml"), "--only", "encoder,nope")
    assert result.returncode == 1
    assert "no operator 'nope'" in result.stderr and "encoder_decoder" in result.stderr
    assert "Traceback" not in result.stderr


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_readyz_says_ready_only_while_every_local_worker_is(nats_url: str) -> None:
    deployment = Deployment(_chain(), nats_url=nats_url, only=["hop2"], workers=2, drain_timeout_s=5)
    health = HealthServer(deployment.readiness, "127.0.0.1", 0)
    await health.start()
    base = f"http://127.0.0.1:{health.port}"
    try:
        assert await asyncio.to_thread(_get, f"{base}/healthz") == (200, {"status": "alive"})
        status, body = await asyncio.to_thread(_get, f"{base}/readyz")
        assert status == 503 and body["status"] == "not ready"
        await deployment.start()
        status, body = await asyncio.to_thread(_get, f"{base}/readyz")
        assert (status, body) == (200, {"status": "ready", "workers": {"hop2.0": True, "hop2.1": True}})
        deployment.workers[0].proc.kill()
        await asyncio.sleep(0.3)
        status, body = await asyncio.to_thread(_get, f"{base}/readyz")
        assert status == 503 and body["workers"]["hop2.0"] is False
        assert (await asyncio.to_thread(_get, f"{base}/nope"))[0] == 404
    finally:
        await deployment.stop()
        await health.stop()


def test_runner_nats_server_serves_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*RUNNER, "nats-server", "--port", str(port), "--cluster-port", "0", "--store-dir", str(tmp_path / "js")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"listening on nats://127.0.0.1:{port}" in banner, banner + proc.stderr.read()

        async def publish_and_receive() -> bytes:
            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            sub = await nc.subscribe("ping")
            await nc.publish("ping", b"pong")
            msg = await sub.next_msg(timeout=5)
            await nc.close()
            return msg.data

        assert asyncio.run(publish_and_receive()) == b"pong"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_runner_nats_server_wants_a_cluster_port_for_routes() -> None:
    result = runner("nats-server", "--cluster-port", "0", "--routes", "nats-route://10.0.0.2:6222")
    assert result.returncode == 1 and "--routes needs a --cluster-port" in result.stderr


async def test_replicated_work_queues_survive_losing_one_of_three_cluster_members(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    members = [
        NatsServer(
            tmp_path / f"n{i}", server_name=f"n{i}",
            cluster=ClusterSpec("test", "127.0.0.1", port, [f"nats-route://127.0.0.1:{p}" for p in ports if p != port]),
        )  # fmt: skip
        for i, port in enumerate(ports)
    ]
    urls = await asyncio.gather(*(m.start() for m in members))
    config = make_config(op("echo", "echo:Echo", workers=2, delivery={"replicas": 3}))
    try:
        # Workers know every member; the caller only the one killed below.
        async with running(config, ",".join(urls[1:])) as deployment:
            deployment.nats_url = urls[0]
            async with connected(deployment, timeout_s=60) as conn:
                echo = conn.operator("echo")
                calls = [asyncio.create_task(echo.infer(parameters={"sleep": 0.5, "n": i})) for i in range(20)]
                await asyncio.sleep(0.2)
                members[0].kill()
                started = time.monotonic()
                responses = await asyncio.gather(*calls)
                assert sorted(r.parameters["n"] for r in responses) == list(range(20))
                assert conn.plane.resent_requests >= 1  # its connection broke with calls open
                assert time.monotonic() - started < 30
    finally:
        for member in members:
            await member.stop()


def test_log_dir_dash_puts_the_workers_logs_on_the_deployments_output(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*RUNNER, "deploy", str(REPO_ROOT / "deployments" / "hello_world_python.yaml"),
         "--only", "encoder", "--workers", "1", "--log-dir", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "deploy exited:\n" + "".join(lines)
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert "[encoder.0 pid=" in output and "serving pr.hello_world_python.encoder.v1" in output
    assert "stopped after serving 0 requests" in output  # its shutdown, too
    assert not (tmp_path / "state" / "hello_world_python" / "logs").exists()


async def test_a_request_sent_again_after_a_reconnect_runs_again_only_where_that_is_safe(nats_url: str) -> None:
    config = make_config(
        op("again", "echo:Echo"),
        op("amo", "echo:Echo", delivery={"mode": "at_most_once"}),
        op("once", "echo:Echo", delivery={"idempotent": False}),
    )
    async with running(config, nats_url) as deployment, connected(deployment) as conn:

        async def resent(name: str):
            call = asyncio.create_task(conn.operator(name).infer(parameters={"sleep": 0.5}))
            await asyncio.sleep(0.2)  # the worker holds it now
            conn.plane._resend_open_requests()  # what the plane does when its connection comes back
            return await call

        # Idempotent, at least once: both runs answer; the caller takes the first and drops the other.
        assert (await resent("again")).parameters["sleep"] == 0.5
        assert conn.plane.resent_requests == 1
        deadline = time.monotonic() + 5
        while conn.plane.late_responses < 1:
            assert time.monotonic() < deadline, "the second run never answered"
            await asyncio.sleep(0.05)
        # At most once, or not idempotent: the resend is refused rather than run twice.
        for name, why in (("amo", "at_most_once"), ("once", "not idempotent")):
            with pytest.raises(OperatorError) as caught:
                await resent(name)
            assert caught.value.code == "worker_lost" and why in caught.value.message
