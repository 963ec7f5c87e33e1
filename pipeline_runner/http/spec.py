"""What an ingress process is told on start, and where its bearer token comes from.

Kept apart from the process itself so the deployment can build it without importing the HTTP stack.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..config import DeploymentConfig, HttpAuthConfig
from ..errors import RunnerError
from ..nats_security import NatsClientOptions


class IngressSpec(BaseModel):
    """Everything an ingress process needs, sent by the deployment on stdin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: DeploymentConfig
    root: str
    index: int
    nats_url: str
    nats: NatsClientOptions = NatsClientOptions()
    listen_fd: int
    drain_timeout_s: float = 30.0
    parent_pid: int | None = None
    #: Where this process writes its Prometheus values (the deployment serves them); None: off.
    metrics_dir: str | None = None

    @property
    def ingress_id(self) -> str:
        return f"http.{self.index}"


def resolve_token(auth: HttpAuthConfig | None, root: Path, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token ``auth`` points at (an environment variable or a file), or None without auth."""
    if auth is None:
        return None
    env = os.environ if environ is None else environ
    if auth.token_env is not None:
        token = env.get(auth.token_env, "").strip()
        if not token:
            raise RunnerError(f"http.auth.token_env: the environment variable {auth.token_env} is not set or empty")
        return token
    assert auth.token_file is not None
    path = root / auth.token_file
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RunnerError(f"http.auth.token_file: cannot read {path}: {exc.strerror or exc}") from None
    if not token:
        raise RunnerError(f"http.auth.token_file: {path} is empty")
    return token
