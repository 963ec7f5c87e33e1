"""Traces: one OpenTelemetry trace per request across every hop, off unless asked for."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline_runner.config import TracingConfig
from pipeline_runner.errors import RunnerError
from pipeline_runner.state import DeploymentState, state_file
from pipeline_runner.tracing.breakdown import hop_timings
from pipeline_runner.tracing.file_exporter import read_spans
from pipeline_runner.tracing.settings import TracingSettings, resolve_tracing

from .conftest import REPO_ROOT, connected, interrupt, make_config, op, running

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
HELLO_WORLD = REPO_ROOT / "deployments" / "hello_world.yaml"  # Triton encoder and decoder

# --- settings ------------------------------------------------------------------------------


def test_tracing_is_off_unless_the_file_or_the_environment_turns_it_on(tmp_path: Path) -> None:
    assert resolve_tracing(None, {}) is None
    assert resolve_tracing(TracingConfig(), {}) is None
    on = TracingConfig(enabled=True, exporter="file", file=str(tmp_path / "spans.jsonl"))
    assert resolve_tracing(on, {}) == TracingSettings("file", tmp_path / "spans.jsonl")
    assert resolve_tracing(None, {"OTEL_TRACES_EXPORTER": "otlp"}) == TracingSettings("otlp")
    assert resolve_tracing(None, {"OTEL_TRACES_EXPORTER": "console"}) == TracingSettings("console")
    assert resolve_tracing(None, {"PIPELINE_RUNNER_TRACE_FILE": str(tmp_path / "t.jsonl")}) == TracingSettings(
        "file", tmp_path / "t.jsonl"
    )


def test_the_standard_variables_turn_tracing_off_over_the_file(tmp_path: Path) -> None:
    on = TracingConfig(enabled=True, exporter="otlp")
    assert resolve_tracing(on, {"OTEL_SDK_DISABLED": "true"}) is None
    assert resolve_tracing(on, {"OTEL_TRACES_EXPORTER": "none"}) is None


def test_an_exporter_pipeline_runner_cannot_use_is_a_clear_error() -> None:
    with pytest.raises(RunnerError, match="OTEL_TRACES_EXPORTER='zipkin'.*'otlp' or 'console'"):
        resolve_tracing(None, {"OTEL_TRACES_EXPORTER": "zipkin"})


def test_the_file_exporter_needs_a_file() -> None:
    with pytest.raises(ValidationError, match="exporter 'file' needs `file`"):
        TracingConfig(enabled=True, exporter="file")


def test_the_sample_ratio_is_a_fraction() -> None:
    with pytest.raises(ValidationError):
        TracingConfig(sample_ratio=1.5)


def test_client_trace_without_a_deployment_that_records_traces_says_how_to_turn_them_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pipeline_runner.cli import _client_tracing

    for name in ("OTEL_TRACES_EXPORTER", "PIPELINE_RUNNER_TRACE_FILE", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RunnerError, match="deployment 'hello_world' records no traces here.*PIPELINE_RUNNER_TRACE_FILE"):
        _client_tracing(None, "hello_world", asked=True)
    assert _client_tracing(None, "hello_world", asked=False) is None
    assert _client_tracing(str(tmp_path / "s.jsonl"), "hello_world", asked=True) == TracingSettings(
        "file", tmp_path / "s.jsonl"
    )


# --- the breakdown of one trace --------------------------------------------------------------


def _span(name: str, span_id: str, parent: str | None, start_ms: float, end_ms: float, **attributes: Any) -> dict[str, Any]:
    return {"trace_id": "t" * 32, "span_id": span_id, "parent_span_id": parent, "name": name,
            "start_ns": int(start_ms * 1e6), "end_ns": int(end_ms * 1e6), "attributes": attributes}  # fmt: skip


def test_a_hop_counts_overlapping_calls_once_and_its_queue_wait_apart() -> None:
    top = {"pipeline_runner.operator": "top", "pipeline_runner.worker": "top.0", "pipeline_runner.request_id": "r1"}
    leaf = {"pipeline_runner.operator": "leaf", "pipeline_runner.worker": "leaf.1", "pipeline_runner.request_id": "r2"}
    spans = [
        _span("call top", "c1", None, 0, 100),
        _span("queue top", "q1", "c1", 0, 10, **top),
        _span("execute top", "e1", "c1", 10, 100, **top),
        _span("fetch input", "f1", "e1", 10, 15),
        _span("call leaf", "c2", "e1", 20, 60),
        _span("call leaf", "c3", "e1", 40, 80),  # concurrent with c2: 20..80 is 60 ms waiting
        _span("queue leaf", "q2", "c2", 20, 25, **leaf),
        _span("execute leaf", "e2", "c2", 25, 55, **leaf),
    ]
    top_hop, leaf_hop = hop_timings(spans, "t" * 32)
    assert (top_hop.worker, top_hop.depth, top_hop.queue_ms, top_hop.execute_ms) == ("top.0", 0, 10, 90)
    assert (top_hop.calls_ms, top_hop.fetch_ms) == (60, 5)
    assert (leaf_hop.worker, leaf_hop.depth, leaf_hop.queue_ms, leaf_hop.execute_ms) == ("leaf.1", 1, 5, 30)


# --- hello_world, deployed and loaded as a user does ------------------------------------------


@contextmanager
def deployed_with_traces(trace_file: Path) -> Iterator[DeploymentState]:
    """``runner deploy deployments/hello_world.yaml`` exporting spans to ``trace_file``, then Ctrl-C."""
    env = {**os.environ, "PIPELINE_RUNNER_TRACE_FILE": str(trace_file)}
    proc = subprocess.Popen([*RUNNER, "deploy", str(HELLO_WORLD), "--http-port", "0"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not state_file("hello_world").exists():
            assert proc.poll() is None, f"runner deploy exited early:\n{proc.communicate()[1]}"
            assert time.monotonic() < deadline, "hello_world did not come up"
            time.sleep(0.1)
        yield DeploymentState.model_validate_json(state_file("hello_world").read_text())
    finally:
        interrupt(proc)


def _http_port(state: DeploymentState) -> int:
    log = Path(state.log_dir) / "http.0.log"
    for line in log.read_text().splitlines():
        if "serving HTTP on" in line:
            return int(line.split("serving HTTP on ")[1].split(":")[1].split()[0])
    raise AssertionError(f"no HTTP port in {log}")


def _children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((s for s in spans if s["parent_span_id"] == parent["span_id"]), key=lambda s: s["name"])


def _assert_hop(spans: list[dict[str, Any]], call: dict[str, Any], operator: str) -> dict[str, Any]:
    """``call`` has a queue-wait and an execute span of ``operator``, in its worker's process; the execute span."""
    assert [s["name"] for s in _children(spans, call)] == [f"execute {operator}", f"queue {operator}"]
    execute, queued = _children(spans, call)
    assert execute["service"] == queued["service"] == f"hello_world.{operator}"
    assert execute["attributes"]["pipeline_runner.request_id"] == call["attributes"]["pipeline_runner.request_id"]
    assert queued["end_ns"] == execute["start_ns"] and queued["start_ns"] <= queued["end_ns"]
    return execute


@pytest.mark.slow
@pytest.mark.triton
def test_one_trace_follows_each_request_through_every_hop_and_the_client_shows_the_slowest(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    with deployed_with_traces(trace_file) as state:
        assert state.trace_file == str(trace_file)
        # 30000 int32 = 120 KB: over the inline threshold, so the tensors move over the data plane.
        client = subprocess.run([*RUNNER, "client", "--requests", "20", "--size", "30000", "--trace", "3"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert client.returncode == 0, client.stdout + client.stderr
        assert "where the 3 slowest requests spent their time" in client.stdout
        for hop in ("encoder_decoder.", "encoder.", "decoder."):
            assert client.stdout.count(hop) >= 3, client.stdout  # one row per hop of each request

        # An HTTP client that sent its own traceparent finds the ingress continuing its trace.
        parent_trace, parent_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        body = json.dumps({"inputs": [{"name": "input", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]}]})
        request = urllib.request.Request(
            f"http://127.0.0.1:{_http_port(state)}/v2/models/encoder_decoder/infer", data=body.encode(),
            headers={"traceparent": f"00-{parent_trace}-{parent_span}-01"}, method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["outputs"][0]["data"] == [1, 2, 3]
        time.sleep(1.0)  # each process exports its spans every 200 ms

    spans = read_spans(trace_file)
    roots = [s for s in spans if s["name"] == "runner client request"]
    assert len(roots) == 20 and len({r["trace_id"] for r in roots}) == 20  # one trace per request
    for root in roots:
        trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
        # The client's call, then its fetch of the output (120 KB: over the data plane).
        call, fetched_output = _children(trace, root)
        assert (call["name"], call["service"]) == ("call encoder_decoder", "runner-client")
        assert fetched_output["name"] == "fetch output" and fetched_output["start_ns"] >= call["end_ns"]
        pipeline = _assert_hop(trace, call, "encoder_decoder")
        under = _children(trace, pipeline)
        assert [s["name"] for s in under if s["name"].startswith("call ")] == ["call decoder", "call encoder"]
        assert {s["service"] for s in under} == {"hello_world.encoder_decoder"}
        for downstream in (s for s in under if s["name"].startswith("call ")):
            operator = downstream["name"].removeprefix("call ")
            execute = _assert_hop(trace, downstream, operator)
            fetched = [s for s in _children(trace, execute) if s["name"] == "fetch input"]
            assert fetched and fetched[0]["attributes"]["pipeline_runner.bytes"] >= 120_000

    http = [s for s in spans if s["trace_id"] == parent_trace]
    (ingress,) = [s for s in http if s["name"] == "HTTP POST /v2/models/encoder_decoder/infer"]
    assert ingress["parent_span_id"] == parent_span and ingress["service"] == "hello_world.http"
    (call,) = _children(http, ingress)
    assert call["name"] == "call encoder_decoder"
    _assert_hop(http, call, "encoder_decoder")


# --- OTLP: spans reach a collector over OTLP/HTTP ----------------------------------------------


class _Collector(http.server.BaseHTTPRequestHandler):
    """The trace endpoint of an OTLP/HTTP collector: decodes each export, keeps its spans."""

    spans: list[tuple[str, str, str, str]] = []  # (service, name, trace id, parent span id)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        export = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource_spans in export.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    _Collector.spans.append((service, span.name, span.trace_id.hex(), span.parent_span_id.hex()))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_workers_export_their_spans_to_an_otlp_collector(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Collector.spans = []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    config = make_config(op("relay", "http_ops:Relay", parameters={"next": "answer"}), op("answer", "http_ops:Answer"))
    try:
        async with running(config, nats_url) as deployment, connected(deployment) as conn:
            response = await conn.operator("relay").infer(parameters={"text": "hi"})
            assert response.parameters["text"] == "HI"
            deadline = time.monotonic() + 10
            while len({s[0] for s in _Collector.spans}) < 2:
                assert time.monotonic() < deadline, f"spans collected: {_Collector.spans}"
                await asyncio.sleep(0.1)
    finally:
        server.shutdown()
    by_name = {name: (service, trace, parent) for service, name, trace, parent in _Collector.spans}
    # The test's own call is not traced, so the trace starts at the relay's execute.
    assert by_name["execute relay"][0] == "test.relay" and by_name["execute relay"][2] == ""
    assert by_name["call answer"][:2] == ("test.relay", by_name["execute relay"][1])
    assert by_name["execute answer"][:2] == ("test.answer", by_name["execute relay"][1])
    assert by_name["queue answer"][:2] == ("test.answer", by_name["execute relay"][1])
