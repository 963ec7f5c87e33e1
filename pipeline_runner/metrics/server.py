"""A deployment's ``/metrics`` endpoint, served by the deployment process.

Every worker and ingress process of the deployment writes its values to files in one directory
(prometheus-client's multiprocess mode; the deployment points ``PROMETHEUS_MULTIPROC_DIR`` of
its children there); a scrape sums them per label set, so a restarted worker's counters go on
from where the dead process left them. The deployment adds what only it knows: each worker's
restarts and whether it is up, read from the same objects ``runner status`` reads.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import RunnerError
from ..state import is_running
from .definitions import WORKER_LABELS, WORKER_RESTARTS, WORKER_UP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisedProcess:
    """One process the deployment supervises, as its metrics show it."""

    deployment: str
    operator: str  # 'http' for an ingress process
    worker: str
    restarts: int
    up: bool


class SupervisorCollector(Collector):
    """Restarts and liveness of the deployment's processes, read at scrape time."""

    def __init__(self, processes: Callable[[], Iterable[SupervisedProcess]]):
        self._processes = processes

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            WORKER_RESTARTS.removesuffix("_total"),
            "Times the deployment restarted a worker (or ingress) process after it exited.",
            labels=WORKER_LABELS,
        )
        up = GaugeMetricFamily(WORKER_UP, "1 while the process is running and ready, else 0.", labels=WORKER_LABELS)
        for p in self._processes():
            values = [p.deployment, p.operator, p.worker]
            restarts.add_metric(values, p.restarts)
            up.add_metric(values, 1.0 if p.up else 0.0)
        yield restarts
        yield up


class MetricsServer:
    """``http://HOST:PORT/metrics`` for a whole deployment (a thread of the deployment process)."""

    def __init__(self, directory: Path, host: str, port: int, processes: Callable[[], Iterable[SupervisedProcess]]):
        self.directory = directory
        self.host = host
        self.port = port
        self._processes = processes
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def prepare(self) -> None:
        """An empty directory for the children's files (before any child starts).

        Directories of deployment processes that died without stopping (``metrics.<pid>.*``) go too.
        """
        for stale in self.directory.parent.glob("metrics.*"):
            pid = stale.name.split(".")[1]
            if stale != self.directory and pid.isdigit() and not is_running(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)

    def start(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=str(self.directory))
        registry.register(SupervisorCollector(self._processes))
        try:
            self._server, self._thread = start_http_server(self.port, self.host, registry=registry)
        except OSError as exc:
            raise RunnerError(f"metrics: cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                              "(set metrics.port, --metrics-port, or metrics.enabled: false)") from None
        self.port = self._server.server_port
        log.info("metrics on %s", self.url)

    def process_exited(self, pid: int) -> None:
        """Forget a dead process's live gauges (its counters stay in the sums)."""
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(self.directory))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self.directory, ignore_errors=True)
