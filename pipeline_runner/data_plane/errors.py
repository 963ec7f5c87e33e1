"""Errors of the data plane."""

from __future__ import annotations

from ..errors import RunnerError


class DataPlaneError(RunnerError):
    """A tensor could not be fetched: unknown or freed at its producer, producer gone, or timed out."""
