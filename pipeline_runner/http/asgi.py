"""The little of ASGI the front door needs: read a bounded body, answer, stream, see a disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from .errors import HttpError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


class HttpRequest:
    """One HTTP request as the app sees it."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, request_id: str):
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        self.request_id = request_id
        self._receive = receive
        self._send = send
        self.started = False  # whether the response has begun (its status is then fixed)
        self.status = 0  # the response's status once started
        self.disconnected = False
        self.sse = False  # the format of a started stream

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    async def body(self, limit: int, timeout_s: float) -> bytes:
        """The whole body: 413 when over ``limit`` bytes, 408 when not all there within ``timeout_s``."""
        declared = self.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError("too_large", f"the request body of {declared} bytes is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        self.disconnected = True
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise HttpError("too_large", f"the request body is over the limit of {limit} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise HttpError("body_timeout", f"the request body did not arrive within {timeout_s:g} s") from None

    async def watch_disconnect(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` (the one answering this request) when the client goes away."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                task.cancel()
                return

    def _headers(self, content_type: bytes, extra: Headers) -> Headers:
        return [(b"content-type", content_type), (b"x-request-id", self.request_id.encode()), *extra]

    async def respond(
        self, status: int, body: bytes, content_type: bytes = JSON, headers: Headers | None = None
    ) -> None:
        all_headers = self._headers(content_type, headers or [])
        all_headers.append((b"content-length", str(len(body)).encode()))
        self.started, self.status = True, int(status)
        await self._send({"type": "http.response.start", "status": int(status), "headers": all_headers})
        await self._send({"type": "http.response.body", "body": body})

    async def respond_json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        await self.respond(status, json.dumps(value, separators=(",", ":")).encode())

    async def respond_error(self, error: HttpError) -> None:
        await self.respond(error.status, error.body(), headers=error.headers())

    async def start_stream(self, sse: bool) -> None:
        """Begin a 200 stream: Server-Sent Events, or newline-delimited JSON."""
        content_type = b"text/event-stream" if sse else b"application/x-ndjson"
        headers = self._headers(content_type, [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")])
        self.started, self.status = True, int(HTTPStatus.OK)
        self.sse = sse
        await self._send({"type": "http.response.start", "status": HTTPStatus.OK, "headers": headers})

    async def stream(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def stream_error(self, error: HttpError) -> None:
        """End a stream with an error event (``event: error`` in SSE, an ``{"error"}`` line in NDJSON)."""
        body = error.body()
        await self._send({"type": "http.response.body", "body": b"event: error\ndata: " + body + b"\n\n" if self.sse else body + b"\n"})

    async def end_stream(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})
