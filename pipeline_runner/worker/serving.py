"""The serving loop of one worker: deliveries in, batches through the operator, replies out.

It admits requests up to the operator's limits, batches them (see :mod:`.batching`; a
delivery goes straight to the batch former and each batch to its own task, with no queue or
dispatcher task between), runs ``execute`` inside the
request's serving context, cancels what callers gave up on, refuses redeliveries the operator
cannot take and turns whatever ``execute`` raised into an
:class:`~pipeline_runner.protocol.ErrorInfo`. It knows nothing of NATS: requests come from an
:class:`~pipeline_runner.inbound.Inbound`, replies go through a
:class:`~pipeline_runner.reply.Responder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import tracing
from ..capacity import default_max_request_bytes
from ..config import OperatorConfig
from ..context import OpenCalls, ServingContext, reset_context, set_context
from ..errors import BadInputError, OperatorError, ProtocolError
from ..inbound import Delivery, Inbound
from ..metrics.observers import CANCELLED, EXPIRED, WorkerMetrics
from ..operator import Operator, Request
from ..protocol import ErrorInfo, decode_request, salvage_reply_to
from ..reply import Responder
from ..request_plane import operator_subject
from ..tensor import TensorScope, check_request_size, decode_tensors
from .batching import Admitted, Batch, BatchFormer
from .spec import WorkerSpec

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ..data_plane.plane import DataPlane
    from ..remote import Connection
    from ..tracing.spans import ExecuteSpans

log = logging.getLogger("pipeline_runner.worker")

# Requests cancelled before they arrived are remembered, up to this many.
_CANCELLED_EARLY_MAX = 10_000
# asyncio may fire a timer set for a deadline a little before it.
_DEADLINE_SLACK_S = 0.05
_NO_RESPONSE = ErrorInfo(code="no_response", message="the operator returned without a final response")


class Worker:
    """Serves one operator: takes requests from its inbound, runs batches, sends responses."""

    def __init__(
        self,
        spec: WorkerSpec,
        operator: Operator,
        *,
        inbound: Inbound,
        responder: Responder,
        data_plane: DataPlane | None,
        connection: Connection | None = None,
        metrics: WorkerMetrics | None = None,
    ):
        self.spec = spec
        self.operator = operator
        self.inbound = inbound
        self.responder = responder
        self.data_plane = data_plane
        #: Handed to the operator's RemoteOperator calls through the serving context.
        self.connection = connection
        op = spec.operator
        self._subject = operator_subject(spec.deployment, op.name, op.version)
        self._max_request_bytes = op.max_request_bytes or default_max_request_bytes()
        policy = op.batch_policy
        self._batches = BatchFormer(policy, self._idle_slots, self._start_batch)
        # A batching worker takes in one more batch than it runs, so the next batch fills while
        # the last one runs instead of after it.
        self._forming_room = min(policy.max_batch_size, op.max_queued_requests) if policy.max_batch_size > 1 else 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests received and not yet finished, wherever they are (waiting, running).
        self._unfinished = 0
        # Requests in running batches: each holds one of max_inflight_requests slots.
        self._executing = 0
        # Requests being executed: id -> (request, the task running its batch).
        self._running: dict[str, tuple[Request, asyncio.Task[Any]]] = {}
        self._cancelled_early: dict[str, None] = {}  # cancelled before they arrived (bounded)
        self._stopping = asyncio.Event()
        self.batches = 0
        #: The counts of ``runner status`` and, when exposed, the worker's Prometheus metrics.
        self.metrics = metrics or WorkerMetrics()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until :meth:`stop`, then drain the unfinished requests and return."""
        op = self.spec.operator
        await self.inbound.start(self._on_delivery, capacity=self._room)
        log.info("serving %s as %s (delivery %s)", self._subject, self.spec.worker_id, op.delivery.mode)
        if on_ready:
            on_ready()
        await self._stopping.wait()
        log.info("stopping: draining %d unfinished requests", self._unfinished)
        await self.inbound.stop_taking()
        deadline = time.monotonic() + self.spec.drain_timeout_s
        while self._unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._batches.clear()  # never acknowledged: a work queue hands them to another worker
        await self.inbound.close()
        log.info("stopped after serving %d requests", self.metrics.served)

    def stop(self) -> None:
        """Take no more requests; :meth:`serve` returns once the unfinished ones are done."""
        self._stopping.set()

    def stats(self) -> dict[str, Any]:
        return {
            "served": self.metrics.served,
            "cancelled": self.metrics.cancelled,
            "redelivered": self.metrics.redelivered,
            "batches": self.batches,
            "unfinished": self._unfinished,
            "running": len(self._running),
            "cancelled_early_remembered": len(self._cancelled_early),
            "operator_stats": self.operator.stats(),
        }

    def cancel(self, request_id: str) -> None:
        """The caller of ``request_id`` gave up: stop working on it (or never start)."""
        entry = self._running.get(request_id)
        if entry is None:
            waiting = self._batches.remove(request_id)
            if waiting is not None:
                waiting.request.cancel()
                log.info("request %s cancelled by its caller before its batch ran", request_id)
                self._spawn(self._finish([waiting], None))
                return
            self._cancelled_early[request_id] = None
            while len(self._cancelled_early) > _CANCELLED_EARLY_MAX:
                self._cancelled_early.pop(next(iter(self._cancelled_early)))
            return
        request, task = entry
        request.cancel()
        log.info("request %s cancelled by its caller", request_id)
        batch = [r for r, t in self._running.values() if t is task]
        if all(r.cancelled for r in batch):
            task.cancel()

    # --- admission and batching -----------------------------------------------------------

    def _room(self) -> int:
        """How many more requests the inbound may hand over now (a pulling one asks for no more)."""
        return self.spec.operator.max_inflight_requests + self._forming_room - self._unfinished

    def _idle_slots(self) -> int:
        return self.spec.operator.max_inflight_requests - self._executing

    async def _on_delivery(self, delivery: Delivery) -> None:
        op = self.spec.operator
        if self._unfinished >= op.max_inflight_requests + op.max_queued_requests:
            await self._refuse(delivery, f"{self.spec.worker_id} already holds {self._unfinished} requests "
                               f"(max_inflight_requests={op.max_inflight_requests}, "
                               f"max_queued_requests={op.max_queued_requests})")
            return
        self._unfinished += 1
        try:
            request = await self._decode(delivery)
        except Exception:  # a bug here must not leave the request unfinished
            log.exception("internal error while admitting a request")
            request = None
        if request is None:
            await delivery.done()
            self.metrics.request_dropped(delivery.outcome, time.monotonic() - delivery.received_at)
            self._unfinished -= 1
            await self.inbound.capacity_freed()
            return
        self.metrics.request_received()
        self._batches.add(Admitted(request, delivery, time.monotonic()))

    async def _refuse(self, delivery: Delivery, why: str) -> None:
        """Answer at once with an 'overloaded' error instead of queueing without bound."""
        try:
            header, _ = decode_request(delivery.data)
            reply_to, request_id = header.reply_to, header.id
        except ProtocolError:
            reply_to, request_id = delivery.reply_to or salvage_reply_to(delivery.data), ""
        if reply_to:
            with contextlib.suppress(Exception):
                reply = self.responder.reply(reply_to, request_id, delivery.attempt)
                await reply.fail(ErrorInfo(code="overloaded", message=why))
        await delivery.done()
        self.metrics.request_refused("overloaded")

    def _start_batch(self, batch: Batch) -> None:
        """``batch`` is formed (full, or its wait is over): it takes its slots and runs."""
        self._executing += batch.size
        self.batches += 1
        self._batch_closed(batch)
        self._spawn(self._run_batch(batch))

    def _batch_closed(self, batch: Batch) -> None:
        # sent_at comes from the work queue's clock (another host's, maybe): never below zero.
        waits = [
            max(batch.formed - (d.sent_at if d.sent_at is not None else d.received_at), 0.0)
            for d in (m.delivery for m in batch.members)
        ]
        self.metrics.batch_closed(batch.size, batch.waited_s, waits)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: Batch) -> None:
        requests: list[Request] = []
        try:
            now = time.monotonic()
            # Its caller gave up while it waited for its batch or a slot: nobody to answer.
            requests = [m.request for m in batch.members if m.request.deadline > now and not m.request.cancelled]
            if requests:
                await self._execute(requests)
        except Exception:  # a bug here must not leak slots
            log.exception("internal error while serving a batch")
        finally:
            self._executing -= batch.size
            self._batches.slots_freed()
            await self._finish(batch.members, requests)

    async def _finish(self, members: list[Admitted], executed: list[Request] | None) -> None:
        """Every request of ``members`` has its final response sent (or never will).

        ``executed``: those of them that ran; None when they left before their batch formed.
        """
        # Only now may the inbound forget them.
        for admitted in members:
            await admitted.delivery.done()
        # Counted once the request is out of the way (acknowledged, its slot free).
        now = time.monotonic()
        ran = {id(r) for r in executed or ()}
        for admitted in members:
            request, duration_s = admitted.request, now - admitted.delivery.received_at
            if executed is None:
                self.metrics.request_dropped(CANCELLED, duration_s, was_queued=True)
            elif id(request) in ran:
                outcome = CANCELLED if request.cancelled else request.outcome or "no_response"
                self.metrics.request_finished(outcome, duration_s, executed=True)
            else:
                self.metrics.request_finished(CANCELLED if request.cancelled else EXPIRED, duration_s, executed=False)
        self._unfinished -= len(members)
        await self.inbound.capacity_freed()

    async def _decode(self, delivery: Delivery) -> Request | None:
        """The request to run, or None when it was answered (or needs no answer) already."""
        try:
            header, body = decode_request(delivery.data)
            check_request_size(header.tensors, self._max_request_bytes)
            inputs = decode_tensors(header.tensors, body, self.data_plane)
        except ProtocolError as exc:
            log.warning("rejected malformed request on %s: %s", self._subject, exc)
            delivery.outcome = exc.code
            reply_to = delivery.reply_to or salvage_reply_to(delivery.data)
            if reply_to:
                reply = self.responder.reply(reply_to, "", delivery.attempt)
                await reply.fail(ErrorInfo(code=exc.code, message=str(exc)))
            return None
        if header.id in self._cancelled_early:
            del self._cancelled_early[header.id]
            delivery.outcome = CANCELLED
            return None  # the caller gave up before we started
        deadline = delivery.deadline(header.timeout_s)
        if deadline <= time.monotonic():
            delivery.outcome = EXPIRED
            return None  # its caller has already given up (it waited in a work queue)
        attempt = delivery.attempt
        reply = self.responder.reply(header.reply_to, header.id, attempt, deadline)
        if attempt > 1:
            self.metrics.request_redelivered()
            log.warning("request %s delivered again (attempt %d): a worker holding it died, "
                        "or its caller lost its NATS connection", header.id, attempt)
            refusal = redelivery_refusal(self.spec.operator, attempt)
            if refusal is not None:
                delivery.outcome = "worker_lost"
                await reply.fail(ErrorInfo(code="worker_lost", message=refusal))
                return None
        trace = None
        if header.trace_context is not None and tracing.active():
            from ..tracing.spans import RequestTrace

            trace = RequestTrace(header.trace_context, header.sent_at)
        return Request(header.id, header.parameters, inputs, deadline, reply, device=self.spec.device, trace=trace)

    # --- running ----------------------------------------------------------------------------

    async def _execute(self, requests: list[Request]) -> None:
        scope, calls = TensorScope(), OpenCalls()
        deadline = requests[0].deadline if len(requests) == 1 else max(r.deadline for r in requests)
        token = set_context(ServingContext(self.connection, deadline, scope, calls))
        task = asyncio.current_task()
        assert task is not None
        for request in requests:
            self._running[request.id] = (request, task)
        spans: ExecuteSpans | None = None
        if tracing.active():
            from ..tracing.spans import ExecuteSpans

            spans = ExecuteSpans([(r.id, r.trace) for r in requests], self.spec.operator.name, self.spec.worker_id)
        error: BaseException | None = None
        try:
            await self.operator.execute(requests)
        except Exception as exc:
            error = exc
            # A fetch or a downstream call that ran out of the request's time is a timeout to
            # its caller, whatever raised (the message keeps the cause).
            late = [r for r in requests if r.time_left() < _DEADLINE_SLACK_S]
            if late:
                await self._fail_unanswered(late, self._deadline_passed(exc))
            if len(late) < len(requests):
                await self._fail_unanswered(requests, self._error_for(exc))
        else:
            unanswered = [r for r in requests if not r.answered]
            if unanswered:
                await self._fail_unanswered(unanswered, _NO_RESPONSE)
        finally:
            for request in requests:
                self._running.pop(request.id, None)
            await calls.close_all()
            if spans is not None:
                spans.end(error)
            reset_context(token)
            released = scope.to_release()
            if released and self.data_plane is not None:
                self.data_plane.release(released)

    def _error_for(self, exc: Exception) -> ErrorInfo:
        """What the callers of a batch learn when ``execute`` raised ``exc``."""
        if isinstance(exc, BadInputError):
            return ErrorInfo(code="bad_input", message=str(exc))
        if isinstance(exc, OperatorError):  # a downstream operator's error keeps its code
            return ErrorInfo(code=exc.code, message=str(exc))
        log.error("operator %s raised", self.spec.operator.name, exc_info=exc)
        return ErrorInfo(code="operator_failed", message=f"{type(exc).__name__}: {exc}")

    def _deadline_passed(self, exc: Exception) -> ErrorInfo:
        log.warning("a request's deadline passed while %s served it: %s: %s",
                    self.spec.operator.name, type(exc).__name__, exc)
        return ErrorInfo(code="timeout", message=f"the request's deadline passed while it was served: "
                         f"{type(exc).__name__}: {exc}")

    async def _fail_unanswered(self, requests: list[Request], error: ErrorInfo) -> None:
        for request in requests:
            if not request.answered:
                with contextlib.suppress(Exception):
                    await request.fail(error.message, error.code)


def redelivery_refusal(op: OperatorConfig, attempt: int) -> str | None:
    """Why a request delivered for the ``attempt``-th time must not run, if it must not."""
    if attempt > 1 and op.delivery.mode == "at_most_once":
        return (
            "its caller lost its NATS connection and sent this request again; operator "
            f"{op.name!r} has delivery.mode 'at_most_once', so it was not run again (an "
            "earlier run's answer may have been lost with the connection)"
        )
    if attempt > 1 and not op.delivery.idempotent:
        return (
            "this request was delivered again (the worker handling it died, or its caller "
            f"lost its NATS connection and sent it again); operator {op.name!r} is not "
            "idempotent (delivery.idempotent: false), so it was not run again"
        )
    if attempt > op.delivery.max_attempts:
        return (
            f"{attempt - 1} earlier attempts at this request were lost (workers of operator "
            f"{op.name!r} died handling it, or its caller's NATS connection broke) "
            f"(delivery.max_attempts: {op.delivery.max_attempts}); giving up"
        )
    return None
