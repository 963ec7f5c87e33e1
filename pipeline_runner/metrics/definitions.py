"""Every metric a deployment exposes: names, help texts, labels and buckets.

Created on first use, in a process whose ``PROMETHEUS_MULTIPROC_DIR`` is already set (the
deployment sets it for its children), so each value lives in a file the deployment process
reads at scrape time. Nothing registers in prometheus-client's global registry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

#: The labels every metric of a worker carries.
WORKER_LABELS = ("deployment", "operator", "worker")
INGRESS_LABELS = ("deployment", "worker")

# Seconds: from sub-millisecond hops to requests that take most of a default 30 s deadline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Definitions:
    requests: Counter
    request_duration: Histogram
    queue_wait: Histogram
    inflight: Gauge
    queued: Gauge
    batch_size: Histogram
    batch_wait: Histogram
    redeliveries: Counter
    data_plane_bytes: Counter
    data_plane_tensors: Counter
    data_plane_fetch_duration: Histogram
    triton_request_duration: Histogram
    http_requests: Counter
    http_request_duration: Histogram


#: Exposed by the deployment process itself (see :mod:`.server`), not through files.
WORKER_RESTARTS = "pipeline_runner_worker_restarts_total"
WORKER_UP = "pipeline_runner_worker_up"


@functools.cache
def definitions() -> Definitions:
    """The metrics of this process (created once, unregistered: the files are the registry)."""
    return Definitions(
        requests=Counter(
            "pipeline_runner_requests_total",
            "Requests a worker finished, by outcome: ok, or the error code its caller got "
            "(cancelled and expired when the caller gave up first).",
            (*WORKER_LABELS, "outcome"), registry=None,
        ),
        request_duration=Histogram(
            "pipeline_runner_request_duration_seconds",
            "Time from a request reaching the worker to its final response.",
            WORKER_LABELS, buckets=LATENCY_BUCKETS, registry=None,
        ),
        queue_wait=Histogram(
            "pipeline_runner_queue_wait_seconds",
            "Time from the caller sending a request (the work queue's timestamp) to the worker "
            "starting it.",
            WORKER_LABELS, buckets=LATENCY_BUCKETS, registry=None,
        ),
        inflight=Gauge(
            "pipeline_runner_inflight_requests", "Requests being executed by the operator now.",
            WORKER_LABELS, multiprocess_mode="livesum", registry=None,
        ),
        queued=Gauge(
            "pipeline_runner_queued_requests",
            "Requests the worker holds that wait for a slot or a batch.",
            WORKER_LABELS, multiprocess_mode="livesum", registry=None,
        ),
        batch_size=Histogram(
            "pipeline_runner_batch_size", "Requests per batch handed to the operator's execute.",
            WORKER_LABELS, buckets=BATCH_SIZE_BUCKETS, registry=None,
        ),
        batch_wait=Histogram(
            "pipeline_runner_batch_wait_seconds",
            "Time from a batch's first request being taken from the worker's queue to the batch "
            "closing.",
            WORKER_LABELS, buckets=LATENCY_BUCKETS, registry=None,
        ),
        redeliveries=Counter(
            "pipeline_runner_redeliveries_total",
            "Requests delivered again (a worker holding them died, or their caller resent them).",
            WORKER_LABELS, registry=None,
        ),
        data_plane_bytes=Counter(
            "pipeline_runner_data_plane_bytes_total",
            "Tensor bytes this process published for others to fetch (direction=sent) or fetched.",
            (*WORKER_LABELS, "direction", "memory"), registry=None,
        ),
        data_plane_tensors=Counter(
            "pipeline_runner_data_plane_tensors_total",
            "Tensors this process published for others to fetch (direction=sent) or fetched.",
            (*WORKER_LABELS, "direction", "memory"), registry=None,
        ),
        data_plane_fetch_duration=Histogram(
            "pipeline_runner_data_plane_fetch_duration_seconds",
            "Time to fetch one tensor over the data plane, by the memory it lands in.",
            (*WORKER_LABELS, "memory"), buckets=LATENCY_BUCKETS, registry=None,
        ),
        triton_request_duration=Histogram(
            "pipeline_runner_triton_request_duration_seconds",
            "Time of one inference call to the worker's Triton server.",
            (*WORKER_LABELS, "model"), buckets=LATENCY_BUCKETS, registry=None,
        ),
        http_requests=Counter(
            "pipeline_runner_http_requests_total",
            "HTTP requests the front door answered, by status code (499: the client went away).",
            (*INGRESS_LABELS, "code"), registry=None,
        ),
        http_request_duration=Histogram(
            "pipeline_runner_http_request_duration_seconds",
            "Time from an HTTP request's arrival to the end of its response.",
            INGRESS_LABELS, buckets=LATENCY_BUCKETS, registry=None,
        ),
    )
