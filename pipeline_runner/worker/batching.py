"""Forming batches: which waiting requests run together in one ``execute``, and when.

A batch starts when it is full, or once its first request has waited ``max_wait_ms``, or at
once when a waiting request's deadline is closer than ``max_wait_ms`` (it is never held until
its caller gave up). It also needs free slots: each request of a batch takes one of the
worker's ``max_inflight_requests``. Without a wait (``max_wait_ms: 0``) a batch is whatever
arrived in the same turn of the event loop. Unbatched (``max_batch_size: 1``) a request starts
the moment it arrives and a slot is free, with no callback in between.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import BatchingConfig
from ..inbound import Delivery
from ..operator import Request

# A timer may fire this much before its time (the loop's clock resolution): close anyway.
_EARLY_S = 0.0002


@dataclass(slots=True)
class Admitted:
    """A decoded request waiting for its batch."""

    request: Request
    delivery: Delivery
    #: ``time.monotonic()`` value of when the worker admitted it.
    arrived: float


@dataclass(slots=True)
class Batch:
    """Requests that run in one ``execute`` call."""

    members: list[Admitted]
    #: ``time.monotonic()`` value of when the batch was formed.
    formed: float

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def waited_s(self) -> float:
        """How long its first request waited in this worker for the batch to form."""
        return self.formed - self.members[0].arrived

    @property
    def requests(self) -> list[Request]:
        return [m.request for m in self.members]


class BatchFormer:
    """Holds admitted requests and hands them to ``start`` in batches, oldest first."""

    def __init__(
        self,
        policy: BatchingConfig,
        free_slots: Callable[[], int],
        start: Callable[[Batch], None],
    ):
        self.max_batch_size = policy.max_batch_size
        self.max_wait_s = policy.max_wait_ms / 1000
        self._free_slots = free_slots
        self._start = start
        self._waiting: deque[Admitted] = deque()
        # When the waiting requests' batch must start at the latest (inf: none waiting).
        self._close_at = float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        # Unbatched, or waiting anyway: decide at once; else let the loop's turn add to the batch.
        self._at_once = self.max_batch_size == 1

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, admitted: Admitted) -> None:
        """Queue ``admitted``; it runs in the next batch that has room for it."""
        if self._at_once and not self._waiting and self._free_slots() > 0:
            self._start(Batch([admitted], admitted.arrived))  # unbatched and a slot free: no queueing
            return
        self._waiting.append(admitted)
        self._note_close(admitted)
        if self._at_once or self.max_wait_s > 0:
            self.form()  # full, or a deadline near: now; else the timer
        else:
            self._form_soon()

    def slots_freed(self) -> None:
        """Slots came free; batches finishing in the same turn of the loop free theirs too."""
        if self._at_once:
            self.form()
        else:
            self._form_soon()

    def remove(self, request_id: str) -> Admitted | None:
        """Take a waiting request out (its caller gave up), if it is still waiting."""
        for admitted in self._waiting:
            if admitted.request.id == request_id:
                self._waiting.remove(admitted)
                self._recompute_close()
                return admitted
        return None

    def form(self) -> None:
        """Start every batch that is due and has slots: call when requests or slots arrive."""
        while self._waiting:
            free = self._free_slots()
            if free <= 0:
                return  # the batch grows meanwhile; slots freeing call form() again
            full = len(self._waiting) >= self.max_batch_size and free >= self.max_batch_size
            if not full and time.monotonic() + _EARLY_S < self._close_at:
                self._arm_timer()
                return
            size = min(len(self._waiting), self.max_batch_size, free)
            members = [self._waiting.popleft() for _ in range(size)]
            self._recompute_close()
            self._disarm_timer()  # it was set for these members; the rest get their own
            self._start(Batch(members, time.monotonic()))
        self._disarm_timer()

    def _note_close(self, admitted: Admitted) -> None:
        if self.max_wait_s <= 0:
            self._close_at = 0.0
            return
        if len(self._waiting) == 1:
            self._close_at = admitted.arrived + self.max_wait_s
        # Leave the request max_wait_s of its own time to run: a batch closing at its deadline
        # would start after its caller gave up.
        self._close_at = min(self._close_at, admitted.request.deadline - self.max_wait_s)

    def _recompute_close(self) -> None:
        self._close_at = float("inf")
        if not self._waiting:
            return
        if self.max_wait_s <= 0:
            self._close_at = 0.0
            return
        first = self._waiting[0].arrived + self.max_wait_s
        self._close_at = min(first, min(a.request.deadline for a in self._waiting) - self.max_wait_s)

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.when() <= self._timer_when() + _EARLY_S:
            return
        self._disarm_timer()
        self._timer = asyncio.get_running_loop().call_later(
            max(self._close_at - time.monotonic(), 0.0), self._on_timer
        )

    def _timer_when(self) -> float:
        """The close time in the loop's clock (uvloop's may differ from time.monotonic())."""
        return asyncio.get_running_loop().time() + (self._close_at - time.monotonic())

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _form_soon(self) -> None:
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._on_soon)

    def _on_soon(self) -> None:
        self._soon = None
        self.form()

    def _on_timer(self) -> None:
        self._timer = None
        self.form()

    def clear(self) -> list[Admitted]:
        """Everything still waiting, taken out (the worker is stopping)."""
        self._disarm_timer()
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        left = list(self._waiting)
        self._waiting.clear()
        self._close_at = float("inf")
        return left
