"""Building the OpenTelemetry SDK pipeline: resource, sampler, exporter, batch processor."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from ..errors import RunnerError
from .settings import TracingSettings

# A file is read by `runner client --trace` right after a load test: export it promptly.
_FILE_EXPORT_DELAY_MS = 200


def make_provider(settings: TracingSettings, service: str, attributes: dict[str, str], *,
                  set_global: bool) -> TracerProvider:
    """A provider exporting as ``settings`` say; ``set_global`` also serves operators' own spans."""
    resource = Resource.create({"service.name": service, **attributes})
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if settings.sample_ratio < 1 else None
    provider = TracerProvider(resource=resource, sampler=sampler)
    delay = None
    if settings.exporter == "file" and "OTEL_BSP_SCHEDULE_DELAY" not in os.environ:
        delay = _FILE_EXPORT_DELAY_MS
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings), schedule_delay_millis=delay))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _exporter(settings: TracingSettings) -> SpanExporter:
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    if settings.exporter == "file":
        from .file_exporter import JsonLinesSpanExporter

        assert settings.file is not None
        return JsonLinesSpanExporter(settings.file)
    return _otlp_exporter()


def _otlp_exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    # Endpoint, headers and TLS come from the standard OTEL_EXPORTER_OTLP_* variables.
    try:
        if (protocol or "http/protobuf").strip() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_exporter

            return grpc_exporter.OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_exporter

        return http_exporter.OTLPSpanExporter()
    except ImportError:
        raise RunnerError(
            "tracing exporter 'otlp' needs the OTLP exporter: pip install 'pipeline_runner[otlp]'"
        ) from None
