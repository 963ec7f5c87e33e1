"""Deployment lifecycle with real worker processes: start, restart, drain, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline_runner import OperatorError, WorkerStartError
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.deployment import Deployment
from pipeline_runner.state import is_running

from .conftest import REPO_ROOT, connected, make_config, op, running


async def _wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_hello_world_returns_the_input_through_encoder_and_decoder() -> None:
    config = load_deployment(REPO_ROOT / "deployments" / "hello_world_python.yaml")
    async with running(config) as deployment, connected(deployment) as conn:
        pipeline = conn.operator("encoder_decoder")
        for dtype in ("int8", "uint16", "int32", "int64", "float32", "float64", "bool"):
            x = (np.arange(-5, 5) % 2).astype(dtype) if dtype == "bool" else np.arange(-5, 5).astype(dtype)
            response = await pipeline.infer({"input": x.reshape(2, 5)})
            out = await response.array("output")
            assert out.dtype == x.dtype and out.shape == (2, 5)
            np.testing.assert_array_equal(out, x.reshape(2, 5))
        encoded = await conn.operator("encoder").infer({"input": np.array([1, 2], dtype=np.int32)})
        np.testing.assert_array_equal(await encoded.array("output"), [-2, -3] * 3)


async def test_hello_world_answers_bad_input_with_an_error_not_a_crash() -> None:
    config = load_deployment(REPO_ROOT / "deployments" / "hello_world_python.yaml")
    async with running(config) as deployment, connected(deployment) as conn:
        pipeline = conn.operator("encoder_decoder")
        with pytest.raises(OperatorError) as missing:
            await pipeline.infer({"wrong_name": np.zeros(3)})
        assert missing.value.code == "bad_input"
        assert "missing input 'input'" in missing.value.message
        with pytest.raises(OperatorError) as scalar:
            await pipeline.infer({"input": np.array(5)})
        assert scalar.value.code == "bad_input"
        assert "at least one dimension" in scalar.value.message
        with pytest.raises(OperatorError) as text:
            await pipeline.infer({"input": np.array(["a", "b"])})
        assert "integer, float or bool" in text.value.message
        ok = await pipeline.infer({"input": np.arange(4)})
        np.testing.assert_array_equal(await ok.array("output"), np.arange(4))
        assert all(w.restarts == 0 for w in deployment.workers)


async def test_a_worker_killed_with_sigkill_is_restarted_and_serving_resumes(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", workers=2))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        victim = deployment.workers[0]
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await _wait_until(lambda: victim.restarts == 1 and victim.ready and victim.pid != old_pid)
        assert not is_running(old_pid)
        # Both workers serve again: the restarted one answers too.
        served = set()
        for i in range(60):
            response = await conn.operator("echo").infer({"x": np.array([i])}, parameters={"sleep": 0.01})
            served.add(response.parameters["pid"])
            if victim.pid in served:
                break
        assert victim.pid in served


async def test_a_worker_that_crashes_mid_request_is_restarted(nats_url: str) -> None:
    config = make_config(op("faulty", "echo:Faulty"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        faulty = conn.operator("faulty")
        with pytest.raises(Exception):  # the request dies with its worker: issue 5 redelivers it
            await faulty.infer(parameters={"mode": "exit"}, timeout_s=1.0)
        await _wait_until(lambda: deployment.workers[0].restarts == 1 and deployment.workers[0].pid)
        ok = await faulty.infer(timeout_s=10)
        assert list(await ok.array("ok")) == [1]


@pytest.mark.parametrize(
    ("implementation", "expected"),
    [
        ("broken:Nothing", "RuntimeError: this module refuses to load"),
        ("bad_setup:BadSetup", "RuntimeError: model weights not found at /nonexistent"),
        ("echo:NoSuchClass", "has no attribute 'NoSuchClass'"),
    ],
)
async def test_a_worker_that_cannot_start_fails_the_deployment_with_its_reason(
    nats_url: str, implementation: str, expected: str
) -> None:
    config = make_config(op("bad", implementation))
    deployment = Deployment(config, nats_url=nats_url, start_timeout_s=20)
    with pytest.raises(WorkerStartError) as excinfo:
        await deployment.start()
    assert expected in str(excinfo.value)
    assert "worker bad.0 failed to start" in str(excinfo.value)
    assert all(w.pid is None for w in deployment.workers)


async def test_sigterm_lets_a_worker_finish_its_in_flight_requests(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    deployment = Deployment(config, nats_url=nats_url, drain_timeout_s=10)
    await deployment.start()
    try:
        async with connected(deployment) as conn:
            pending = asyncio.create_task(
                conn.operator("echo").infer({"x": np.array([42])}, parameters={"sleep": 1.0})
            )
            await asyncio.sleep(0.3)  # the request is now inside the operator
            pid = deployment.workers[0].pid
            await deployment.stop()
            response = await pending
            assert list(await response.array("x")) == [42]
            assert pid is not None and not is_running(pid)
    finally:
        await deployment.stop()


async def test_stop_ends_every_worker_and_the_embedded_nats_server() -> None:
    config = make_config(op("echo", "echo:Echo", workers=2), op("stream", "echo:Stream"))
    deployment = Deployment(config)
    await deployment.start()
    state = deployment.state()
    pids = [w.pid for w in state.workers] + [state.nats_pid]
    assert all(pid is not None and is_running(pid) for pid in pids)
    await deployment.stop()
    assert not any(is_running(pid) for pid in pids if pid is not None)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def test_the_embedded_nats_server_runs_on_as_many_threads_as_its_max_procs(monkeypatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    config = make_config(op("echo", "echo:Echo"), request_plane={"embedded": {"max_procs": 3}})
    async with running(config) as deployment, connected(deployment) as conn:
        response = await conn.operator("echo").infer({"x": np.array([7])})
        assert list(await response.array("x")) == [7]
        nats_pid = deployment.state().nats_pid
        assert nats_pid is not None and _environ(nats_pid)["GOMAXPROCS"] == "3"


def test_the_embedded_server_takes_half_the_cpus_unless_told_or_the_environment_says(monkeypatch) -> None:
    from pipeline_runner import nats_server
    from pipeline_runner.nats_server import embedded_max_procs

    monkeypatch.delenv("GOMAXPROCS", raising=False)
    monkeypatch.setattr(nats_server, "usable_cpus", lambda: 16)
    assert embedded_max_procs(None) == 8
    monkeypatch.setattr(nats_server, "usable_cpus", lambda: 1)
    assert embedded_max_procs(None) == 1
    assert embedded_max_procs(5) == 5
    monkeypatch.setenv("GOMAXPROCS", "2")
    assert embedded_max_procs(None) is None  # the server inherits the environment's


@pytest.mark.parametrize(
    ("cpu_max", "cfs_quota_us", "cfs_period_us", "cpus"),
    [
        ("250000 100000", None, None, 2.5),  # cgroup v2, a limit of 2.5 CPUs
        ("max 100000", None, None, None),  # v2, no limit
        (None, "150000", "100000", 1.5),  # v1
        (None, "-1", "100000", None),  # v1, no limit
        (None, None, None, None),
    ],
)
def test_a_containers_cpu_limit_counts_as_its_cpus(
    cpu_max: str | None, cfs_quota_us: str | None, cfs_period_us: str | None, cpus: float | None
) -> None:
    from pipeline_runner.capacity import cgroup_cpu_limit

    assert cgroup_cpu_limit(cpu_max, cfs_quota_us, cfs_period_us) == cpus
