"""The worker process: ``python -m pipeline_runner.worker`` with a :class:`WorkerSpec` on stdin.

It reports ``ready`` (or why it failed) on the file descriptor named by
``PIPELINE_RUNNER_STATUS_FD``, dies with the deployment process, connects to the request and
data planes, builds the inbound of the operator's delivery mode, answers the stats and cancel
subjects, and on SIGTERM stops taking requests, finishes the ones in flight and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from .. import tracing
from ..context import ServingContext, set_context
from ..data_plane.plane import DataPlane
from ..inbound import Inbound
from ..loader import load_operator_class
from ..metrics.observers import DataPlaneMetrics, ProcessLabels, TritonMetrics, WorkerMetrics
from ..operator import Operator, OperatorContext
from ..placement import CUDA_VISIBLE_DEVICES, activate_gpu
from ..process import die_with_parent, report_status, run_reporting_failure, use_fast_event_loop
from ..queue_group import QueueGroupInbound
from ..remote import Connection
from ..reply import Responder
from ..request_plane import RequestPlane, cancel_subject, operator_subject, queue_group, stats_subject
from ..tracing.settings import resolve_tracing
from ..work_queue import WorkQueueConsumer, WorkQueueSettings, stream_name
from .serving import Worker
from .spec import WorkerSpec

log = logging.getLogger("pipeline_runner.worker")


def build_inbound(spec: WorkerSpec, plane: RequestPlane) -> Inbound:
    """Where the worker's requests come from: the one place that depends on the delivery mode."""
    op, deployment = spec.operator, spec.deployment
    subject = operator_subject(deployment, op.name, op.version)
    stream = stream_name(deployment, op.name, op.version)
    if op.delivery.mode == "at_most_once":
        group = queue_group(deployment, op.name, op.version)
        return QueueGroupInbound(plane, subject, group, work_queue_stream=stream)
    settings = WorkQueueSettings(
        stream=stream,
        subject=subject,
        max_messages=op.workers * (op.max_inflight_requests + op.max_queued_requests),
        ack_wait_s=op.delivery.redeliver_after_s,
        storage=op.delivery.storage,
        replicas=op.delivery.replicas,
    )
    return WorkQueueConsumer(plane.nats, settings)


def _stats(spec: WorkerSpec, worker: Worker, plane: RequestPlane, data_plane: DataPlane) -> dict[str, Any]:
    return {
        "worker": spec.worker_id,
        "operator": spec.operator.name,
        "pid": os.getpid(),
        **worker.stats(),
        "host": socket.gethostname(),
        "nats_server": plane.server_name,
        "reconnects": plane.nats.stats["reconnects"],
        "resent_requests": plane.resent_requests,
        "republished_responses": plane.republished_responses,
        # Leak evidence for soak and hostile-client tests: both must return to a baseline.
        "asyncio_tasks": len(asyncio.all_tasks()),
        "open_calls": plane.open_calls,
        "device": spec.device,
        "gpu": spec.gpu,
        "cuda_visible_devices": os.environ.get(CUDA_VISIBLE_DEVICES),
        "data_plane": data_plane.stats(),
    }


@contextlib.asynccontextmanager
async def _control_subjects(spec: WorkerSpec, worker: Worker, plane: RequestPlane, data_plane: DataPlane) -> Any:
    """Answer the deployment's stats subject and the operator's cancel subject while serving."""

    async def on_stats(msg: Msg) -> None:
        if msg.reply:
            await plane.publish(msg.reply, json.dumps(_stats(spec, worker, plane, data_plane)).encode())

    async def on_cancel(msg: Msg) -> None:
        worker.cancel(msg.data.decode(errors="replace"))

    op = spec.operator
    stats_sub = await plane.nats.subscribe(stats_subject(spec.deployment), cb=on_stats)
    cancel_sub = await plane.nats.subscribe(cancel_subject(spec.deployment, op.name, op.version), cb=on_cancel)
    try:
        yield
    finally:
        await plane.stop_serving(stats_sub)
        await plane.stop_serving(cancel_sub)


def _create_operator(spec: WorkerSpec, operator_cls: type[Operator] | None, labels: ProcessLabels | None) -> Operator:
    op = spec.operator
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
        return operator_cls(context)
    from ..triton.operator import create_triton_operator  # tritonclient only where needed

    metrics = TritonMetrics(labels, op.model or op.name) if labels is not None else None
    return create_triton_operator(context, op, Path(spec.root), metrics)


async def run_worker(spec: WorkerSpec) -> None:
    """Load the operator, connect, serve until told to stop."""
    if spec.device == "gpu":
        # Before the operator is imported and before UCX starts (which needs the CUDA context).
        name = activate_gpu()
        log.info("on GPU %s (%s), CUDA_VISIBLE_DEVICES=%s", spec.gpu, name, os.environ.get(CUDA_VISIBLE_DEVICES))
    tracing.configure(resolve_tracing(spec.tracing), f"{spec.deployment}.{spec.operator.name}", {
        "pipeline_runner.deployment": spec.deployment, "pipeline_runner.worker": spec.worker_id,
    })  # fmt: skip
    operator_cls = None
    if spec.operator.kind == "python":  # a broken module fails the worker before it connects
        assert spec.operator.implementation is not None
        operator_cls = load_operator_class(spec.operator.implementation, Path(spec.root))
    plane = await RequestPlane.connect(
        spec.nats_url, name=f"{spec.deployment}.{spec.worker_id}", options=spec.nats
    )
    labels = ProcessLabels(spec.deployment, spec.operator.name, spec.worker_id) if spec.metrics_dir else None
    data_plane = DataPlane(spec.data_plane, metrics=DataPlaneMetrics(labels) if labels is not None else None)
    await data_plane.start()
    connection = Connection(plane, spec.deployment, spec.request_timeout_s, data_plane)
    # For RemoteOperator handles used outside a request too (setup, the operator's own tasks).
    set_context(ServingContext(connection=connection))
    operator = _create_operator(spec, operator_cls, labels)
    await operator.setup()
    worker = Worker(
        spec,
        operator,
        inbound=build_inbound(spec, plane),
        responder=Responder(plane, data_plane, spec.worker_id),
        data_plane=data_plane,
        connection=connection,
        metrics=WorkerMetrics(labels, batches=spec.operator.batch_policy.max_batch_size > 1),
    )
    gauges = asyncio.create_task(worker.metrics.publish_gauges_every())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        async with _control_subjects(spec, worker, plane, data_plane):
            await worker.serve(on_ready=lambda: report_status("ready", pid=os.getpid()))
    finally:
        gauges.cancel()
        with contextlib.suppress(Exception):
            await operator.teardown()
        await data_plane.stop()
        await plane.close()
        tracing.shutdown()  # exports the spans still buffered


def main() -> int:
    spec = WorkerSpec.model_validate_json(sys.stdin.read())
    die_with_parent()  # no worker is orphaned when the deployment process dies
    if spec.parent_pid is not None and os.getppid() != spec.parent_pid:
        return 1  # the deployment is already gone
    logging.basicConfig(
        level=spec.operator.log_level or spec.log_level,
        format=f"%(asctime)s %(levelname)s [{spec.worker_id} pid={os.getpid()}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    use_fast_event_loop()
    return run_reporting_failure(run_worker(spec), "worker", log)
