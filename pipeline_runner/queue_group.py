"""At-most-once delivery: workers of one operator share its subject in a core NATS queue group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .inbound import Delivery, Inbound, OnDelivery, resend_count
from .work_queue import remove_work_queue

if TYPE_CHECKING:
    from .request_plane import RequestPlane

log = logging.getLogger(__name__)


class QueueGroupInbound(Inbound):
    """Requests pushed by NATS to one member of ``queue``; nothing is kept if the worker dies."""

    def __init__(self, plane: RequestPlane, subject: str, queue: str, work_queue_stream: str):
        self._plane = plane
        self._subject = subject
        self._queue = queue
        self._work_queue_stream = work_queue_stream
        self._sub: Subscription | None = None
        self._on_delivery: OnDelivery | None = None

    async def start(self, on_delivery: OnDelivery, capacity: Callable[[], int]) -> None:
        # Left over from an at-least-once deployment, the stream would swallow our requests.
        if await remove_work_queue(self._plane.nats, self._work_queue_stream):
            log.info("removed the work queue of %s: delivery is now at most once", self._subject)
        self._on_delivery = on_delivery
        self._sub = await self._plane.serve(self._subject, self._queue, self._on_message)

    async def _on_message(self, msg: Msg) -> None:
        assert self._on_delivery is not None
        await self._on_delivery(Delivery(msg.data, msg.reply or None, 1 + resend_count(msg.headers)))

    async def stop_taking(self) -> None:
        if self._sub is not None:
            await self._plane.stop_serving(self._sub)
            self._sub = None

    async def close(self) -> None:
        await self.stop_taking()
