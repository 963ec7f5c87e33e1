"""A worker process: loads one operator and serves its subject on the request plane.

Started by :class:`~pipeline_runner.deployment.Deployment` as ``python -m pipeline_runner.worker``
with a :class:`WorkerSpec` on stdin. It reports ``ready`` (or why it failed) on the file
descriptor named by ``PIPELINE_RUNNER_STATUS_FD``, and on SIGTERM stops taking requests, finishes
the ones in flight and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict

from .config import DataPlaneConfig, OperatorConfig
from .data_plane.plane import DataPlane
from .errors import BadInputError, OperatorError, ProtocolError, RunnerError
from .loader import load_operator_class
from .nats_security import NatsClientOptions
from .operator import Operator, OperatorContext, Request
from .placement import CUDA_VISIBLE_DEVICES, Device, activate_gpu
from .protocol import ErrorInfo, decode_request, salvage_reply_to
from .reply import Responder
from .context import ServingContext, reset_context, set_context
from .remote import Connection
from .inbound import Delivery, Inbound
from .queue_group import QueueGroupInbound
from .request_plane import (
    RequestPlane,
    cancel_subject,
    operator_subject,
    queue_group,
    stats_subject,
)
from .tensor import TensorScope, decode_tensors
from .work_queue import WorkQueueConsumer, WorkQueueSettings, stream_name

STATUS_FD_ENV = "PIPELINE_RUNNER_STATUS_FD"
log = logging.getLogger("pipeline_runner.worker")


class WorkerSpec(BaseModel):
    """Everything a worker process needs to know, sent by the deployment on stdin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str
    operator: OperatorConfig
    data_plane: DataPlaneConfig = DataPlaneConfig()
    index: int
    nats_url: str
    nats: NatsClientOptions = NatsClientOptions()
    root: str
    log_level: str = "INFO"
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    parent_pid: int | None = None
    #: Where the deployment placed this worker (its operator's ``device`` resolved).
    device: Device = "cpu"
    #: The deployment's CUDA number of this worker's GPU; the worker itself sees it as device 0.
    gpu: int | None = None

    @property
    def worker_id(self) -> str:
        return f"{self.operator.name}.{self.index}"


class Worker:
    """Serves one operator: takes requests from its inbound, runs batches, sends responses."""

    def __init__(
        self,
        spec: WorkerSpec,
        operator: Operator,
        plane: RequestPlane,
        data_plane: DataPlane,
        connection: Connection | None = None,
    ):
        self.spec = spec
        self.operator = operator
        self.plane = plane
        self.data_plane = data_plane
        #: Handed to the operator's RemoteOperator calls through the serving context.
        self.connection = connection
        op = spec.operator
        self._subject = operator_subject(spec.deployment, op.name, op.version)
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._slots = asyncio.Semaphore(op.max_inflight_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests received and not yet finished, wherever they are (queue, dispatcher, batch).
        self._unfinished = 0
        # Requests being executed: id -> (request, the task running its batch).
        self._running: dict[str, tuple[Request, asyncio.Task[Any]]] = {}
        self._cancelled_early: dict[str, None] = {}  # cancelled before they started (bounded)
        self.cancelled = 0
        self._stopping = asyncio.Event()
        self.served = 0
        self.redelivered = 0
        self.responder = Responder(plane, data_plane, spec.worker_id)
        self.inbound = self._inbound()

    def _inbound(self) -> Inbound:
        """Where requests come from: the one place that depends on the delivery mode."""
        op, deployment = self.spec.operator, self.spec.deployment
        stream = stream_name(deployment, op.name, op.version)
        if op.delivery.mode == "at_most_once":
            group = queue_group(deployment, op.name, op.version)
            return QueueGroupInbound(self.plane, self._subject, group, work_queue_stream=stream)
        settings = WorkQueueSettings(
            stream=stream,
            subject=self._subject,
            max_messages=op.workers * (op.max_inflight_requests + op.max_queued_requests),
            ack_wait_s=op.delivery.redeliver_after_s,
            storage=op.delivery.storage,
            replicas=op.delivery.replicas,
        )
        return WorkQueueConsumer(
            self.plane.nats, settings, capacity=lambda: op.max_inflight_requests - self._unfinished
        )

    async def serve(self, on_ready: Any = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain in-flight requests and return."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        op = self.spec.operator
        await self.inbound.start(self._on_delivery)
        stats_sub = await self.plane.nats.subscribe(stats_subject(self.spec.deployment), cb=self._on_stats)
        cancel_sub = await self.plane.nats.subscribe(
            cancel_subject(self.spec.deployment, op.name, op.version), cb=self._on_cancel
        )
        dispatcher = asyncio.create_task(self._dispatch())
        log.info("serving %s as %s (delivery %s)", self._subject, self.spec.worker_id, op.delivery.mode)
        if on_ready:
            on_ready()
        await self._stopping.wait()
        log.info("stopping: draining %d unfinished requests", self._unfinished)
        await self.inbound.stop_taking()
        deadline = time.monotonic() + self.spec.drain_timeout_s
        while self._unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        dispatcher.cancel()
        await self.inbound.close()
        await self.plane.stop_serving(stats_sub)
        await self.plane.stop_serving(cancel_sub)
        log.info("stopped after serving %d requests", self.served)

    def stats(self) -> dict[str, Any]:
        return {
            "worker": self.spec.worker_id,
            "operator": self.spec.operator.name,
            "pid": os.getpid(),
            "served": self.served,
            "cancelled": self.cancelled,
            "redelivered": self.redelivered,
            "unfinished": self._unfinished,
            "host": socket.gethostname(),
            "nats_server": self.plane.server_name,
            "reconnects": self.plane.nats.stats["reconnects"],
            "resent_requests": self.plane.resent_requests,
            "republished_responses": self.plane.republished_responses,
            "device": self.spec.device,
            "gpu": self.spec.gpu,
            "cuda_visible_devices": os.environ.get(CUDA_VISIBLE_DEVICES),
            "data_plane": self.data_plane.stats(),
            "operator_stats": self.operator.stats(),
        }

    async def _on_stats(self, msg: Msg) -> None:
        if msg.reply:
            await self.plane.publish(msg.reply, json.dumps(self.stats()).encode())

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.data.decode(errors="replace")
        entry = self._running.get(request_id)
        if entry is None:
            self._cancelled_early[request_id] = None
            while len(self._cancelled_early) > 10_000:
                self._cancelled_early.pop(next(iter(self._cancelled_early)))
            return
        request, task = entry
        request.cancel()
        log.info("request %s cancelled by its caller", request_id)
        batch = [r for r, t in self._running.values() if t is task]
        if all(r.cancelled for r in batch):
            task.cancel()

    async def _on_delivery(self, delivery: Delivery) -> None:
        op = self.spec.operator
        if self._unfinished >= op.max_inflight_requests + op.max_queued_requests:
            await self._refuse(delivery, f"{self.spec.worker_id} already holds {self._unfinished} requests "
                               f"(max_inflight_requests={op.max_inflight_requests}, "
                               f"max_queued_requests={op.max_queued_requests})")
            return
        self._unfinished += 1
        self._queue.put_nowait(delivery)

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

    async def _dispatch(self) -> None:
        max_batch = self.spec.operator.max_batch_size
        while True:
            delivery = await self._queue.get()
            await self._slots.acquire()
            batch = [delivery]
            while len(batch) < max_batch and not self._queue.empty() and not self._slots.locked():
                await self._slots.acquire()
                batch.append(self._queue.get_nowait())
            task = asyncio.create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, deliveries: list[Delivery]) -> None:
        requests: list[Request] = []
        try:
            requests = [request for d in deliveries if (request := await self._decode(d)) is not None]
            if requests:
                await self._execute(requests)
        except Exception:  # a bug here must not kill the dispatcher or leak slots
            log.exception("internal error while serving a batch")
        finally:
            # Every request of the batch has its final response sent (or never will): only now
            # may the inbound forget it.
            for delivery in deliveries:
                await delivery.done()
            # Counted once the request is out of the way (acknowledged, its slot free).
            self.cancelled += sum(1 for r in requests if r.cancelled)
            for _ in deliveries:
                self._slots.release()
            self._unfinished -= len(deliveries)
            await self.inbound.capacity_freed()

    async def _decode(self, delivery: Delivery) -> Request | None:
        try:
            header, body = decode_request(delivery.data)
            inputs = decode_tensors(header.tensors, body, self.data_plane)
        except ProtocolError as exc:
            log.warning("rejected malformed request on %s: %s", self._subject, exc)
            reply_to = delivery.reply_to or salvage_reply_to(delivery.data)
            if reply_to:
                reply = self.responder.reply(reply_to, "", delivery.attempt)
                await reply.fail(ErrorInfo(code="bad_request", message=str(exc)))
            return None
        if header.id in self._cancelled_early:
            del self._cancelled_early[header.id]
            return None  # the caller gave up before we started
        deadline = delivery.deadline(header.timeout_s)
        if deadline <= time.monotonic():
            return None  # its caller has already given up (it waited in a work queue)
        # Each resend by a caller whose NATS connection broke counts as an attempt, like a redelivery.
        attempt = delivery.attempt
        reply = self.responder.reply(header.reply_to, header.id, attempt, deadline)
        if attempt > 1:
            self.redelivered += 1
            log.warning("request %s delivered again (attempt %d): a worker holding it died, "
                        "or its caller lost its NATS connection", header.id, attempt)
            refusal = self._refuse_redelivery(attempt)
            if refusal is not None:
                await reply.fail(ErrorInfo(code="worker_lost", message=refusal))
                return None
        return Request(header.id, header.parameters, inputs, deadline, reply, device=self.spec.device)

    def _refuse_redelivery(self, attempt: int) -> str | None:
        """Why a request delivered for the ``attempt``-th time must not run, if it must not."""
        op = self.spec.operator
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

    async def _execute(self, requests: list[Request]) -> None:
        scope = TensorScope()
        token = set_context(ServingContext(self.connection, max(r.deadline for r in requests), scope))
        task = asyncio.current_task()
        assert task is not None
        for request in requests:
            self._running[request.id] = (request, task)
        try:
            await self.operator.execute(requests)
        except Exception as exc:
            await self._fail_unanswered(requests, self._error_for(exc))
        else:
            await self._fail_unanswered(requests, _NO_RESPONSE)
        finally:
            for request in requests:
                self._running.pop(request.id, None)
            reset_context(token)
            self.data_plane.release(scope.to_release())
            self.served += len(requests)

    def _error_for(self, exc: Exception) -> ErrorInfo:
        """What the caller of a request learns when ``execute`` raised ``exc``."""
        if isinstance(exc, BadInputError):
            return ErrorInfo(code="bad_input", message=str(exc))
        if isinstance(exc, OperatorError):  # a downstream operator's error keeps its code
            return ErrorInfo(code=exc.code, message=str(exc))
        log.exception("operator %s raised", self.spec.operator.name, exc_info=exc)
        return ErrorInfo(code="operator_failed", message=f"{type(exc).__name__}: {exc}")

    async def _fail_unanswered(self, requests: list[Request], error: ErrorInfo) -> None:
        for request in requests:
            if not request.answered:
                with contextlib.suppress(Exception):
                    await request.fail(error.message, error.code)


_NO_RESPONSE = ErrorInfo(code="no_response", message="the operator returned without a final response")


# --- process entry point -----------------------------------------------------------------


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGTERM us when the deployment process dies, so no worker is orphaned."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _report(event: str, **fields: Any) -> None:
    fd = os.environ.get(STATUS_FD_ENV)
    if not fd:
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), (json.dumps({"event": event, **fields}) + "\n").encode())


async def run_worker(spec: WorkerSpec) -> None:
    """Load the operator, connect, serve until told to stop."""
    op = spec.operator
    if spec.device == "gpu":
        # Before the operator is imported and before UCX starts (which needs the CUDA context).
        name = activate_gpu()
        log.info("on GPU %s (%s), CUDA_VISIBLE_DEVICES=%s", spec.gpu, name, os.environ.get(CUDA_VISIBLE_DEVICES))
    operator_cls = None
    if op.kind == "python":
        assert op.implementation is not None
        operator_cls = load_operator_class(op.implementation, Path(spec.root))
    plane = await RequestPlane.connect(
        spec.nats_url, name=f"{spec.deployment}.{spec.worker_id}", options=spec.nats
    )
    data_plane = DataPlane(spec.data_plane)
    await data_plane.start()
    connection = Connection(plane, spec.deployment, spec.request_timeout_s, data_plane)
    # For RemoteOperator handles used outside a request too (setup, the operator's own tasks).
    set_context(ServingContext(connection=connection))
    context = OperatorContext(
        deployment=spec.deployment,
        operator=op.name,
        version=op.version,
        worker=spec.worker_id,
        parameters=dict(op.parameters),
        logger=logging.getLogger(f"operator.{op.name}"),
        device=spec.device,
        gpu=spec.gpu,
    )
    if operator_cls is not None:
        operator = operator_cls(context)
    else:
        from .triton.operator import create_triton_operator  # tritonclient only where needed

        operator = create_triton_operator(context, op, Path(spec.root))
    await operator.setup()
    worker = Worker(spec, operator, plane, data_plane, connection)
    try:
        await worker.serve(on_ready=lambda: _report("ready", pid=os.getpid()))
    finally:
        with contextlib.suppress(Exception):
            await operator.teardown()
        await data_plane.stop()
        await plane.close()


def main() -> int:
    spec = WorkerSpec.model_validate_json(sys.stdin.read())
    _die_with_parent(spec.parent_pid)
    logging.basicConfig(
        level=spec.operator.log_level or spec.log_level,
        format=f"%(asctime)s %(levelname)s [{spec.worker_id} pid={os.getpid()}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(run_worker(spec))
    except RunnerError as exc:
        log.error("%s", exc)
        _report("failed", error=str(exc))
        return 3
    except Exception as exc:
        log.exception("worker failed")
        _report("failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
