"""Answering requests: a :class:`Reply` per request, sent through its worker's :class:`Responder`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .context import current_context
from .protocol import ErrorInfo, ResponseHeader, encode_message
from .tensor import TensorLike, check_payload, encode_tensors

if TYPE_CHECKING:
    from .data_plane.plane import DataPlane


class ResponseSink(Protocol):
    """Where encoded responses go (the request plane, or a test's recorder)."""

    @property
    def max_payload(self) -> int: ...

    async def publish_response(self, subject: str, payload: bytes, final: bool) -> None: ...


class Responder:
    """Encodes and sends the responses of one worker."""

    def __init__(self, sink: ResponseSink, data_plane: DataPlane | None, worker: str):
        self.sink = sink
        self.data_plane = data_plane
        self.worker = worker

    def reply(self, reply_to: str, request_id: str, attempt: int, deadline: float = 0.0) -> Reply:
        """The way back to one request's caller (``deadline``: when its published outputs may go)."""
        return Reply(self, reply_to, request_id, attempt, deadline)

    async def respond(
        self,
        reply: Reply,
        outputs: Mapping[str, TensorLike],
        parameters: Mapping[str, Any],
        final: bool,
        error: ErrorInfo | None,
    ) -> None:
        """Send one response; raises (PayloadTooLargeError, ...) when it cannot go."""
        lease_s = max(reply.deadline - time.monotonic(), 0.0)
        encoded = await encode_tensors(outputs, self.data_plane, lease_s)
        header = ResponseHeader(
            id=reply.request_id,
            final=final,
            error=error,
            parameters=dict(parameters),
            tensors=encoded.descriptors,
            worker=self.worker,
            attempt=reply.attempt,
        )
        payload = encode_message(header, encoded.buffers)
        check_payload(len(payload), self.sink.max_payload, encoded.descriptors, "response")
        if encoded.forwarded:
            scope = current_context().scope
            if scope is not None:
                scope.hand_on(encoded.forwarded)
        await self.sink.publish_response(reply.reply_to, payload, final)


class Reply:
    """How one request is answered: responses with outputs, or an error."""

    __slots__ = ("responder", "reply_to", "request_id", "attempt", "deadline")

    def __init__(self, responder: Responder, reply_to: str, request_id: str, attempt: int, deadline: float):
        self.responder = responder
        self.reply_to = reply_to
        self.request_id = request_id
        #: The delivery attempt answering: callers drop responses of an attempt they left behind.
        self.attempt = attempt
        self.deadline = deadline

    async def send(
        self, outputs: Mapping[str, TensorLike], parameters: Mapping[str, Any], final: bool = True
    ) -> None:
        await self.responder.respond(self, outputs, parameters, final, None)

    async def fail(self, error: ErrorInfo) -> None:
        """The final response: ``error``."""
        await self.responder.respond(self, {}, {}, True, error)
