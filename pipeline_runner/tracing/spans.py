"""The spans of one request's journey; used only while :func:`pipeline_runner.tracing.active`.

Per hop: ``call OP`` (the caller, from send to final response) is the parent of ``queue OP``
(from the caller's send time to the start of execution, on the callee's clock) and of
``execute OP`` (the operator's ``execute``), whose children are the hop's own calls and
``fetch TENSOR`` spans (data-plane fetches).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

_tracer: trace.Tracer = trace.NoOpTracer()


def use_tracer(tracer: trace.Tracer) -> None:
    global _tracer
    _tracer = tracer


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """Where a received request's trace continues: its caller's span context and send time."""

    carrier: dict[str, str]
    sent_at: float | None


class CallSpan:
    """The caller's span of one RemoteOperator call; its context travels in the request header."""

    __slots__ = ("carrier", "span")

    def __init__(self, operator: str, version: int, request_id: str):
        self.span = _tracer.start_span(f"call {operator}", kind=SpanKind.CLIENT, attributes={
            "pipeline_runner.operator": operator, "pipeline_runner.version": version,
            "pipeline_runner.request_id": request_id,
        })  # fmt: skip
        self.carrier: dict[str, str] = {}
        propagate.inject(self.carrier, context=trace.set_span_in_context(self.span))

    def end(self, error: BaseException | None, cancelled: bool) -> None:
        if cancelled:
            self.span.set_attribute("pipeline_runner.cancelled", True)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


class ExecuteSpans:
    """The queue-wait and execute spans of a batch; the execute span is current while it runs."""

    __slots__ = ("_current", "_token", "spans")

    def __init__(self, traces: Sequence[tuple[str, RequestTrace | None]], operator: str, worker: str):
        now_ns = time.time_ns()
        self.spans: list[Span] = []
        for request_id, request_trace in traces:
            parent = propagate.extract(request_trace.carrier) if request_trace is not None else None
            attributes: dict[str, str | int] = {"pipeline_runner.operator": operator, "pipeline_runner.worker": worker,
                          "pipeline_runner.request_id": request_id, "pipeline_runner.batch_size": len(traces)}
            if request_trace is not None and request_trace.sent_at is not None:
                # Clocks of different hosts may disagree: never start after the end.
                sent_ns = min(int(request_trace.sent_at * 1e9), now_ns)
                queued = _tracer.start_span(f"queue {operator}", context=parent, start_time=sent_ns,
                                            attributes=attributes)
                queued.end(end_time=now_ns)
            self.spans.append(_tracer.start_span(f"execute {operator}", context=parent, kind=SpanKind.SERVER,
                                                 start_time=now_ns, attributes=attributes))
        self._current = self.spans[0]
        if len(self.spans) > 1:  # calls made for a whole batch belong to no one request
            links = [Link(s.get_span_context()) for s in self.spans]
            self._current = _tracer.start_span(f"batch {operator}", links=links, start_time=now_ns,
                                               attributes={"pipeline_runner.batch_size": len(traces)})
        self._token = otel_context.attach(trace.set_span_in_context(self._current))

    def end(self, error: BaseException | None) -> None:
        otel_context.detach(self._token)
        ends = self.spans if self._current in self.spans else [*self.spans, self._current]
        for span in ends:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.end()


@contextmanager
def fetch_span(tensor: str, nbytes: int, memory_type: str, producer: str) -> Iterator[None]:
    with _tracer.start_as_current_span(f"fetch {tensor}", attributes={
        "pipeline_runner.tensor": tensor, "pipeline_runner.bytes": nbytes,
        "pipeline_runner.memory_type": memory_type, "pipeline_runner.producer": producer,
    }):  # fmt: skip
        yield


@contextmanager
def http_span(method: str, path: str, headers: Mapping[str, str]) -> Iterator[None]:
    """The ingress's span of one HTTP request, continuing the client's ``traceparent`` if it sent one."""
    parent = propagate.extract(headers)
    with _tracer.start_as_current_span(f"HTTP {method} {path}", context=parent, kind=SpanKind.SERVER,
                                       attributes={"http.request.method": method, "url.path": path}):
        yield


@contextmanager
def root_span(name: str, attributes: dict[str, Any] | None = None) -> Iterator[str]:
    """A new trace's first span (current inside); yields its trace id (32 hex digits)."""
    with _tracer.start_as_current_span(name, context=otel_context.Context(), attributes=attributes) as span:
        yield f"{span.get_span_context().trace_id:032x}"
