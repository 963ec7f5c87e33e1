"""JetStream work queues: a request waits in NATS until a worker has answered it.

An operator with ``delivery.mode: at_least_once`` gets one work-queue stream that captures its
subject. Callers publish exactly as for core request/reply (the stream answers their reply
address with a PubAck); workers pull only as many requests as they have free slots, send
progress while they work, and acknowledge a request after its final response is sent. A
request whose worker goes silent for ``ack_wait`` is delivered to another worker.

Like the rest of the request plane, this module knows subjects and messages, not tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from .errors import RunnerError

log = logging.getLogger(__name__)

CONSUMER = "workers"
# How long one pull request lingers on the server while a worker is idle.
_PULL_EXPIRES_S = 5.0
_API_TIMEOUT_S = 5.0
_ERR_STREAM_CONFIG_DIFFERS = 10058
_ERR_STORAGE_CHANGE = 10052


def stream_name(deployment: str, operator: str, version: int) -> str:
    """The work-queue stream of one operator version (names are already subject-safe)."""
    return f"PR_{deployment}_{operator}_v{version}"


@dataclass(frozen=True)
class WorkQueueSettings:
    """Shape of one operator's work queue."""

    stream: str
    subject: str
    max_messages: int
    ack_wait_s: float
    storage: Literal["memory", "file"] = "memory"

    def stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.stream,
            subjects=[self.subject],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE if self.storage == "file" else api.StorageType.MEMORY,
            max_msgs=self.max_messages,
            # A full queue refuses new requests (the caller's PubAck says so) rather than
            # dropping old ones: that is the operator's back-pressure.
            discard=api.DiscardPolicy.NEW,
        )

    def consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            # Workers bound attempts themselves (they answer "worker_lost" past the limit), so
            # the server never gives up on a request silently.
            max_deliver=-1,
            max_ack_pending=self.max_messages,
        )


def _jetstream_missing(url_hint: str) -> RunnerError:
    return RunnerError(
        f"the NATS server{url_hint} has no JetStream, which delivery.mode 'at_least_once' needs: "
        "start it with JetStream (nats-server -js) or set the operator's delivery.mode to 'at_most_once'"
    )


async def ensure_work_queue(nc: NATS, settings: WorkQueueSettings) -> None:
    """Create (or bring up to date) the stream and its durable consumer; safe to race."""
    jsm = nc.jsm(timeout=_API_TIMEOUT_S)
    config = settings.stream_config()
    try:
        try:
            await jsm.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _ERR_STREAM_CONFIG_DIFFERS:
                raise
            try:
                await jsm.update_stream(config)
            except nats.js.errors.APIError as update_exc:
                if update_exc.err_code != _ERR_STORAGE_CHANGE:
                    raise
                log.warning("re-creating %s with %s storage; requests waiting in it are dropped",
                            settings.stream, settings.storage)
                await jsm.delete_stream(settings.stream)
                await jsm.add_stream(config)
        await jsm.add_consumer(settings.stream, settings.consumer_config())
    except nats.errors.NoRespondersError:
        raise _jetstream_missing("") from None
    except nats.js.errors.APIError as exc:
        raise RunnerError(f"cannot set up the work queue {settings.stream}: {exc.description or exc}") from None


async def remove_work_queue(nc: NATS, stream: str) -> bool:
    """Delete ``stream`` if it exists (an operator switched to at-most-once delivery)."""
    try:
        return bool(await nc.jsm(timeout=_API_TIMEOUT_S).delete_stream(stream))
    except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False


class WorkQueueConsumer:
    """Pulls requests for one worker, at most ``capacity()`` at a time, and keeps them alive.

    ``on_message`` is called for every delivered request. Each must end with :meth:`done`
    (after its final response is sent); until then the consumer tells JetStream, every third
    of ``ack_wait``, that the request is still being worked on.
    """

    def __init__(
        self,
        nc: NATS,
        settings: WorkQueueSettings,
        on_message: Callable[[Msg], None],
        capacity: Callable[[], int],
    ):
        self._nc = nc
        self.settings = settings
        self._on_message = on_message
        self._capacity = capacity
        self._held: dict[int, tuple[Msg, float]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: nats.js.JetStreamContext.PullSubscription | None = None

    @property
    def held(self) -> int:
        """Requests delivered to this worker and not yet acknowledged."""
        return len(self._held)

    async def start(self) -> None:
        await ensure_work_queue(self._nc, self.settings)
        self._sub = await self._nc.jetstream().pull_subscribe_bind(
            durable=CONSUMER, stream=self.settings.stream
        )
        self._tasks = [
            asyncio.create_task(self._pull_loop()),
            asyncio.create_task(self._progress_loop()),
        ]

    def wake(self) -> None:
        """Capacity was freed: pull again."""
        self._wake.set()

    async def done(self, msg: Msg) -> None:
        """Acknowledge ``msg``: JetStream deletes it and never delivers it again."""
        self._held.pop(id(msg), None)
        with contextlib.suppress(Exception):  # NATS away: it is redelivered, callers dedup
            await msg.ack()

    async def stop_pulling(self) -> None:
        """Take no more requests; held ones still need :meth:`done` (or are redelivered)."""
        pull = self._tasks[0] if self._tasks else None
        if pull is not None:
            pull.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pull
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def stop(self) -> None:
        await self.stop_pulling()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pull_loop(self) -> None:
        assert self._sub is not None
        failures = 0
        while True:
            free = self._capacity()
            if free <= 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                msgs = await self._sub.fetch(batch=free, timeout=_PULL_EXPIRES_S)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue  # idle
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away, or the stream vanished with a restarted server
                failures += 1
                level = logging.WARNING if failures in (1, 10) else logging.DEBUG
                log.log(level, "pulling from %s failed (%s); retrying", self.settings.stream, exc)
                await asyncio.sleep(min(0.1 * failures, 2.0))
                if self._nc.is_connected:
                    with contextlib.suppress(Exception):
                        await ensure_work_queue(self._nc, self.settings)
                continue
            failures = 0
            now = time.monotonic()
            for msg in msgs:
                self._held[id(msg)] = (msg, now)
                self._on_message(msg)

    async def _progress_loop(self) -> None:
        period = self.settings.ack_wait_s / 3
        while True:
            await asyncio.sleep(period)
            stale = time.monotonic() - period
            for msg, since in list(self._held.values()):
                if since <= stale:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
