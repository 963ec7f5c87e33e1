"""Calling operators: :class:`Connection` to a deployment and :class:`RemoteOperator` handles."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any

from . import tracing
from .config import DataPlaneConfig
from .context import ServingContext, current_context
from .data_plane.plane import DataPlane
from .errors import RequestTimeoutError, RunnerError, operator_error
from .nats_security import NatsClientOptions
from .operator import Response
from .protocol import RequestHeader, encode_message
from .request_plane import RequestPlane, cancel_subject, operator_subject, stats_subject
from .tensor import TensorLike, check_payload, decode_tensors, encode_tensors

if TYPE_CHECKING:
    from .tracing.spans import CallSpan

DEFAULT_TIMEOUT_S = 30.0


class Connection:
    """A connection to one deployment: its request plane and this process's data plane."""

    def __init__(
        self,
        plane: RequestPlane,
        deployment: str,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        data_plane: DataPlane | None = None,
    ):
        self.plane = plane
        self.deployment = deployment
        self.default_timeout_s = default_timeout_s
        self.data_plane = data_plane if data_plane is not None else DataPlane()

    @classmethod
    async def connect(
        cls,
        nats_url: str,
        deployment: str,
        *,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        data_plane: DataPlaneConfig | None = None,
        nats: NatsClientOptions | None = None,
        client_name: str = "pipeline_runner-client",
    ) -> Connection:
        """Connect to the NATS server of ``deployment``; the data plane starts on first use.

        Credentials and TLS default to the ``PIPELINE_RUNNER_NATS_*`` environment variables.
        """
        options = nats if nats is not None else NatsClientOptions.resolve()
        plane = await RequestPlane.connect(nats_url, name=client_name, options=options)
        return cls(plane, deployment, default_timeout_s, DataPlane(data_plane))

    def operator(self, name: str, version: int = 1) -> RemoteOperator:
        """A handle on operator ``name`` at ``version``."""
        return RemoteOperator(name, version, connection=self)

    async def worker_stats(self, expected: int | None = None, timeout_s: float = 1.0) -> list[dict[str, Any]]:
        """Counters of every worker of the deployment that answers within ``timeout_s``."""
        return await self.plane.gather(stats_subject(self.deployment), expected, timeout_s)

    async def close(self) -> None:
        await self.data_plane.stop()
        await self.plane.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RemoteOperator:
    """An async handle on another operator: ``async for response in op.call(inputs): ...``.

    Inside a worker the handle uses the worker's connection and inherits the deadline of the
    request being served (both from the serving context, see :mod:`pipeline_runner.context`);
    elsewhere pass ``connection=``.
    """

    def __init__(self, name: str, version: int = 1, *, connection: Connection | None = None):
        self.name = name
        self.version = version
        self._connection = connection

    @property
    def connection(self) -> Connection:
        connection = self._connection or current_context().connection
        if connection is None:
            raise RunnerError(
                f"RemoteOperator({self.name!r}) has no connection: pass connection= "
                "outside a worker (see Connection.connect)"
            )
        return connection

    def call(
        self,
        inputs: Mapping[str, TensorLike] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[Response, None]:
        """Send a request and yield its responses; the last one yielded is final.

        Raises :class:`OperatorError` when the operator answers with an error (an
        :class:`OperatorTimeoutError`, also a RequestTimeoutError, for code ``timeout``) and
        :class:`RequestTimeoutError` when no final response arrives in time. Inside a worker
        a call left open when the request being served ends is closed (and cancelled) then.
        """
        context = current_context()
        call = self._call(context, inputs, parameters, timeout_s)
        if context.calls is not None:
            context.calls.track(call)
        return call

    async def _call(
        self,
        context: ServingContext,
        inputs: Mapping[str, TensorLike] | None,
        parameters: Mapping[str, Any] | None,
        timeout_s: float | None,
    ) -> AsyncGenerator[Response, None]:
        connection = self.connection
        plane, data_plane = connection.plane, connection.data_plane
        subject = operator_subject(connection.deployment, self.name, self.version)
        timeout = timeout_s if timeout_s is not None else context.time_left(connection.default_timeout_s)
        encoded = await encode_tensors(inputs or {}, data_plane, lease_s=timeout)
        scope = context.scope
        came_back: set[tuple[str, str]] = set()
        sent_id: str | None = None
        final_seen = False
        span: CallSpan | None = None
        error: BaseException | None = None
        try:
            async with plane.open_stream(timeout) as stream:
                if tracing.active():
                    from .tracing.spans import CallSpan

                    span = CallSpan(self.name, self.version, stream.request_id)
                header = RequestHeader(
                    id=stream.request_id,
                    reply_to=stream.reply_to,
                    timeout_s=stream.timeout_s,
                    parameters=dict(parameters or {}),
                    tensors=encoded.descriptors,
                    trace_context=span.carrier if span is not None else None,
                    sent_at=time.time() if span is not None else None,
                )
                payload = encode_message(header, encoded.buffers)
                check_payload(len(payload), plane.max_payload, encoded.descriptors, f"request to {self.name!r}")
                # Set before sending: a call cancelled while its send awaits JetStream's ack
                # has a request in the queue all the same, which must hear of the cancel.
                sent_id = stream.request_id
                await stream.send(subject, payload)
                try:
                    async for response, body in stream:
                        if response.error is not None:
                            raise operator_error(self.name, response.error.code, response.error.message)
                        outputs = decode_tensors(response.tensors, body, data_plane, stream.deadline)
                        remote = [t.descriptor for t in outputs.values() if t.descriptor is not None]
                        came_back.update((d.address, d.tensor_id) for d in remote)
                        if scope is not None:
                            scope.adopt(remote)
                        final_seen = response.final
                        yield Response(
                            response.id, outputs, response.parameters, response.final, response.worker,
                            data_plane, response.attempt,
                        )  # fmt: skip
                except RequestTimeoutError as exc:
                    raise RequestTimeoutError(f"operator {self.name!r} (v{self.version}): {exc}") from None
        except Exception as exc:
            error = exc
            raise
        finally:
            if span is not None:
                span.end(error, cancelled=not final_seen and error is None)
            if sent_id is not None and not final_seen:
                # Cancelled, abandoned or timed out: let the operator stop working on it.
                with contextlib.suppress(Exception):
                    await plane.publish(
                        cancel_subject(connection.deployment, self.name, self.version), sent_id.encode()
                    )
            # Our inputs are done with once the call ends, unless a response handed them back.
            done = [d for d in encoded.published if (d.address, d.tensor_id) not in came_back]
            if done:
                data_plane.release(done)

    async def infer(
        self,
        inputs: Mapping[str, TensorLike] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send a request and return its final response (earlier streamed ones are dropped)."""
        final: Response | None = None
        # Not tracked in the serving context's open calls, unlike ``call``: nothing here awaits
        # between two responses, so a cancel always lands inside the call, which then ends.
        async for response in self._call(current_context(), inputs, parameters, timeout_s):
            final = response
        assert final is not None  # the stream only ends after a final response
        return final
