"""State files that let ``runner client`` find a deployment running on this machine."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .config import DataPlaneConfig
from .errors import RunnerError

STATE_DIR_ENV = "PIPELINE_RUNNER_STATE_DIR"


class WorkerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operator: str
    index: int
    pid: int | None
    log_file: str
    restarts: int = 0


class DeploymentState(BaseModel):
    """What ``runner deploy`` publishes about itself while it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    file: str
    pid: int
    nats_url: str
    nats_pid: int | None = None
    #: ``http://HOST:PORT/metrics`` of its Prometheus metrics (None: off).
    metrics_url: str | None = None
    log_dir: str
    data_plane: DataPlaneConfig = DataPlaneConfig()
    started_at: float
    workers: list[WorkerState] = []
    #: Where the workers append their spans, when tracing exports to a file (``runner client --trace``).
    trace_file: str | None = None


def state_dir() -> Path:
    """``$PIPELINE_RUNNER_STATE_DIR``, else ``$XDG_STATE_HOME/pipeline_runner`` (~/.local/state)."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pipeline_runner"


def state_file(name: str) -> Path:
    return state_dir() / "deployments" / f"{name}.json"


def write_state(state: DeploymentState) -> None:
    """Write atomically, so a reader never sees half a file."""
    path = state_file(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # Only this user may read it: a NATS URL can carry credentials.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(state.model_dump_json(indent=2))
    tmp.replace(path)


def remove_state(name: str, pid: int) -> None:
    """Remove the state file of ``name`` if it is still the one written by ``pid``."""
    path = state_file(name)
    with contextlib.suppress(OSError, ValueError):
        if DeploymentState.model_validate_json(path.read_text()).pid == pid:
            path.unlink()


def is_running(pid: int) -> bool:
    """True if a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    return True


def running_deployments() -> list[DeploymentState]:
    """Deployments whose ``runner deploy`` process is alive, newest first."""
    found: list[DeploymentState] = []
    for path in sorted((state_dir() / "deployments").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            state = DeploymentState.model_validate_json(path.read_text())
            if is_running(state.pid):
                found.append(state)
    return sorted(found, key=lambda s: s.started_at, reverse=True)


def find_deployment(name: str | None = None) -> DeploymentState:
    """The running deployment called ``name``, or the only one running."""
    running = running_deployments()
    if name is not None:
        for state in running:
            if state.name == name:
                return state
        raise RunnerError(
            f"no running deployment named {name!r} on this machine "
            f"(state directory {state_dir()}); start one with 'runner deploy FILE' or pass --nats"
        )
    if not running:
        raise RunnerError(
            "no running deployment found on this machine; start one with "
            "'runner deploy deployments/hello_world.yaml', or pass --nats URL --deployment NAME"
        )
    if len(running) > 1:
        names = ", ".join(s.name for s in running)
        raise RunnerError(f"several deployments are running ({names}); choose one with --deployment")
    return running[0]


def wait_for_deployment(name: str | None, timeout_s: float) -> DeploymentState:
    """Poll until deployment ``name`` (or the only one) is running here."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return find_deployment(name)
        except RunnerError as exc:
            if time.monotonic() > deadline:
                raise RunnerError(f"after waiting {timeout_s:g} s: {exc}") from None
        time.sleep(0.05)
