"""Prometheus metrics of real deployments: real workers write them, the deployment serves them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable

import numpy as np
import pytest

from pipeline_runner.errors import OperatorError, RunnerError
from pipeline_runner.state import running_deployments

from .conftest import connected, make_config, op, running
from .metrics_scrape import Scrape, scrape

FAST = {"redeliver_after_s": 1.0}


async def _scrape(url: str | None) -> Scrape:
    assert url is not None
    return await asyncio.to_thread(scrape, url)


async def _eventually(url: str | None, check: Callable[[Scrape], bool], timeout_s: float = 15.0) -> Scrape:
    """The first scrape for which ``check`` holds (values reach the files once requests are done)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await _scrape(url)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no scrape of {url} satisfied the check within {timeout_s} s: "
                                 f"{[s for s in found.samples if s[0] == 'pipeline_runner_requests_total']}")
        await asyncio.sleep(0.1)


async def test_requests_are_counted_by_outcome_and_status_reads_the_same_counts(nats_url: str) -> None:
    config = make_config(op("faulty", "echo:Faulty"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        faulty = conn.operator("faulty")
        for _ in range(3):
            await faulty.infer()
        for mode, times in (("bad_input", 2), ("raise", 1)):
            for _ in range(times):
                with pytest.raises(OperatorError):
                    await faulty.infer(parameters={"mode": mode})
        labels = {"deployment": "test", "operator": "faulty", "worker": "faulty.0"}
        found = await _eventually(
            deployment.metrics_url, lambda s: s.value("pipeline_runner_request_duration_seconds_count", **labels) == 6
        )
        outcomes = {o: found.value("pipeline_runner_requests_total", **labels, outcome=o)
                    for o in ("ok", "bad_input", "operator_failed", "cancelled")}  # fmt: skip
        assert outcomes == {"ok": 3, "bad_input": 2, "operator_failed": 1, "cancelled": 0}
        assert found.value("pipeline_runner_queue_wait_seconds_count", **labels) == 6
        assert found.value("pipeline_runner_batch_size_count", **labels) == 0  # max_batch_size 1: no batches
        idle = await _eventually(  # the gauges are published twice a second
            deployment.metrics_url,
            lambda s: (s.value("pipeline_runner_inflight_requests", **labels),
                       s.value("pipeline_runner_queued_requests", **labels)) == (0, 0),
        )  # fmt: skip
        assert idle.value("pipeline_runner_requests_total", **labels) == 6
        assert found.value("pipeline_runner_worker_up", **labels) == 1
        [stats] = await conn.worker_stats(expected=1)
        assert stats["served"] == 6 == found.value("pipeline_runner_requests_total", **labels)


async def test_a_killed_worker_shows_a_restart_and_a_redelivery_and_its_gauges_go(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", delivery=FAST))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        labels = {"deployment": "test", "operator": "echo", "worker": "echo.0"}
        call = asyncio.create_task(conn.operator("echo").infer(parameters={"sleep": 3.0}, timeout_s=30))
        await _eventually(deployment.metrics_url, lambda s: s.value("pipeline_runner_inflight_requests", **labels) == 1)
        victim = deployment.workers[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        response = await call  # redelivered to the restarted worker
        assert response.attempt == 2
        found = await _eventually(
            deployment.metrics_url, lambda s: s.value("pipeline_runner_requests_total", **labels, outcome="ok") == 1
        )
        assert found.value("pipeline_runner_worker_restarts_total", **labels) == 1
        assert found.value("pipeline_runner_redeliveries_total", **labels) == 1
        # The dead process's in-flight request is gone with it, not left in the gauge.
        found = await _eventually(
            deployment.metrics_url, lambda s: s.value("pipeline_runner_inflight_requests", **labels) == 0
        )
        assert found.value("pipeline_runner_worker_up", **labels) == 1


async def test_the_batches_of_a_batching_operator_are_observed(nats_url: str) -> None:
    config = make_config(op("batched", "echo:Batched", max_batch_size=4))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        batched = conn.operator("batched")
        # Each batch takes 50 ms: requests sent together wait for the one running and batch up.
        responses = await asyncio.gather(*(batched.infer() for _ in range(10)))
        sizes = [r.parameters["batch"] for r in responses]
        assert max(sizes) > 1
        labels = {"deployment": "test", "operator": "batched", "worker": "batched.0"}
        found = await _eventually(
            deployment.metrics_url, lambda s: s.value("pipeline_runner_batch_size_sum", **labels) == 10
        )
        # A batch of b requests answers b of them, each saying b.
        assert found.value("pipeline_runner_batch_size_count", **labels) == round(sum(1 / b for b in sizes))
        assert found.value("pipeline_runner_batch_wait_seconds_count", **labels) == found.value(
            "pipeline_runner_batch_size_count", **labels
        )


async def test_tensors_above_the_inline_threshold_count_their_bytes_both_ways(nats_url: str) -> None:
    config = make_config(op("copy", "echo:Copy"))
    x = np.arange(100_000, dtype=np.int32)  # 400 kB: over the 64 KiB inline threshold
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        response = await conn.operator("copy").infer({"x": x})
        np.testing.assert_array_equal(await response.array("x"), x)
        labels = {"deployment": "test", "operator": "copy", "worker": "copy.0", "memory": "cpu"}
        found = await _eventually(
            deployment.metrics_url,
            lambda s: s.value("pipeline_runner_data_plane_tensors_total", **labels, direction="sent") == 1,
        )
        for direction in ("fetched", "sent"):
            assert found.value("pipeline_runner_data_plane_tensors_total", **labels, direction=direction) == 1
            assert found.value("pipeline_runner_data_plane_bytes_total", **labels, direction=direction) == x.nbytes
        assert found.value("pipeline_runner_data_plane_fetch_duration_seconds_count", **labels) == 1


async def test_a_request_its_caller_gave_up_on_in_the_queue_counts_as_cancelled_and_never_runs(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", max_inflight_requests=1, max_queued_requests=4))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")
        slow = asyncio.create_task(echo.infer(parameters={"sleep": 1.0}, timeout_s=10))
        await asyncio.sleep(0.2)
        with pytest.raises(Exception) as caught:  # waits behind the slow one past its deadline
            await echo.infer(timeout_s=0.3)
        assert type(caught.value).__name__ == "RequestTimeoutError"
        await slow
        labels = {"deployment": "test", "operator": "echo", "worker": "echo.0"}
        found = await _eventually(
            deployment.metrics_url, lambda s: s.value("pipeline_runner_requests_total", **labels, outcome="cancelled") == 1
        )
        assert found.value("pipeline_runner_requests_total", **labels, outcome="ok") == 1
        [stats] = await conn.worker_stats(expected=1)
        assert (stats["served"], stats["cancelled"]) == (1, 1)


async def test_the_endpoint_binds_loopback_and_its_url_is_in_the_state_file(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url, on_change=_write_state) as deployment:
        url = deployment.metrics_url
        assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        [state] = running_deployments()
        assert state.metrics_url == url
        assert "pipeline_runner_worker_up" in (await _scrape(url)).names()


def _write_state(deployment) -> None:  # type: ignore[no-untyped-def]
    from pipeline_runner.state import write_state

    write_state(deployment.state())


async def test_metrics_off_serve_nothing_and_status_still_counts(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"), metrics={"enabled": False})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        assert deployment.metrics_url is None
        await conn.operator("echo").infer()
        [stats] = await conn.worker_stats(expected=1)
        assert stats["served"] == 1
        assert not list(deployment.run_dir.glob("metrics.*"))


async def test_a_metrics_port_in_use_fails_the_deploy_saying_so(nats_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(op("echo", "echo:Echo"), metrics={"port": port})
        with pytest.raises(RunnerError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            async with running(config, nats_url):
                pass


def test_files_left_by_a_deployment_process_that_died_are_removed_and_others_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline_runner.metrics.server import MetricsServer

    dead = tmp_path / "metrics.999999999.abcd"  # no such process
    alive = tmp_path / f"metrics.{os.getpid()}.other"  # another deployment of this process
    for directory in (dead, alive):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    server = MetricsServer(tmp_path / f"metrics.{os.getpid()}.mine", "127.0.0.1", 0, list)
    server.prepare()
    assert not dead.exists() and alive.exists() and server.directory.is_dir()
    server.start()
    try:
        assert "pipeline_runner_worker_up" not in scrape(server.url).names()  # no process yet: no sample
    finally:
        server.stop()
    assert not server.directory.exists()
