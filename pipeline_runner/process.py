"""Helpers for the child processes the runner starts (nats-server, Triton, pip)."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent() -> None:
    """``preexec_fn``: ask Linux to SIGTERM the child when its parent dies, so none is orphaned."""
    with contextlib.suppress(Exception):  # not Linux: nothing to ask
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
