"""JetStream work queues: a request waits in NATS until a worker has answered it.

An operator with ``delivery.mode: at_least_once`` gets one work-queue stream that captures its
subject. Callers publish exactly as for core request/reply (the stream answers their reply
address with a PubAck); workers pull only as many requests as they have free slots, send
progress while they work, and acknowledge a request after its final response is sent. A
request whose worker goes silent for ``ack_wait`` is delivered to another worker.

What is particular to JetStream stays here: the stream and consumer, pull credit, progress acks,
a message's metadata (delivery count, when it was stored) and the PubAck a caller receives.

Like the rest of the request plane, this module knows subjects and messages, not tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from .errors import ProtocolError, RunnerError
from .inbound import Delivery, Inbound, OnDelivery, resend_count
from .protocol import ErrorInfo

log = logging.getLogger(__name__)

CONSUMER = "workers"
# How long one pull request lingers on the server while a worker is idle.
_PULL_EXPIRES_S = 5.0
_API_TIMEOUT_S = 5.0
_ERR_STREAM_CONFIG_DIFFERS = 10058
_ERR_STORAGE_CHANGE = 10052
# JetStream's answers when an operator's work queue is full (max messages / max bytes).
_QUEUE_FULL_ERRORS = {10077, 10078}


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
    replicas: int = 1

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
            num_replicas=self.replicas,
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


def _jetstream_missing() -> RunnerError:
    return RunnerError(
        "the NATS server has no JetStream, which delivery.mode 'at_least_once' needs: "
        "start it with JetStream (nats-server -js) or set the operator's delivery.mode to 'at_most_once'"
    )


async def ensure_work_queue(nc: NATS, settings: WorkQueueSettings, wait_s: float = 60.0) -> None:
    """Create (or bring up to date) the stream and its durable consumer; safe to race.

    A NATS cluster answers nothing while it elects its JetStream leader (seconds after it
    starts, or after losing the leader): that is waited out for up to ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await _ensure_work_queue(nc, settings)
            return
        except (nats.errors.TimeoutError, _Unavailable) as exc:
            if time.monotonic() >= deadline:
                raise RunnerError(
                    f"cannot set up the work queue {settings.stream}: JetStream could not for "
                    f"{wait_s:g} s ({exc}); is a majority of the NATS cluster up, and are there "
                    f"at least {settings.replicas} members (delivery.replicas)?"
                ) from None
            log.info("waiting for JetStream to set up %s (%s)", settings.stream, exc)
            await asyncio.sleep(0.5)


class _Unavailable(Exception):
    """JetStream answered that it cannot serve the request now (no leader yet)."""


# "JetStream system temporarily unavailable" (no leader yet), and "no suitable peers for
# placement" (a replicated stream while members are still joining the cluster).
_ERR_TEMPORARY = {10008, 10005}


async def _ensure_work_queue(nc: NATS, settings: WorkQueueSettings) -> None:
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
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
        if getattr(exc, "err_code", None) in _ERR_TEMPORARY:  # a 503 with a JSON reason
            raise _Unavailable(getattr(exc, "description", None) or str(exc)) from None
        raise _jetstream_missing() from None
    except nats.js.errors.APIError as exc:
        if exc.err_code in _ERR_TEMPORARY:
            raise _Unavailable(exc.description or str(exc)) from None
        raise RunnerError(f"cannot set up the work queue {settings.stream}: {exc.description or exc}") from None


async def remove_work_queue(nc: NATS, stream: str) -> bool:
    """Delete ``stream`` if it exists (an operator switched to at-most-once delivery)."""
    try:
        return bool(await nc.jsm(timeout=_API_TIMEOUT_S).delete_stream(stream))
    except (
        nats.js.errors.NotFoundError,
        nats.js.errors.ServiceUnavailableError,
        nats.errors.NoRespondersError,
        nats.errors.TimeoutError,
    ):
        return False


def is_puback(data: bytes) -> bool:
    """True for a work queue's answer to a caller's publish (JSON; framed messages never start so)."""
    return data[:1] == b"{"


def puback_stored(data: bytes) -> bool:
    """True for a PubAck saying the work queue stored the request (the usual answer)."""
    return is_puback(data) and b'"error"' not in data


def puback_refusal(data: bytes, subject: str) -> ErrorInfo | None:
    """Why the work queue of ``subject`` refused a request, from its PubAck; None when stored."""
    if b'"error"' not in data:  # the common case, without parsing
        return None
    try:
        ack = json.loads(data)
    except ValueError:
        raise ProtocolError(f"malformed answer on {subject}: {bytes(data[:80])!r}") from None
    error = ack.get("error") if isinstance(ack, dict) else None
    if not error:
        return None
    description = error.get("description", error)
    if error.get("err_code") in _QUEUE_FULL_ERRORS:
        return ErrorInfo(
            code="overloaded",
            message=(
                f"the work queue of {subject} is full ({description}): its workers already "
                "hold workers x (max_inflight_requests + max_queued_requests) requests"
            ),
        )
    return ErrorInfo(code="not_accepted", message=f"the work queue of {subject} refused the request: {description}")


class DeliveryMetadata(NamedTuple):
    """What the worker needs of JetStream's metadata of one delivery."""

    #: How many times JetStream has delivered the message (1 for the first time).
    delivered: int
    #: When the stream stored it, in ns since the epoch.
    stored_ns: int


def delivery_metadata(msg: Msg) -> DeliveryMetadata:
    """The delivery count and store time of ``msg``, read straight from its ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``, or
    with domain and account hash after ``ACK`` and a token at the end. nats-py's
    ``Msg.metadata`` builds dataclasses and a datetime for the same two numbers, many times the
    cost (RESULTS.md, "Hop: after"); a subject of another shape is left to it.
    """
    tokens = msg.reply.split(".")
    first = 4 if len(tokens) == 9 else 6
    try:
        return DeliveryMetadata(int(tokens[first]), int(tokens[first + 3]))
    except (IndexError, ValueError):
        metadata = msg.metadata
        return DeliveryMetadata(metadata.num_delivered, int(metadata.timestamp.timestamp() * 1e9))


class WorkQueueConsumer(Inbound):
    """Pulls requests for one worker, as many as it has capacity for, and keeps them alive.

    Every request is handed on as it arrives. Each must end with ``Delivery.done`` (after its
    final response is sent), which acknowledges it; until then the consumer tells JetStream,
    every third of ``ack_wait``, that the request is still being worked on.

    Pull requests are sent by hand rather than through nats-py's ``fetch``, whose batches are
    handed over only when complete: a request delivered early in a batch would wait for the
    rest. Here each message goes to the worker the moment it arrives, and credit (how many
    more messages the server may send) is topped up as slots free.
    """

    def __init__(self, nc: NATS, settings: WorkQueueSettings):
        self._nc = nc
        self.settings = settings
        self._hand_on: OnDelivery | None = None
        self._capacity: Callable[[], int] = lambda: 0
        self._settle = self._acknowledge  # bound once, shared by every Delivery
        self._held: dict[int, tuple[Msg, float]] = {}
        # Open pull requests, oldest first: [messages the server may still send, expiry].
        self._pulls: deque[list[float]] = deque()
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream}.{CONSUMER}"
        self._deliver = nc.new_inbox()
        self._sub: Subscription | None = None
        self._pulling = False
        self._reconnects = 0
        self._broken_since: float | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._repair: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """Requests delivered to this worker and not yet acknowledged."""
        return len(self._held)

    async def start(self, on_delivery: OnDelivery, capacity: Callable[[], int]) -> None:
        self._hand_on, self._capacity = on_delivery, capacity
        await ensure_work_queue(self._nc, self.settings)
        self._sub = await self._nc.subscribe(
            self._deliver, cb=self._on_delivery, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
        )
        self._pulling = True
        self._reconnects = self._nc.stats["reconnects"]
        await self._pull()
        self._ticker = asyncio.create_task(self._tick())

    async def capacity_freed(self) -> None:
        """Top up the credit."""
        if self._pulling:
            await self._pull()

    async def _acknowledge(self, msg: Msg) -> None:
        """JetStream deletes ``msg`` and never delivers it again."""
        self._held.pop(id(msg), None)
        with contextlib.suppress(Exception):  # NATS away: it is redelivered, callers dedup
            await msg.ack()

    async def stop_taking(self) -> None:
        """Take no more requests; held ones still need ``done`` (or are redelivered)."""
        self._pulling = False
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()  # open pull requests die with their interest
            self._sub = None
        self._pulls.clear()

    async def close(self) -> None:
        await self.stop_taking()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._repair is not None:
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._repair
            self._repair = None

    async def _pull(self) -> None:
        """Ask for as many messages as there are free slots not yet covered by credit."""
        now = time.monotonic()
        while self._pulls and self._pulls[0][1] < now:
            self._pulls.popleft()  # its expiry notice was lost (e.g. in a reconnect)
        credit = int(sum(p[0] for p in self._pulls))
        wanted = self._capacity() - credit
        # While credit remains, wait for a few free slots rather than pull for each one.
        if wanted <= 0 or (credit and wanted < self._min_batch()):
            return
        if not self._pulling or not self._nc.is_connected:
            return
        request = {"batch": wanted, "expires": int(_PULL_EXPIRES_S * 1e9)}
        self._pulls.append([wanted, now + _PULL_EXPIRES_S + 1.0])
        with contextlib.suppress(Exception):
            await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=self._deliver)

    def _min_batch(self) -> int:
        return max(1, (self._capacity() + self.held) // 4)

    async def _on_delivery(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            if self._pulls:
                self._pulls[0][0] -= 1
                if self._pulls[0][0] <= 0:
                    self._pulls.popleft()
            self._broken_since = None
            self._held[id(msg)] = (msg, time.monotonic())
            assert self._hand_on is not None
            await self._hand_on(self._delivery(msg))
            return
        if status in ("404", "408"):  # the oldest pull request ended (none left / expired)
            if self._pulls:
                self._pulls.popleft()
        elif status == "100":  # idle heartbeat
            return
        else:
            # 409 (consumer deleted, leadership change, ...) or 503 (no stream: a restarted
            # server lost it): every open pull is void; the tick rebuilds the queue.
            self._pulls.clear()
            if self._broken_since is None:
                self._broken_since = time.monotonic()
                log.warning("pulling from %s failed: %s %s", self.settings.stream, status,
                            msg.headers.get("Description", "") if msg.headers else "")
            return
        await self._pull()

    def _delivery(self, msg: Msg) -> Delivery:
        metadata = delivery_metadata(msg)
        # A caller's resends count as attempts too, like JetStream's own redeliveries.
        attempt = metadata.delivered + resend_count(msg.headers)
        # The deadline counts from when the caller sent it, however long it waited here.
        sent_at = time.monotonic() - (time.time_ns() - metadata.stored_ns) / 1e9
        # msg.reply is JetStream's ack subject: the caller's reply subject is in the header.
        return Delivery(msg.data, None, attempt, sent_at, self._settle, msg)

    async def _tick(self) -> None:
        """Progress for held requests; recover pulls lost to reconnects or a vanished stream."""
        period = self.settings.ack_wait_s / 3
        while True:
            await asyncio.sleep(min(period, 1.0))
            now = time.monotonic()
            for msg, since in list(self._held.values()):
                if now - since >= period:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                    self._held[id(msg)] = (msg, now)
            if not self._pulling or not self._nc.is_connected:
                continue
            reconnects = self._nc.stats["reconnects"]
            if reconnects != self._reconnects:
                # Pull requests do not survive a reconnect; the stream may not have either.
                self._reconnects = reconnects
                self._pulls.clear()
                self._broken_since = self._broken_since or now
            if self._broken_since is not None:
                # In its own task: a JetStream API call may wait seconds (a cluster electing
                # a leader), which must not hold up the progress acks above.
                if self._repair is None or self._repair.done():
                    self._repair = asyncio.create_task(self._rebuild())
                continue
            await self._pull()

    async def _rebuild(self) -> None:
        with contextlib.suppress(Exception):
            await ensure_work_queue(self._nc, self.settings, wait_s=0)
            self._broken_since = None
            self._pulls.clear()
            await self._pull()
