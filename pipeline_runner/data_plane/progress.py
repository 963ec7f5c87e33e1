"""Drives a UCX worker from the asyncio event loop, without a thread.

The worker is polled between the loop's other tasks until ``LINGER_S`` passes in which UCX
moved nothing (also while requests of ours are in flight: see ``LINGER_S``); then it is armed and
the loop sleeps on its epoll descriptor, so an idle transport costs no CPU. Completions run
callbacks directly, from within the progress pass that completed them. This scheme was chosen
over ucxx's own progress modes (polling, thread, thread with futures) by measurement: see
benchmarks/RESULTS.md, "Data plane: measurements formerly in ucx_transport.py comments".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .errors import DataPlaneError

log = logging.getLogger(__name__)

Callback = Callable[[BaseException | None], None]

# Keep polling this long after UCX last moved anything before sleeping on the epoll descriptor:
# the next message of an exchange usually follows within microseconds, and a wakeup from epoll
# costs far more than that. (Counted from the last progress, not the last completion: a large
# transfer moves fragment after fragment for milliseconds before it completes.) Lingering also
# ends while our own requests are pending: a process that polls until its peer answers keeps
# the CPU the peer was woken on, and the peer waits for the scheduler to move it (what both
# choices cost: RESULTS.md, see the module docstring).
LINGER_S = 200e-6
# Longest stretch the worker is progressed without letting the loop's other tasks run
# (``worker.progress()`` would copy a whole large message in one call).
PROGRESS_BUDGET_S = 1e-3
# While requests are pending, progress the worker at least this often even without an event
# (against a lost wakeup; ucxx's blocking mode does the same every second).
SAFETY_TICK_S = 0.5
# Scan for completions at least every this many passes that moved nothing (a request can also
# complete outside a progress call, e.g. when its endpoint is closed).
COLLECT_EVERY = 64

_NEVER_DROPPED: list[Any] = []  # see Progress.keep


class Progress:
    """Progresses one UCX worker on one event loop and calls back when requests complete.

    ``watch(req, callback)`` calls ``callback(error or None)`` once ``req`` completes. Watching
    an *active* request, and any event, starts polling the worker between the loop's other
    tasks; after ``LINGER_S`` without a completion it is armed and the loop sleeps on its epoll
    descriptor (with a safety tick while requests are pending). Inactive requests (a posted
    receive, a fire-and-forget send) are collected whenever the worker is progressed anyway.
    """

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop):
        self._worker = worker
        self._loop = loop
        # id(request) -> [request, callback, active, object kept alive while UCX may use it]
        # (a list, not an object: this is on every request's path)
        self._pending: dict[int, list[Any]] = {}
        self._active = 0
        self._idle_passes = 0
        self._timers: set[asyncio.TimerHandle] = set()
        self._spinner: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.closed = False  # read-only outside; an attribute, not a property: read per message
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._on_event)
        worker.arm()

    def watch(self, req: Any, callback: Callback, *, keep: Any, active: bool = True) -> None:
        """Call ``callback`` when ``req`` completes; ``keep`` stays referenced until then."""
        if req.completed:
            callback(error_of(req))
            return
        self._pending[id(req)] = [req, callback, active, keep]
        if active:
            self._active += 1
            self.kick()
        elif self._tick is None:
            self._tick = self._loop.call_later(SAFETY_TICK_S, self._on_tick)

    def demote(self, req: Any) -> None:
        """Keep watching ``req`` (and its buffer), but stop polling the worker for it."""
        entry = self._pending.get(id(req))
        if entry is not None and entry[0] is req and entry[2]:
            entry[2] = False
            self._active -= 1

    def discard(self, req: Any) -> None:
        """Stop watching ``req`` without a callback; dropping it cancels it in UCX."""
        entry = self._pending.get(id(req))
        if entry is not None and entry[0] is req:
            del self._pending[id(req)]
            self._active -= entry[2]

    def discard_later(self, reqs: list[Any], delay_s: float) -> None:
        if not reqs or self.closed:
            return

        def discard() -> None:
            self._timers.discard(timer)
            for req in reqs:
                self.discard(req)

        timer = self._loop.call_later(delay_s, discard)
        self._timers.add(timer)

    def keep(self, obj: Any) -> None:
        """Never drop ``obj``: an endpoint whose close failed (ucxx's destructor would close it
        synchronously, which can wait on its peer forever)."""
        _NEVER_DROPPED.append(obj)

    def kick(self) -> None:
        """Poll the worker from the next loop iteration on (until idle and lingered)."""
        if not self.closed and (self._spinner is None or self._spinner.done()):
            self._spinner = self._loop.create_task(self._poll())

    def close(self) -> None:
        """Stop progressing; every request still watched is called back with an error."""
        self.closed = True
        if self._spinner is not None:
            self._spinner.cancel()
        if self._tick is not None:
            self._tick.cancel()
        for timer in self._timers:
            timer.cancel()
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        pending, self._pending = self._pending, {}
        self._active = 0
        stopped = DataPlaneError("the UCX transport was stopped")
        for _, callback, _, _ in pending.values():
            _call(callback, stopped)

    def _advance(self, collect: bool = False) -> bool:
        """Progress the worker (for at most ``PROGRESS_BUDGET_S``) and run the callbacks of
        what completed; True if UCX moved anything.

        The pending requests are scanned for completions only after a pass that moved
        something, when ``collect`` says so, or after ``COLLECT_EVERY`` passes that did not:
        a pass that moved nothing completed nothing, and with many transfers in flight the
        scan (a lock per request) cost more than the polling itself. (``_poll`` scans once more
        before it sleeps.)

        (Polling on inside this call while a transfer is pending, instead of yielding to the
        loop in between, was tried: no faster, and slower for small messages.)
        """
        worker = self._worker
        if worker.progress_once():
            moved = True
            end = time.perf_counter() + PROGRESS_BUDGET_S
            while worker.progress_once():
                if time.perf_counter() >= end:
                    break
            else:
                worker.progress()  # idle now; this also runs ucxx's cancellations of failed endpoints
        else:
            worker.progress()
            moved = False
            self._idle_passes += 1
        if moved or collect or self._idle_passes >= COLLECT_EVERY:
            self._idle_passes = 0
            self._collect()
        return moved

    def _collect(self) -> bool:
        """Run the callbacks of the requests that completed; True if any ran."""
        pending = self._pending
        done = [key for key, entry in pending.items() if entry[0].completed]
        if not done:
            return False
        entries = [pending.pop(key) for key in done]  # callbacks may watch and discard others
        for req, callback, active, _ in entries:
            self._active -= active
            _call(callback, error_of(req))
        return True

    def _on_event(self) -> None:
        if self.closed:
            return
        self._advance(collect=True)
        self.kick()  # linger: the next message of an exchange is usually right behind

    def _on_tick(self) -> None:
        self._tick = None
        if self.closed:
            return
        self._advance(collect=True)
        if self._pending:
            self._tick = self._loop.call_later(SAFETY_TICK_S, self._on_tick)
        if self._active:
            self.kick()

    async def _poll(self) -> None:
        last = time.perf_counter()
        while not self.closed:
            if self._advance():
                last = time.perf_counter()
            if time.perf_counter() - last >= LINGER_S and not self._collect() and self._worker.arm():
                # Armed: the epoll descriptor reports the next event to the loop.
                if self._pending and self._tick is None:
                    self._tick = self._loop.call_later(SAFETY_TICK_S, self._on_tick)
                return
            await asyncio.sleep(0)


def error_of(req: Any) -> BaseException | None:
    """The error a completed UCX request ended with, or None."""
    try:
        req.check_error()
    except Exception as exc:
        return exc
    return None


def log_failure(exc: BaseException | None) -> None:
    """A callback for fire-and-forget messages: a failure is only worth a debug line."""
    if exc is not None:
        log.debug("data-plane message failed: %s", exc)


def _call(callback: Callback, exc: BaseException | None) -> None:
    try:
        callback(exc)
    except Exception:
        log.exception("data-plane completion callback failed")
