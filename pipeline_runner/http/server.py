"""Serving an ASGI app with uvicorn (httptools) inside the caller's event loop.

uvicorn does HTTP; this module adds what a front door facing any client needs on top: a bound on
the request head (a client that never finishes its headers is cut off after ``head_timeout_s``,
one sending more than ``max_head_bytes`` of them gets 431), and start/stop that leave signal
handling to the process (uvicorn would otherwise take SIGINT/SIGTERM and re-raise them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import RunnerError

log = logging.getLogger(__name__)

ASGIApp = Any


_HEAD_TOO_LARGE_BODY = (
    b'{"error": {"code": "too_large", "message": "the request head is too large; send less in headers"}}'
)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_HEAD_TOO_LARGE_BODY)}\r\n\r\n".encode()
    + _HEAD_TOO_LARGE_BODY
)


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request head."""

    head_timeout_s = 10.0
    max_head_bytes = 64 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection that sent no complete request head in %g s", self.head_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # bytes of a request head
            self._arm_head_timer()
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self.max_head_bytes:
                self._disarm_head_timer()
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process decides what its signals do


class HttpServer:
    """An ASGI app on uvicorn, on ``sock`` (bound elsewhere) or on ``host:port``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        drain_timeout_s: float = 30.0,
        head_timeout_s: float = 10.0,
        max_head_bytes: int = 64 * 1024,
    ):
        protocol = type(
            "GuardedProtocol", (_GuardedProtocol,), {"head_timeout_s": head_timeout_s, "max_head_bytes": max_head_bytes}
        )
        self._sock = sock if sock is not None else _bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(
            app,
            http=protocol,  # type: ignore[arg-type]
            interface="asgi3",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(max(drain_timeout_s, 1)),
            timeout_keep_alive=5,
            server_header=False,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RunnerError(f"the HTTP server on {self.host}:{self.port} stopped at once")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the drain timeout), return."""
        if self._task is None:
            self._sock.close()
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._task = None

    async def wait(self) -> None:
        """Return when the server stopped on its own."""
        if self._task is not None:
            await asyncio.shield(self._task)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6), or a RunnerError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise RunnerError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound and listening on ``host:port``, to be shared by several ingress processes."""
    return _bind(host, port)
