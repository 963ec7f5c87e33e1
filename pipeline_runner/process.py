"""Helpers for the child processes the runner starts (workers, ingress, nats-server, Triton, pip)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

from .errors import RunnerError

#: Environment variable naming the file descriptor a worker or ingress reports its state on.
STATUS_FD_ENV = "PIPELINE_RUNNER_STATUS_FD"
#: ``asyncio`` runs the hot-path processes on the standard event loop instead of uvloop.
EVENT_LOOP_ENV = "PIPELINE_RUNNER_EVENT_LOOP"


def use_fast_event_loop() -> str:
    """Run this process's asyncio on uvloop unless ``PIPELINE_RUNNER_EVENT_LOOP=asyncio``.

    Workers, ingress processes and ``runner client`` call it before ``asyncio.run``: uvloop spends
    less CPU per message (benchmarks/RESULTS.md, "Hop"). Returns the loop chosen.
    """
    if os.environ.get(EVENT_LOOP_ENV, "uvloop").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def report_status(event: str, **fields: Any) -> None:
    """Tell the deployment process ``event`` ("ready", "failed") as one JSON line on the status pipe."""
    fd = os.environ.get(STATUS_FD_ENV)
    if not fd:
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), (json.dumps({"event": event, **fields}) + "\n").encode())


def run_reporting_failure(main: Coroutine[Any, Any, None], what: str, log: logging.Logger) -> int:
    """Run ``main`` to the end; a failure is logged and reported on the status pipe (exit code 3)."""
    try:
        asyncio.run(main)
    except RunnerError as exc:
        log.error("%s", exc)
        report_status("failed", error=str(exc))
        return 3
    except Exception as exc:
        log.exception("%s failed", what)
        report_status("failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    return 0


def die_with_parent() -> None:
    """``preexec_fn``: ask Linux to SIGTERM the child when its parent dies, so none is orphaned."""
    with contextlib.suppress(Exception):  # not Linux: nothing to ask
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
