"""The typed observers the serving loop, the data plane, Triton calls and the ingress report to.

Each keeps the plain counts ``runner status`` shows and, when metrics are on, writes the same
events to prometheus-client's values; with metrics off the counts are all there is. Label values
are resolved once per process. A value update costs microseconds in multiprocess mode
(benchmarks/metrics_cost.py), so a request makes as few as its metrics need: the in-flight and
queued gauges are plain counts published every :data:`GAUGE_PERIOD_S`, and the batch histograms
are observed only where batches can hold more than one request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

#: A request's outcome: ``ok``, an error code, or one of these (its caller gave up first).
CANCELLED = "cancelled"
EXPIRED = "expired"
#: How often a worker's in-flight and queued gauges are brought up to date.
GAUGE_PERIOD_S = 0.5


@dataclass(frozen=True)
class ProcessLabels:
    """Who is measuring: the label values every metric of this process carries."""

    deployment: str
    operator: str
    worker: str

    def values(self) -> tuple[str, str, str]:
        return (self.deployment, self.operator, self.worker)


class WorkerMetrics:
    """What one worker's serving loop reports; the source of its ``runner status`` counters."""

    def __init__(self, labels: ProcessLabels | None = None, *, batches: bool = False):
        """``labels`` None: count for ``runner status`` only, expose nothing.

        ``batches``: the operator's batches may hold several requests (else every batch is one
        request, and its histograms stay empty rather than repeat the request count).
        """
        self.served = 0  # requests the operator executed
        self.cancelled = 0
        self.redelivered = 0
        self.inflight = 0
        self.queued = 0
        self._batches = batches
        self._labels = labels
        self._outcomes: dict[str, Any] = {}
        if labels is None:
            return
        from .definitions import definitions

        d, values = definitions(), labels.values()
        self._requests = d.requests
        self._duration = d.request_duration.labels(*values)
        self._queue_wait = d.queue_wait.labels(*values)
        self._inflight = d.inflight.labels(*values)
        self._queued = d.queued.labels(*values)
        self._batch_size = d.batch_size.labels(*values)
        self._batch_wait = d.batch_wait.labels(*values)
        self._redeliveries = d.redeliveries.labels(*values)
        for outcome in ("ok", CANCELLED):  # present in a scrape from the start
            self._outcome(outcome)

    @property
    def exposed(self) -> bool:
        return self._labels is not None

    def request_received(self) -> None:
        """A request was admitted and waits for a batch."""
        self.queued += 1

    def request_refused(self, outcome: str) -> None:
        """A request was answered with ``outcome`` (e.g. overloaded) without being admitted."""
        if self._labels is not None:
            self._outcome(outcome).inc()

    def request_dropped(self, outcome: str, duration_s: float, *, was_queued: bool = False) -> None:
        """A request ended with ``outcome`` without running: refused at admission, or (with
        ``was_queued``) cancelled while it waited for its batch."""
        self.queued -= was_queued
        self.cancelled += outcome == CANCELLED
        if self._labels is None:
            return
        self._outcome(outcome).inc()
        self._duration.observe(duration_s)

    def batch_closed(self, size: int, batch_wait_s: float, queue_waits_s: list[float]) -> None:
        """``size`` admitted requests left the queue as one batch; each waited ``queue_waits_s``."""
        self.queued -= size
        self.inflight += size
        if self._labels is None:
            return
        if self._batches:
            self._batch_size.observe(size)
            self._batch_wait.observe(batch_wait_s)
        for wait_s in queue_waits_s:
            self._queue_wait.observe(wait_s)

    def request_redelivered(self) -> None:
        self.redelivered += 1
        if self._labels is not None:
            self._redeliveries.inc()

    def request_finished(self, outcome: str, duration_s: float, *, executed: bool) -> None:
        """A request of a closed batch is done with ``outcome`` after ``duration_s`` in the worker."""
        self.served += executed
        self.cancelled += outcome == CANCELLED
        self.inflight -= 1
        if self._labels is None:
            return
        self._outcome(outcome).inc()
        self._duration.observe(duration_s)

    def publish_gauges(self) -> None:
        """Bring the in-flight and queued gauges up to date."""
        if self._labels is not None:
            self._inflight.set(self.inflight)
            self._queued.set(self.queued)

    async def publish_gauges_every(self, period_s: float = GAUGE_PERIOD_S) -> None:
        """:meth:`publish_gauges` every ``period_s`` until cancelled."""
        while True:
            self.publish_gauges()
            await asyncio.sleep(period_s)

    def _outcome(self, outcome: str) -> Any:
        child = self._outcomes.get(outcome)
        if child is None:
            assert self._labels is not None
            child = self._outcomes[outcome] = self._requests.labels(*self._labels.values(), outcome)
        return child


class DataPlaneMetrics:
    """Tensors a process's data plane published and fetched, by memory type (cpu, gpu)."""

    def __init__(self, labels: ProcessLabels):
        from .definitions import definitions

        self._labels = labels.values()
        self._definitions = definitions()
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._fetch_durations: dict[str, Any] = {}

    def published(self, memory: str, nbytes: int) -> None:
        tensors, bytes_ = self._counters("sent", memory)
        tensors.inc()
        bytes_.inc(nbytes)

    def fetched(self, memory: str, nbytes: int, duration_s: float) -> None:
        tensors, bytes_ = self._counters("fetched", memory)
        tensors.inc()
        bytes_.inc(nbytes)
        histogram = self._fetch_durations.get(memory)
        if histogram is None:
            histogram = self._definitions.data_plane_fetch_duration.labels(*self._labels, memory)
            self._fetch_durations[memory] = histogram
        histogram.observe(duration_s)

    def _counters(self, direction: str, memory: str) -> tuple[Any, Any]:
        key = (direction, memory)
        children = self._children.get(key)
        if children is None:
            d = self._definitions
            children = (
                d.data_plane_tensors.labels(*self._labels, direction, memory),
                d.data_plane_bytes.labels(*self._labels, direction, memory),
            )
            self._children[key] = children
        return children


class TritonMetrics:
    """Inference calls a Triton operator made to its server."""

    def __init__(self, labels: ProcessLabels, model: str):
        from .definitions import definitions

        self._duration = definitions().triton_request_duration.labels(*labels.values(), model)

    def call_finished(self, duration_s: float) -> None:
        self._duration.observe(duration_s)


class IngressMetrics:
    """HTTP requests one ingress process answered."""

    def __init__(self, deployment: str, ingress: str):
        from .definitions import definitions

        d = definitions()
        self._labels = (deployment, ingress)
        self._requests = d.http_requests
        self._duration = d.http_request_duration.labels(*self._labels)
        self._codes: dict[int, Any] = {}

    def request_finished(self, status: int, duration_s: float) -> None:
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self._requests.labels(*self._labels, str(status))
        child.inc()
        self._duration.observe(duration_s)
