"""The NATS request plane: subjects, request/response streams and serving.

It moves framed messages (see :mod:`pipeline_runner.protocol`) and knows request ids, reply
subjects and deadlines, but nothing about tensors or operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .errors import PayloadTooLargeError, ProtocolError, RequestTimeoutError, RunnerError
from .inbound import RESEND_HEADER
from .nats_security import NatsClientOptions, redact_url
from .protocol import ErrorInfo, ResponseHeader, decode_response
from .work_queue import is_puback, puback_refusal, puback_stored

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "pr"
_NO_RESPONDERS = "503"
# Backoff while nobody serves a subject (workers starting or restarting): short first, then capped.
_RETRY_FIRST_S = 0.02
_RETRY_MAX_S = 0.5
_FIRST_CONNECT_ATTEMPTS = 3
# Final responses are kept this long, and at least until a flush sent after them came back: a
# cluster member that dies may take responses it accepted (but had not routed on) with it, and
# they are published again after the reconnect. Bounded in bytes.
_JOURNAL_S = 2.0
_JOURNAL_MAX_BYTES = 64 << 20
_CONFIRM_EVERY_S = 0.5
# Detect a server that vanished without closing the connection (a host crash) within ~30 s.
_PING_INTERVAL_S = 10
_MAX_OUTSTANDING_PINGS = 3
# How long nats-py itself waits for the PONG of a round trip we start: past the ~40 s in which a
# silent server is taken for gone and the connection is replaced (which drops the wait).
_PONG_WAIT_S = _PING_INTERVAL_S * (_MAX_OUTSTANDING_PINGS + 2)


def operator_subject(deployment: str, operator: str, version: int) -> str:
    """The subject workers of ``operator`` (of ``deployment``, at ``version``) listen on."""
    return f"{SUBJECT_PREFIX}.{deployment}.{operator}.v{version}"


def cancel_subject(deployment: str, operator: str, version: int) -> str:
    """Where callers announce that they gave up on a request (every worker of the operator hears it)."""
    return f"{operator_subject(deployment, operator, version)}._cancel"


def stats_subject(deployment: str) -> str:
    """The subject every worker of ``deployment`` answers with its counters."""
    return f"{SUBJECT_PREFIX}.{deployment}._stats"


def queue_group(deployment: str, operator: str, version: int) -> str:
    """The queue group shared by all workers of one operator version."""
    return f"{deployment}.{operator}.v{version}"


class RequestPlane:
    """One NATS connection used both to call operators and to serve them."""

    def __init__(self, nc: NATS):
        self._nc = nc
        # Request ids: unique across callers (cancels go to every worker of an operator), so a
        # random prefix per connection, then a counter (no random bytes per request).
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._inbox_prefix = f"_INBOX.{self._id_prefix}"
        self._inbox_sub: Subscription | None = None
        self._streams: dict[str, ResponseStream] = {}
        #: Responses that arrived after their request had ended (e.g. a second final answer
        #: from a redelivered request); they are dropped, never handed to a caller.
        self.late_responses = 0
        #: Requests sent again because the connection broke while they were open.
        self.resent_requests = 0
        #: Final responses published again after a reconnect (callers drop the duplicates).
        self.republished_responses = 0
        self._journal: deque[tuple[float, str, bytes]] = deque()
        self._journal_bytes = 0
        self._confirmed_at = 0.0  # when the last flush that came back was sent
        self._confirmer: asyncio.Task[None] | None = None
        self._resending: set[asyncio.Task[None]] = set()
        # Round trips (PING/PONG) in flight: task -> reconnect count when it began.
        self._round_trips: dict[asyncio.Task[None], int] = {}

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        options: NatsClientOptions | None = None,
        connect_timeout_s: float = 5.0,
    ) -> RequestPlane:
        """Connect to NATS at ``url`` with ``options``' credentials; reconnects forever after."""

        last_error = ""
        first_connect_errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            # While the server is away every reconnect attempt fails the same way: say it once.
            nonlocal last_error
            text = str(exc) or type(exc).__name__
            log.log(logging.DEBUG if text == last_error else logging.WARNING, "NATS error: %s", text)
            last_error = text
            if not connected:
                first_connect_errors.append(text)

        connected: list[NATS] = []

        async def on_disconnect() -> None:
            if connected and not (connected[0].is_draining or connected[0].is_closed):
                log.warning("disconnected from NATS")

        async def on_reconnect() -> None:
            nonlocal last_error
            last_error = ""
            log.info("reconnected to NATS")
            if planes:
                planes[0]._drop_old_round_trips()
                planes[0]._resend_open_requests()
                await planes[0]._republish_journal()

        planes: list[RequestPlane] = []

        try:
            # nats-py can hang after a failed TLS handshake: bound the whole first connect.
            nc = await asyncio.wait_for(nats.connect(
                # A cluster's members, comma-separated; nats-py also learns them from the server.
                servers=[u.strip() for u in url.split(",") if u.strip()],
                name=name,
                connect_timeout=connect_timeout_s,
                allow_reconnect=True,
                # nats-py retries a first connection forever when this is -1 (even on an
                # authorization error): try a few times, then lift the limit once connected.
                max_reconnect_attempts=_FIRST_CONNECT_ATTEMPTS,
                reconnect_time_wait=0.5,
                ping_interval=_PING_INTERVAL_S,
                max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **(options or NatsClientOptions()).connect_kwargs(),
            ), timeout=connect_timeout_s + _FIRST_CONNECT_ATTEMPTS * 0.5)
        except Exception as exc:  # nats-py raises several unrelated types here
            # After retries nats-py raises "no servers available"; the causes went to on_error,
            # and an authorization error is the one worth reporting.
            seen = first_connect_errors or [str(exc) or type(exc).__name__]
            cause = next((e for e in seen if "authorization" in e.lower()), seen[-1])
            hint = ""
            if "authorization" in cause.lower():
                hint = " (set PIPELINE_RUNNER_NATS_TOKEN, or _USER and _PASSWORD, to the deployment's credentials)"
            raise RunnerError(f"cannot connect to NATS at {redact_url(url)}: {cause}{hint}") from None
        nc.options["max_reconnect_attempts"] = -1  # reconnect forever from now on
        connected.append(nc)
        plane = cls(nc)
        plane._inbox_sub = await nc.subscribe(f"{plane._inbox_prefix}.*", cb=plane._on_response)
        planes.append(plane)
        return plane

    @property
    def nats(self) -> NATS:
        return self._nc

    @property
    def server_name(self) -> str | None:
        """Name of the NATS server this connection is on now (a cluster member's ``--name``)."""
        info = self._nc._server_info or {}  # nats-py keeps the server's INFO only here
        return info.get("server_name")

    @property
    def max_payload(self) -> int:
        return self._nc.max_payload

    @property
    def open_calls(self) -> int:
        """Requests sent from this connection still waiting for their final response."""
        return len(self._streams)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Drain subscriptions and close the connection (at once when NATS is unreachable)."""
        if self._confirmer is not None:
            self._confirmer.cancel()
            self._confirmer = None
        try:
            await self._close_connection(timeout_s)
        finally:
            for task in list(self._round_trips):  # only now: cancelled earlier, a late PONG would break the drain
                task.cancel()

    async def _close_connection(self, timeout_s: float) -> None:
        if self._nc.is_closed:
            return
        try:
            if not self._nc.is_connected:
                raise ConnectionError("not connected")
            await asyncio.wait_for(self._nc.drain(), timeout=timeout_s)
        except Exception:  # already closing, or the server is gone
            pass
        if not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), timeout=1.0)

    async def __aenter__(self) -> RequestPlane:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- calling --------------------------------------------------------------------------

    def open_stream(self, timeout_s: float) -> ResponseStream:
        """A stream for one request's responses, with a fresh id and reply subject."""
        request_id = f"{self._id_prefix}{next(self._ids):x}"
        stream = ResponseStream(self, request_id, f"{self._inbox_prefix}.{request_id}", timeout_s)
        self._streams[request_id] = stream
        return stream

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _resend_open_requests(self) -> None:
        # While the connection was down, responses published to our inbox went nowhere (core
        # NATS keeps no messages for an absent subscriber), and requests we had just
        # published may not have reached a server: send every open request again.
        for stream in list(self._streams.values()):
            if stream._may_resend():
                self.resent_requests += 1
                task = asyncio.create_task(stream._resend())
                self._resending.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._resending.discard)

    async def _on_response(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        stream = self._streams.get(request_id)
        if stream is not None:
            stream._deliver(msg)
        else:
            self.late_responses += 1

    # --- serving --------------------------------------------------------------------------

    async def serve(
        self, subject: str, queue: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        """Subscribe ``handler`` to ``subject`` in ``queue``; returns once the server knows it."""
        sub = await self._nc.subscribe(
            subject,
            queue=queue,
            cb=handler,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30,
        )
        if not await self.round_trip(timeout_s=5):
            raise RunnerError(f"the NATS server did not confirm the subscription to {subject} within 5 s")
        return sub

    async def stop_serving(self, sub: Subscription, timeout_s: float = 2.0) -> None:
        """Stop taking new messages; ones already buffered are still handed to the callback."""
        try:
            if not self._nc.is_connected:
                raise ConnectionError("not connected")
            await asyncio.wait_for(sub.drain(), timeout=timeout_s)
        except Exception:  # NATS is away: nothing more can arrive anyway
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def gather(self, subject: str, expected: int | None, timeout_s: float) -> list[dict[str, Any]]:
        """Ask every subscriber of ``subject`` (no queue group) and collect JSON answers."""
        inbox = self._nc.new_inbox()
        answers: list[dict[str, Any]] = []
        enough = asyncio.Event()

        async def collect(msg: Msg) -> None:
            with contextlib.suppress(ValueError):
                answers.append(json.loads(msg.data))
            if expected is not None and len(answers) >= expected:
                enough.set()

        sub = await self._nc.subscribe(inbox, cb=collect)
        try:
            await self._nc.publish(subject, b"", reply=inbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), timeout=timeout_s)
        finally:
            await sub.unsubscribe()
        return answers

    async def publish(
        self,
        subject: str,
        payload: bytes,
        reply: str = "",
        headers: dict[str, str] | None = None,
        *,
        size_checked: bool = False,
    ) -> None:
        """Publish ``payload``; too large a payload fails at once with PayloadTooLargeError.

        ``size_checked``: the caller has checked the size already (``tensor.check_payload``,
        which names the largest tensor), so it is not checked twice.
        """
        if not size_checked:
            self.check_payload(len(payload))
        await self._nc.publish(subject, payload, reply=reply, headers=headers)

    async def publish_response(self, subject: str, payload: bytes, final: bool) -> None:
        """Publish a response whose size the caller checked; a final one is kept a moment to be
        published again after a reconnect (see ``_JOURNAL_S``)."""
        await self.publish(subject, payload, size_checked=True)
        if not final:
            return
        self._journal.append((time.monotonic(), subject, payload))
        self._journal_bytes += len(payload)
        if self._journal_bytes > _JOURNAL_MAX_BYTES:
            self._trim_journal()  # by age, the confirmer trims it twice a second
        if self._confirmer is None:
            self._confirmer = asyncio.create_task(self._confirm())

    def _trim_journal(self) -> None:
        old = time.monotonic() - _JOURNAL_S
        journal = self._journal
        while journal and (
            self._journal_bytes > _JOURNAL_MAX_BYTES
            or (journal[0][0] < old and journal[0][0] < self._confirmed_at)
        ):
            self._journal_bytes -= len(journal.popleft()[2])

    async def _confirm(self) -> None:
        # A flush that comes back proves the server took everything published before it.
        while True:
            await asyncio.sleep(_CONFIRM_EVERY_S)
            if not self._journal or not self._nc.is_connected:
                continue
            sent = time.monotonic()
            if await self.round_trip(timeout_s=2):
                self._confirmed_at = sent
            self._trim_journal()

    async def round_trip(self, timeout_s: float) -> bool:
        """Whether the server answers a PING within ``timeout_s`` (so it has everything sent before).

        Unlike ``flush(timeout=...)``, a round trip that takes too long is never cancelled: with
        nats-py (2.16) the late PONG of a cancelled flush raises InvalidStateError in its read
        loop, which ends it, and the connection goes deaf without reconnecting. It is left to
        finish; a reconnect drops it (see ``_drop_old_round_trips``).
        """
        if self._nc.is_closed:
            return False
        task = asyncio.create_task(self._nc.flush(timeout=_PONG_WAIT_S))
        self._round_trips[task] = self._nc.stats["reconnects"]
        task.add_done_callback(self._round_trip_ended)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        return bool(done) and not task.cancelled() and task.exception() is None

    def _round_trip_ended(self, task: asyncio.Task[None]) -> None:
        self._round_trips.pop(task, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failed round trip is an answer, not an error to log

    def _drop_old_round_trips(self) -> None:
        # A reconnect gave nats-py a fresh list of awaited PONGs: those begun on the old
        # connection will never come, and cancelling them is safe now.
        reconnects = self._nc.stats["reconnects"]
        for task, began in list(self._round_trips.items()):
            if began < reconnects:
                task.cancel()

    async def _republish_journal(self) -> None:
        for _, subject, payload in list(self._journal):
            with contextlib.suppress(Exception):
                await self._nc.publish(subject, payload)
                self.republished_responses += 1

    def check_payload(self, size: int, what: str = "message") -> None:
        if size > self._nc.max_payload:
            raise PayloadTooLargeError(
                f"{what} of {size} bytes exceeds the NATS max payload of {self._nc.max_payload} bytes"
            )


class ResponseStream:
    """Responses to one request, in order, ending with the final one or at the deadline."""

    def __init__(self, plane: RequestPlane, request_id: str, reply_to: str, timeout_s: float):
        self._plane = plane
        self.request_id = request_id
        self.reply_to = reply_to
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        # Messages arrive from the subscription's callback; the one reader waits on a future
        # woken by the next message or by the deadline's timer (one timer per request, rather
        # than a Queue.get task and a timer per message under asyncio.wait_for).
        self._arrived: deque[Msg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._subject = ""
        self._payload = b""
        self._done = False
        self._attempt = 1  # the delivery attempt whose responses we follow
        self._stored_in_queue = False  # a work queue took the request
        self._answered = False  # any response arrived
        self._partial = 0  # non-final responses of it already handed out
        self._resends = 0  # times sent again after a reconnect

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _deliver(self, msg: Msg) -> None:
        if puback_stored(msg.data):
            # The work queue took the request: the reader would only wake to wait again.
            self._stored_in_queue = True
            return
        self._arrived.append(msg)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    async def _next(self) -> Msg:
        """The next message to this request; TimeoutError once the deadline has passed."""
        while not self._arrived:
            left = self.time_left()
            if left <= 0:
                raise TimeoutError
            loop = asyncio.get_running_loop()
            if self._timer is None:  # armed once per request (again only if it fired early)
                self._timer = loop.call_later(left, self._on_timer)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._arrived.popleft()

    async def send(self, subject: str, payload: bytes) -> None:
        """Publish the request, whose size the caller checked (see ``tensor.check_payload``);
        it is kept so it can be re-sent while nobody serves the subject."""
        self._subject, self._payload = subject, payload
        await self._publish()

    async def _publish(self) -> None:
        headers = {RESEND_HEADER: str(self._resends)} if self._resends else None
        await self._plane.publish(
            self._subject, self._payload, reply=self.reply_to, headers=headers, size_checked=True
        )

    def _may_resend(self) -> bool:
        # Not once responses were handed out: a second run would repeat them.
        return bool(self._subject) and not self._done and not self._partial and self.time_left() > 0

    async def _resend(self) -> None:
        self._resends += 1
        # The worker counts a resend as one more delivery attempt, so a non-idempotent operator
        # answers "worker_lost" rather than run it twice; a first answer still wins.
        with contextlib.suppress(Exception):  # disconnected again: the next reconnect resends
            await self._publish()

    def close(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._plane._forget(self.request_id)

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[tuple[ResponseHeader, memoryview]]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[tuple[ResponseHeader, memoryview]]:
        retry_s = _RETRY_FIRST_S
        nobody_serves = False
        try:
            while not self._done:
                try:
                    msg = await self._next()
                except TimeoutError:
                    raise RequestTimeoutError(self._timeout_message(nobody_serves)) from None
                if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
                    # Nobody received it, so sending again is safe: wait for a worker to appear.
                    nobody_serves = True
                    await asyncio.sleep(min(retry_s, self.time_left()))
                    retry_s = min(retry_s * 2, _RETRY_MAX_S)
                    if self.time_left() > 0:
                        await self._publish()
                    continue
                if is_puback(msg.data):
                    # The operator's JetStream work queue took the request (or refused it).
                    self._stored_in_queue = True
                    refusal = puback_refusal(msg.data, self._subject)
                    if refusal is not None:
                        self._done = True
                        yield ResponseHeader(id=self.request_id, error=refusal), memoryview(b"")
                    continue
                try:
                    header, body = decode_response(msg.data)
                except ProtocolError as exc:
                    raise ProtocolError(f"malformed response on {self._subject}: {exc}") from None
                self._answered = True
                if header.attempt != self._attempt:
                    if header.attempt < self._attempt:
                        continue  # from a worker taken for dead that still answered
                    if self._partial:
                        # Its worker died mid-stream and another started over: the responses
                        # handed out cannot be taken back, so end with an error, not duplicates.
                        self._done = True
                        yield self._worker_lost_mid_stream(header.attempt), memoryview(b"")
                        continue
                    self._attempt = header.attempt
                if header.final:
                    self._done = True
                else:
                    self._partial += 1
                yield header, body
        finally:
            self.close()

    def _worker_lost_mid_stream(self, attempt: int) -> ResponseHeader:
        message = (
            f"the worker streaming responses to this request died after {self._partial} of them; "
            f"delivery attempt {attempt} started over, and its responses would repeat those"
        )
        return ResponseHeader(
            id=self.request_id, error=ErrorInfo(code="worker_lost", message=message), attempt=attempt
        )

    def _timeout_message(self, nobody_serves: bool) -> str:
        if nobody_serves:
            why = "no worker is serving this subject"
        elif self._stored_in_queue and not self._answered:
            why = (
                "no final response arrived (the operator's work queue took the request; "
                "no worker has answered it: they are busy or slow, or none is running)"
            )
        else:
            why = "no final response arrived"
        return f"request to {self._subject} timed out after {self.timeout_s:g} s: {why}"
