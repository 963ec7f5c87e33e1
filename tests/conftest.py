"""Shared fixtures: real nats-server processes and real deployments of test operators."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pipeline_runner import Connection, DeploymentConfig
from pipeline_runner.deployment import Deployment
from pipeline_runner.nats_server import NatsServer

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def interrupt(proc: subprocess.Popen[Any], timeout_s: float = 60) -> None:
    """Ctrl-C a ``runner`` subprocess and wait for it to drain; kill it if it takes longer."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own runner state directory (state files, logs, embedded NATS)."""
    path = tmp_path / "state"
    monkeypatch.setenv("PIPELINE_RUNNER_STATE_DIR", str(path))
    return path


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    """A real nats-server on a free loopback port."""
    server = NatsServer(tmp_path / "nats")
    url = await server.start()
    yield url
    await server.stop()


def make_config(*operators: dict[str, Any], name: str = "test", **fields: Any) -> DeploymentConfig:
    """A deployment of operators from tests/fixture_operators (or anything importable)."""
    return DeploymentConfig.model_validate(
        {"name": name, "working_dir": str(TESTS_DIR), "operators": list(operators), **fields}
    )


def op(name: str, implementation: str, **fields: Any) -> dict[str, Any]:
    """One operator entry; ``implementation`` is relative to tests/fixture_operators."""
    return {"name": name, "implementation": f"fixture_operators.{implementation}", **fields}


@asynccontextmanager
async def running(
    config: DeploymentConfig, nats_url: str | None = None, **kwargs: Any
) -> AsyncIterator[Deployment]:
    """A started deployment, stopped (workers and embedded NATS) on exit.

    A file's fixed HTTP port becomes a free one: tests never depend on a port being free.
    """
    if config.http is not None and config.http.port != 0:
        config = config.model_copy(update={"http": config.http.model_copy(update={"port": 0})})
    deployment = Deployment(config, nats_url=nats_url, drain_timeout_s=10.0, **kwargs)
    await deployment.start()
    try:
        yield deployment
    finally:
        await deployment.stop()


@asynccontextmanager
async def connected(deployment: Deployment, timeout_s: float = 10.0) -> AsyncIterator[Connection]:
    assert deployment.nats_url is not None
    connection = await Connection.connect(
        deployment.nats_url,
        deployment.config.name,
        default_timeout_s=timeout_s,
        data_plane=deployment.config.data_plane,
    )
    try:
        yield connection
    finally:
        await connection.close()
