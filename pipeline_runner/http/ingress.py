"""The front door's ASGI app: HTTP requests become calls to the deployment's operators.

It is a NATS client like ``runner client``: it calls operators through :class:`RemoteOperator`
on its own :class:`Connection` (large inputs go out through its data plane, large outputs are
fetched by it) and knows nothing of workers beyond the counts their stats report.

Endpoints (Open Inference Protocol v2 unless said otherwise):

- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata)
- ``GET /v2/models/{op}[/versions/{v}]`` (metadata), ``.../ready``, ``POST .../infer``
- ``POST /{op}`` and the file's ``http.routes``: JSON parameters in, JSON or a stream out
- ``POST /v2/requests/{id}/cancel`` and ``DELETE /v2/requests/{id}``: cancel by ``X-Request-Id``
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from nats.aio.msg import Msg

from .. import __version__, tracing
from ..config import DeploymentConfig, OperatorConfig
from ..metrics.observers import IngressMetrics
from ..operator import Response
from ..remote import Connection
from .asgi import ClientGone, HttpRequest, Receive, Scope, Send
from .errors import HttpError, http_error
from .oip import HEADER_LENGTH, decode_request, encode_response

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?(/ready|/infer)?$")
_CANCEL_PATH = re.compile(r"^/v2/requests/([^/]+)(/cancel)?$")
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
#: Stats rounds in a row that found no worker of an operator before its requests get 503 at once.
_NO_WORKER_ROUNDS = 3
_STATS_PERIOD_S = 1.0
_CANCEL_BROADCAST_S = 0.5
#: The status its metrics give a request whose client went away before the answer (nginx's).
_CLIENT_GONE = 499

Handler = Callable[..., Awaitable[None]]


def http_cancel_subject(deployment: str) -> str:
    """Where ingress processes ask each other to cancel a request one of them holds."""
    return f"pr.{deployment}._http.cancel"


class Ingress:
    """The ASGI app of one ingress process."""

    def __init__(
        self,
        config: DeploymentConfig,
        connection: Connection,
        token: str | None = None,
        metrics: IngressMetrics | None = None,
    ):
        assert config.http is not None
        self.metrics = metrics
        self.config = config
        self.http = config.http
        self.connection = connection
        self._token = token.encode() if token else None
        self._exposed: dict[str, OperatorConfig] = {op.name: op for op in config.exposed_operators()}
        self._routes: dict[str, str] = {f"/{name}": name for name in self._exposed}
        self._routes.update(self.http.routes)
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._cancelled_ids: set[str] = set()
        self._workers: dict[str, int] = {}
        self._rounds_without: dict[str, int] = dict.fromkeys(self._exposed, 0)
        self._stats_seen = False
        self._tasks: list[asyncio.Task[None]] = []
        self._cancel_sub: Any = None

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        nats = self.connection.plane.nats
        self._cancel_sub = await nats.subscribe(http_cancel_subject(self.config.name), cb=self._on_cancel_broadcast)
        await self._poll_workers()
        self._tasks.append(asyncio.create_task(self._watch_workers()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()

    async def _watch_workers(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            with contextlib.suppress(Exception):
                await self._poll_workers()
            await asyncio.sleep(max(_STATS_PERIOD_S - (loop.time() - started), 0.1))

    async def _poll_workers(self) -> None:
        expected = sum(op.workers for op in self.config.operators)
        # Returns as soon as every worker answered; the wait only runs out when some are missing.
        stats = await self.connection.worker_stats(expected=expected, timeout_s=_STATS_PERIOD_S * 0.8)
        counts: dict[str, int] = {}
        for entry in stats:
            counts[str(entry.get("operator"))] = counts.get(str(entry.get("operator")), 0) + 1
        self._workers = counts
        self._stats_seen = True
        for name in self._exposed:
            self._rounds_without[name] = 0 if counts.get(name) else self._rounds_without[name] + 1

    def ready(self) -> tuple[bool, dict[str, int]]:
        workers = {name: self._workers.get(name, 0) for name in self._exposed}
        connected = self.connection.plane.nats.is_connected
        return connected and self._stats_seen and all(workers.values()), workers

    # --- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) and given not in self._inflight else uuid.uuid4().hex
        request = HttpRequest(scope, receive, send, request_id)
        received_at = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        self._inflight[request_id] = task
        watcher: asyncio.Task[None] | None = None
        try:
            self._authorize(request)
            handler, args = self._route(request)
            body = b""
            if request.method in ("POST", "PUT"):
                body = await request.body(self.http.max_body_bytes, timeout_s=self.http.request_timeout_s)
            watcher = asyncio.create_task(request.watch_disconnect(task))
            if tracing.active():
                from ..tracing.spans import http_span

                with http_span(request.method, request.path, request.headers):
                    await handler(request, body, *args)
            else:
                await handler(request, body, *args)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            # The client went away, or someone cancelled this request by its id: the calls it
            # made were cancelled down the chain on the way out.
            by_id = request_id in self._cancelled_ids
            if not request.disconnected and not by_id:
                raise  # the server is shutting down
            task.uncancel()
            if by_id and not request.disconnected:
                error = HttpError("cancelled", f"request {request_id} was cancelled by its id")
                with contextlib.suppress(Exception):
                    await (request.stream_error(error) if request.started else request.respond_error(error))
        except Exception as exc:  # every failure is answered, never a traceback
            error = http_error(exc)
            if error.status >= HTTPStatus.INTERNAL_SERVER_ERROR and error.code == "internal":
                log.exception("request %s failed", request_id)
            if not request.started:
                await request.respond_error(error)
        finally:
            if watcher is not None:
                watcher.cancel()
            self._inflight.pop(request_id, None)
            self._cancelled_ids.discard(request_id)
            if self.metrics is not None:
                status = _CLIENT_GONE if request.disconnected or not request.status else request.status
                self.metrics.request_finished(status, time.monotonic() - received_at)

    def _authorize(self, request: HttpRequest) -> None:
        if self._token is None or request.path in _OPEN_PATHS:
            return
        given = request.header("authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise HttpError("unauthorized", "a valid bearer token is required (header Authorization: Bearer TOKEN)")

    def _route(self, request: HttpRequest) -> tuple[Handler, tuple[Any, ...]]:
        path, method = request.path.rstrip("/") or "/", request.method
        if path.startswith("/v2"):
            if path in ("/v2/health/live", "/v2/health/ready", "/v2"):
                handler = {"/v2/health/live": self._live, "/v2/health/ready": self._ready, "/v2": self._server}[path]
                self._allow(method, ("GET", "HEAD"), path)
                return handler, ()
            match = _MODEL_PATH.match(path)
            if match:
                name, version, action = match.group(1), match.group(2), match.group(3)
                op = self._operator(name, version)
                if action == "/infer":
                    self._allow(method, ("POST",), path)
                    return self._infer, (op,)
                self._allow(method, ("GET", "HEAD"), path)
                return (self._model_ready if action else self._model_metadata), (op,)
            match = _CANCEL_PATH.match(path)
            if match and ((match.group(2) and method == "POST") or (not match.group(2) and method == "DELETE")):
                return self._cancel, (match.group(1),)
            if match:
                raise HttpError("method_not_allowed", f"{method} {path}: use POST .../cancel or DELETE /v2/requests/ID")
        elif path in self._routes:
            self._allow(method, ("POST",), path)
            return self._json_call, (self._exposed[self._routes[path]],)
        raise HttpError("not_found", f"no endpoint {path!r}")

    def _allow(self, method: str, allowed: tuple[str, ...], path: str) -> None:
        if method not in allowed:
            raise HttpError("method_not_allowed", f"{method} {path}: use {' or '.join(allowed)}")

    def _operator(self, name: str, version: str | None) -> OperatorConfig:
        op = self._exposed.get(name)
        if op is None:
            raise HttpError("unknown_operator", f"no model {name!r} (models: {', '.join(self._exposed) or 'none'})")
        if version is not None and int(version) != op.version:
            raise HttpError("unknown_operator", f"model {name!r} has no version {version} (it serves {op.version})")
        return op

    def _timeout_s(self, request: HttpRequest) -> float:
        """The request's deadline: the file's, or a shorter one from the X-Request-Timeout header."""
        given = request.header("x-request-timeout")
        if given is None:
            return self.http.request_timeout_s
        try:
            value = float(given)
        except ValueError:
            raise HttpError("bad_request", f"X-Request-Timeout must be a number of seconds, got {given!r}") from None
        if not value > 0:
            raise HttpError("bad_request", f"X-Request-Timeout must be above 0, got {given!r}")
        return min(value, self.http.request_timeout_s)

    def _check_serving(self, op: OperatorConfig) -> None:
        if self._rounds_without.get(op.name, 0) >= _NO_WORKER_ROUNDS:
            raise HttpError("no_worker", f"no worker serves operator {op.name!r} right now")

    # --- health and metadata ---------------------------------------------------------------

    async def _live(self, request: HttpRequest, body: bytes) -> None:
        await request.respond_json({"live": True})

    async def _ready(self, request: HttpRequest, body: bytes) -> None:
        ready, workers = self.ready()
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        await request.respond_json({"ready": ready, "workers": workers}, status)

    async def _server(self, request: HttpRequest, body: bytes) -> None:
        await request.respond_json(
            {"name": "pipeline_runner", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def _model_metadata(self, request: HttpRequest, body: bytes, op: OperatorConfig) -> None:
        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [spec.model_dump() for spec in specs or []]

        await request.respond_json({
            "name": op.name,
            "versions": [str(op.version)],
            "platform": f"pipeline_runner_{op.kind}",
            "inputs": tensors(op.inputs),
            "outputs": tensors(op.outputs),
        })  # fmt: skip

    async def _model_ready(self, request: HttpRequest, body: bytes, op: OperatorConfig) -> None:
        ready = self._workers.get(op.name, 0) > 0
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        await request.respond_json({"name": op.name, "ready": ready}, status)

    # --- calls -----------------------------------------------------------------------------

    async def _infer(self, request: HttpRequest, body: bytes, op: OperatorConfig) -> None:
        infer = decode_request(body, request.header(HEADER_LENGTH))
        self._check_serving(op)
        remote = self.connection.operator(op.name, op.version)
        response = await remote.infer(infer.inputs, parameters=infer.parameters, timeout_s=self._timeout_s(request))
        try:
            outputs = {name: await response.array(name) for name in response.outputs}
        finally:
            response.release()
        payload, json_length = encode_response(op.name, op.version, infer, outputs, response.parameters)
        if json_length is None:
            await request.respond(HTTPStatus.OK, payload)
        else:
            await request.respond(
                HTTPStatus.OK, payload, b"application/octet-stream",
                [(HEADER_LENGTH.encode(), str(json_length).encode())],
            )  # fmt: skip

    async def _json_call(self, request: HttpRequest, body: bytes, op: OperatorConfig) -> None:
        try:
            parameters = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError("bad_json", f"the request body is not valid JSON: {exc}") from None
        if not isinstance(parameters, dict):
            raise HttpError("bad_json", "the request body must be a JSON object (it becomes the request's parameters)")
        self._check_serving(op)
        remote = self.connection.operator(op.name, op.version)
        sse = "text/event-stream" in (request.header("accept") or "")
        responses = remote.call(parameters=parameters, timeout_s=self._timeout_s(request))
        async with contextlib.aclosing(responses):
            first = await _next(responses)
            if first.final:
                await request.respond_json(first.parameters)
                return
            await request.start_stream(sse)
            try:
                await _stream_one(request, first, sse)
                async for response in responses:
                    await _stream_one(request, response, sse)
            except (asyncio.CancelledError, ClientGone):
                raise
            except Exception as exc:  # a stream failing midway ends with an error event
                await request.stream_error(http_error(exc))
                return
            await request.end_stream()

    # --- cancellation ----------------------------------------------------------------------

    async def _cancel(self, request: HttpRequest, body: bytes, target: str) -> None:
        if self._cancel_local(target):
            await request.respond_json({"cancelled": target})
            return
        try:
            await self.connection.plane.nats.request(
                http_cancel_subject(self.config.name), target.encode(), timeout=_CANCEL_BROADCAST_S
            )
        except Exception:
            raise HttpError("unknown_request", f"no request {target!r} is in flight") from None
        await request.respond_json({"cancelled": target})

    def _cancel_local(self, target: str) -> bool:
        task = self._inflight.get(target)
        if task is None or task is asyncio.current_task():
            return False
        self._cancelled_ids.add(target)
        task.cancel()
        log.info("request %s cancelled by its id", target)
        return True

    async def _on_cancel_broadcast(self, msg: Msg) -> None:
        if self._cancel_local(msg.data.decode(errors="replace")) and msg.reply:
            await self.connection.plane.nats.publish(msg.reply, b"cancelled")


async def _next(responses: AsyncIterator[Response]) -> Response:
    async for response in responses:
        return response
    raise HttpError("no_response", "the operator sent no response")


async def _stream_one(request: HttpRequest, response: Response, sse: bool) -> None:
    response.release()
    if not response.parameters:
        return
    data = json.dumps(response.parameters, separators=(",", ":"))
    await request.stream(f"data: {data}\n\n".encode() if sse else data.encode() + b"\n")

