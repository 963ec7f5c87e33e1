"""HTTP health endpoints of a running deployment, for Kubernetes probes and load balancers.

``GET /healthz`` answers 200 while the deployment process runs (liveness); ``GET /readyz``
answers 200 when every worker it runs is ready to serve and 503 otherwise (readiness). Both
bodies are JSON. Anything else is 404. Served by the same HTTP stack as the front door
(:mod:`pipeline_runner.http.server`), inside the deployment's event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from .http.server import HttpServer

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serves ``/healthz`` and ``/readyz``; ``readiness()`` gives (ready, details)."""

    def __init__(self, readiness: Readiness, host: str = "127.0.0.1", port: int = 0):
        self._readiness = readiness
        self.host = host
        self.port = port
        self._server: HttpServer | None = None

    async def start(self) -> None:
        self._server = HttpServer(self._app, host=self.host, port=self.port, drain_timeout_s=1.0, head_timeout_s=5.0)
        self.port = self._server.port
        await self._server.start()
        log.info("health checks on http://%s:%d/healthz and /readyz", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        status, body = self._answer(method, scope["path"])
        payload = json.dumps(body).encode() + b"\n"
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status.value, "headers": headers})
        await send({"type": "http.response.body", "body": payload if method != "HEAD" else b""})

    def _answer(self, method: str, path: str) -> tuple[HTTPStatus, dict[str, Any]]:
        if method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{method} is not supported"}
        if path == "/healthz":
            return HTTPStatus.OK, {"status": "alive"}
        if path == "/readyz":
            ready, details = self._readiness()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return status, {"status": "ready" if ready else "not ready", **details}
        return HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path!r}; try /healthz or /readyz"}
