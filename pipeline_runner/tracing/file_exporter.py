"""A span exporter appending one JSON object per span to a file (several processes may share it)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What one line of the file holds."""
    context = span.context
    assert context is not None
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "service": span.resource.attributes.get("service.name"),
        "attributes": dict(span.attributes or {}),
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to ``path``; each batch is one ``write`` to an O_APPEND file, so lines of
    processes sharing the file never interleave."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans).encode()
        try:
            os.write(self._fd, data)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every span in a file written by :class:`JsonLinesSpanExporter` (a torn last line is skipped)."""
    spans = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                spans.append(json.loads(line))
            except ValueError:
                continue
    return spans


def wait_for_spans(path: Path, trace_ids: set[str], settle_s: float = 0.6, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The spans of ``trace_ids`` once no more of them arrived for ``settle_s`` (each process
    exports every 200 ms), or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen, settled_at = -1, time.monotonic()
    while True:
        spans = [s for s in read_spans(path) if s.get("trace_id") in trace_ids] if path.exists() else []
        if len(spans) != seen:
            seen, settled_at = len(spans), time.monotonic()
        elif time.monotonic() - settled_at >= settle_s or time.monotonic() >= deadline:
            return spans
        time.sleep(0.1)
