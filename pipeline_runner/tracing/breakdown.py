"""Where a traced request spent its time, hop by hop, from the spans a file exporter wrote."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Span = dict[str, Any]  # one line of a JSON-lines span file (see file_exporter.span_record)


@dataclass(frozen=True, slots=True)
class HopTiming:
    """One operator's share of a request, in milliseconds; ``depth`` 0 is the operator called first."""

    operator: str
    worker: str
    depth: int
    queue_ms: float | None  # caller's send to the start of execute (None: the caller sent no time)
    execute_ms: float
    calls_ms: float  # of execute: waiting on downstream calls (overlapping calls counted once)
    fetch_ms: float  # of execute: fetching tensors over the data plane


def hop_timings(spans: Iterable[Span], trace_id: str) -> list[HopTiming]:
    """The hops of trace ``trace_id`` in call order (depth first, then by start time)."""
    mine = [s for s in spans if s["trace_id"] == trace_id and s.get("end_ns") is not None]
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in mine:
        children[span["parent_span_id"]].append(span)
    for siblings in children.values():
        siblings.sort(key=lambda s: s["start_ns"])
    queue_of = {
        (s["parent_span_id"], s["attributes"].get("pipeline_runner.request_id")): s
        for s in mine if s["name"].startswith("queue ")
    }
    hops: list[HopTiming] = []

    def walk(span: Span, depth: int) -> None:
        if _is_execute(span):
            attrs = span["attributes"]
            queued = queue_of.get((span["parent_span_id"], attrs.get("pipeline_runner.request_id")))
            calls, fetches = _work_under(span, children)
            hops.append(HopTiming(
                operator=attrs.get("pipeline_runner.operator", span["name"]),
                worker=attrs.get("pipeline_runner.worker", "?"),
                depth=depth,
                queue_ms=_ms(queued) if queued is not None else None,
                execute_ms=_ms(span),
                calls_ms=_union_ms(calls),
                fetch_ms=_union_ms(fetches),
            ))  # fmt: skip
            depth += 1
        for child in children.get(span["span_id"], []):
            walk(child, depth)

    known = {s["span_id"] for s in mine}
    for root in sorted((s for s in mine if s["parent_span_id"] not in known), key=lambda s: s["start_ns"]):
        walk(root, 0)
    return hops


def _is_execute(span: Span) -> bool:
    return span["name"].startswith("execute ") and "pipeline_runner.operator" in span["attributes"]


def _work_under(span: Span, children: dict[str | None, list[Span]]) -> tuple[list[Span], list[Span]]:
    """The call and fetch spans made by ``span``'s hop (through the operator's own spans too)."""
    calls: list[Span] = []
    fetches: list[Span] = []
    stack = list(children.get(span["span_id"], []))
    while stack:
        child = stack.pop()
        if child["name"].startswith("call "):
            calls.append(child)
        elif child["name"].startswith("fetch "):
            fetches.append(child)
        elif not _is_execute(child):
            stack.extend(children.get(child["span_id"], []))
    return calls, fetches


def _ms(span: Span) -> float:
    return (span["end_ns"] - span["start_ns"]) / 1e6


def _union_ms(spans: list[Span]) -> float:
    """Milliseconds covered by at least one of ``spans`` (concurrent calls overlap)."""
    total, end = 0, None
    for span in sorted(spans, key=lambda s: s["start_ns"]):
        start, stop = span["start_ns"], span["end_ns"]
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6
