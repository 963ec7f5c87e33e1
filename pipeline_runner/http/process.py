"""An ingress process: ``python -m pipeline_runner.http.process``, started by ``runner deploy``.

It reads its :class:`IngressSpec` on stdin, connects to NATS, serves HTTP on the listening socket
the deployment passed it (``listen_fd``; several ingress processes share it), reports ready on
the status pipe, and on SIGTERM stops accepting, lets requests in flight finish, then exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..metrics.observers import IngressMetrics
from .. import tracing
from ..process import die_with_parent, report_status, run_reporting_failure, use_fast_event_loop
from ..remote import Connection
from ..tracing.settings import resolve_tracing
from .ingress import Ingress
from .server import HttpServer
from .spec import IngressSpec, resolve_token

log = logging.getLogger("pipeline_runner.http")

async def run_ingress(spec: IngressSpec) -> None:
    config = spec.deployment
    assert config.http is not None
    token = resolve_token(config.http.auth, Path(spec.root))
    tracing.configure(resolve_tracing(config.tracing.with_file_under(config.root)), f"{config.name}.http", {
        "pipeline_runner.deployment": config.name, "pipeline_runner.worker": spec.ingress_id,
    })  # fmt: skip
    connection = await Connection.connect(
        spec.nats_url, config.name, default_timeout_s=config.http.request_timeout_s,
        data_plane=config.data_plane, nats=spec.nats, client_name=f"{config.name}.{spec.ingress_id}",
    )  # fmt: skip
    metrics = IngressMetrics(config.name, spec.ingress_id) if spec.metrics_dir else None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        # Started now, so the first large tensor does not wait for UCX to come up.
        await connection.data_plane.start()
        ingress = Ingress(config, connection, token, metrics)
        await ingress.start()
        sock = socket.socket(fileno=spec.listen_fd)
        server = HttpServer(
            ingress, sock=sock, drain_timeout_s=spec.drain_timeout_s,
            head_timeout_s=min(10.0, config.http.request_timeout_s),
        )  # fmt: skip
        await server.start()
        log.info("serving HTTP on %s:%s as %s", server.host, server.port, spec.ingress_id)
        report_status("ready", pid=os.getpid())
        await stopping.wait()
        log.info("stopping: letting requests in flight finish")
        await server.stop()
        await ingress.stop()
    finally:
        await connection.close()
        tracing.shutdown()  # exports the spans still buffered


def main() -> int:
    spec = IngressSpec.model_validate_json(sys.stdin.read())
    die_with_parent()
    if spec.parent_pid is not None and os.getppid() != spec.parent_pid:
        return 1  # the deployment is already gone
    logging.basicConfig(
        level=spec.deployment.log_level,
        format=f"%(asctime)s %(levelname)s [{spec.ingress_id} pid={os.getpid()}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    use_fast_event_loop()
    return run_reporting_failure(run_ingress(spec), "ingress", log)


if __name__ == "__main__":
    sys.exit(main())
