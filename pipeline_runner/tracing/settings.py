"""Whether, and where to, a process exports spans: the YAML ``tracing`` section or OTEL_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import TracingConfig
from ..errors import RunnerError

#: Not an OpenTelemetry variable: spans appended as JSON lines to this file (the file exporter).
TRACE_FILE_ENV = "PIPELINE_RUNNER_TRACE_FILE"
Exporter = Literal["otlp", "console", "file"]


@dataclass(frozen=True, slots=True)
class TracingSettings:
    exporter: Exporter
    file: Path | None = None
    sample_ratio: float = 1.0


def resolve_tracing(config: TracingConfig | None, environ: Mapping[str, str] | None = None) -> TracingSettings | None:
    """The settings in force, or None when tracing is off.

    The environment wins over the file: ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
    turn it off, ``OTEL_TRACES_EXPORTER=otlp|console`` or ``PIPELINE_RUNNER_TRACE_FILE`` on.
    """
    env = os.environ if environ is None else environ
    ratio = config.sample_ratio if config is not None else 1.0
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get(TRACE_FILE_ENV, "").strip():
        return TracingSettings("file", Path(env[TRACE_FILE_ENV].strip()).resolve(), ratio)
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if named:
        if named == ["none"]:
            return None
        exporter = named[0]
        if exporter not in ("otlp", "console"):
            raise RunnerError(f"OTEL_TRACES_EXPORTER={exporter!r}: pipeline_runner exports to 'otlp' or 'console' "
                              f"(or to a file: set {TRACE_FILE_ENV})")
        return TracingSettings(exporter, None, ratio)  # type: ignore[arg-type]
    if config is None or not config.enabled:
        return None
    file = Path(config.file).resolve() if config.file is not None else None
    return TracingSettings(config.exporter, file, ratio)
