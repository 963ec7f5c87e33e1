"""OpenTelemetry traces of requests across hops: off, and free, unless configured.

Every hot-path hook first asks :func:`active` (one global read); OpenTelemetry is imported only
by :func:`configure`. The spans themselves live in :mod:`.spans`, the set-up in :mod:`.setup`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import TracingSettings

_provider: Any = None  # the SDK TracerProvider while tracing is on in this process


def active() -> bool:
    """True when this process records spans."""
    return _provider is not None


def configure(settings: TracingSettings | None, service: str, attributes: dict[str, str] | None = None,
              *, set_global: bool = True) -> None:
    """Record spans as ``service`` and export them as ``settings`` say (None: leave tracing off)."""
    global _provider
    if settings is None or _provider is not None:
        return
    from .setup import make_provider

    _provider = make_provider(settings, service, attributes or {}, set_global=set_global)
    from . import spans

    spans.use_tracer(_provider.get_tracer("pipeline_runner"))


def shutdown() -> None:
    """Export the spans still buffered and stop recording."""
    global _provider
    if _provider is None:
        return
    provider, _provider = _provider, None
    provider.shutdown()
