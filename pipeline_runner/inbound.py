"""Where a worker's requests come from: one interface, one typed delivery.

Two implementations hand a worker its requests: a core NATS queue group
(:class:`~pipeline_runner.queue_group.QueueGroupInbound`, at-most-once) and a JetStream work
queue (:class:`~pipeline_runner.work_queue.WorkQueueConsumer`, at-least-once). The worker sees
only :class:`Delivery` objects and never asks which one it has.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

# NATS header on a request sent again by its caller (the count of resends), after the caller's
# connection to NATS broke while the request was open: its response may have been lost.
RESEND_HEADER = "PR-Resend"


class Delivery:
    """One request message as an inbound delivered it."""

    __slots__ = ("data", "reply_to", "attempt", "sent_at", "received_at", "outcome", "_settle", "_message")

    def __init__(
        self,
        data: bytes,
        reply_to: str | None,
        attempt: int,
        sent_at: float | None = None,
        settle: Callable[[Any], Awaitable[None]] | None = None,
        message: Any = None,
    ):
        #: The framed request (see :mod:`pipeline_runner.protocol`), not yet decoded.
        self.data = data
        #: The caller's reply subject where the transport knows it (None: only the header names it).
        self.reply_to = reply_to
        #: 1 for a first delivery; each redelivery and each resend by the caller adds one.
        self.attempt = attempt
        #: ``time.monotonic()`` value of when the caller sent it, where the transport knows it.
        self.sent_at = sent_at
        #: ``time.monotonic()`` value of when this process received it.
        self.received_at = time.monotonic()
        #: How the worker ended it without running it (set where it does), for its metrics.
        self.outcome = "internal"
        self._settle = settle
        self._message = message

    def deadline(self, timeout_s: float) -> float:
        """The ``time.monotonic()`` value at which the caller, who gave ``timeout_s``, gives up."""
        start = self.sent_at if self.sent_at is not None else time.monotonic()
        return start + timeout_s

    async def done(self) -> None:
        """The request has its final response (or never will): the inbound may forget it."""
        if self._settle is not None:
            await self._settle(self._message)


OnDelivery = Callable[[Delivery], Awaitable[None]]


class Inbound(ABC):
    """A source of requests for one worker. Every delivery must end with :meth:`Delivery.done`."""

    @abstractmethod
    async def start(self, on_delivery: OnDelivery, capacity: Callable[[], int]) -> None:
        """Begin handing requests to ``on_delivery``; returns once requests can arrive.

        ``capacity()`` is how many more the worker can take now: an inbound that pulls asks
        for no more; one that is pushed to may deliver more, which the worker refuses.
        """

    @abstractmethod
    async def stop_taking(self) -> None:
        """Deliver nothing new; deliveries already made still end with ``done``."""

    @abstractmethod
    async def close(self) -> None:
        """Release what :meth:`start` set up (after the deliveries in hand are done)."""

    async def capacity_freed(self) -> None:
        """The worker finished requests: an inbound that pulls may ask for more now."""


def resend_count(headers: Mapping[str, str] | None) -> int:
    """How many times the caller has sent this request again (0 for a first send)."""
    value = (headers or {}).get(RESEND_HEADER, "0")
    return int(value) if value.isdigit() and len(value) < 4 else 0
