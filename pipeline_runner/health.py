"""HTTP health endpoints of a running deployment, for Kubernetes probes and load balancers.

``GET /healthz`` answers 200 while the deployment process runs (liveness); ``GET /readyz``
answers 200 when every worker it runs is ready to serve and 503 otherwise (readiness). Both
bodies are JSON. Anything else is 404. Plain asyncio, one short request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from .errors import RunnerError

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serves ``/healthz`` and ``/readyz``; ``readiness()`` gives (ready, details)."""

    def __init__(self, readiness: Readiness, host: str = "127.0.0.1", port: int = 0):
        self._readiness = readiness
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise RunnerError(f"cannot serve health checks on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health checks on http://%s:%d/healthz and /readyz", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_READ_TIMEOUT_S)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, body = self._answer(method, path)
            payload = json.dumps(body).encode() + b"\n"
            writer.write(
                f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a probe that went away or never spoke HTTP
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
