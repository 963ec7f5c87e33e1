"""``runner client``: a load test that checks every response and reports latency percentiles."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import tracing
from .errors import OperatorError, RequestTimeoutError, RunnerError
from .remote import RemoteOperator


@dataclass(frozen=True, slots=True)
class TracedRequest:
    """A successful request sent while tracing was on: its latency and its trace."""

    latency_s: float
    trace_id: str


@dataclass
class LoadTestResult:
    """Outcome of a load test; latencies are in seconds, of successful requests only."""

    requests: int
    concurrency: int
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    duration_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: Successful requests with their trace ids, when tracing was on.
    traced: list[TracedRequest] = field(default_factory=list)

    def slowest(self, count: int) -> list[TracedRequest]:
        """The ``count`` slowest traced requests, slowest first."""
        return sorted(self.traced, key=lambda t: t.latency_s, reverse=True)[:count]

    @property
    def throughput(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        return float(np.percentile(self.latencies_s, q) * 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 4),
            "throughput_rps": round(self.throughput, 2),
            "latency_ms": {
                "p50": self.percentile_ms(50),
                "p90": self.percentile_ms(90),
                "p99": self.percentile_ms(99),
                "max": max(self.latencies_s) * 1000 if self.latencies_s else None,
            },
            "errors": dict(self.errors),
        }


def make_inputs(size: int, dtype: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct random 1-D inputs of ``size`` elements."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "f":
        return [rng.standard_normal(size).astype(np_dtype) for _ in range(count)]
    if np_dtype.kind == "b":
        return [rng.integers(0, 2, size).astype(bool) for _ in range(count)]
    if np_dtype.kind in "iu":
        info = np.iinfo(np_dtype)
        return [rng.integers(info.min, info.max, size, dtype=np_dtype, endpoint=True) for _ in range(count)]
    raise RunnerError(f"--dtype must be an integer, float or bool dtype, got {dtype}")


async def run_load_test(
    operator: RemoteOperator,
    *,
    requests: int,
    concurrency: int,
    inputs: list[np.ndarray],
    parameters: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    check: bool = True,
    on_done: Callable[[bool], None] | None = None,
) -> LoadTestResult:
    """Send ``requests`` requests with at most ``concurrency`` in flight and check each answer.

    A response is correct when its ``output`` equals the request's ``input`` (dtype and values),
    which is what the hello_world pipeline returns.
    """
    data_plane = operator.connection.data_plane
    if any(data_plane.should_publish(x) for x in inputs):
        # Large inputs go through the data plane, whose start (importing UCX) takes about 0.5 s:
        # start it now rather than count it in the latency of the first requests.
        await data_plane.start()
    result = LoadTestResult(requests=requests, concurrency=concurrency)
    counter = iter(range(requests))

    async def traced(index: int) -> None:
        from .tracing.spans import root_span

        with root_span("runner client request", {"pipeline_runner.operator": operator.name}) as trace_id:
            latency = await one(index)
        if latency is not None:
            result.traced.append(TracedRequest(latency, trace_id))

    async def one(index: int) -> float | None:
        """Send request ``index``; its latency when it succeeded."""
        expected = inputs[index % len(inputs)]
        started = time.perf_counter()
        latency = None
        try:
            response = await operator.infer({"input": expected}, parameters=parameters, timeout_s=timeout_s)
            try:
                if check:
                    got = await response.array("output")
                    if got.dtype != expected.dtype or not np.array_equal(got, expected):
                        raise OperatorError(operator.name, "wrong_result", "output differs from the input")
            finally:
                response.release()
        except RequestTimeoutError as exc:
            result.timed_out += 1
            result.errors[f"timeout: {exc}"] += 1
            ok = False
        except RunnerError as exc:
            result.failed += 1
            result.errors[str(exc)] += 1
            ok = False
        else:
            latency = time.perf_counter() - started
            result.ok += 1
            result.latencies_s.append(latency)
            ok = True
        if on_done:
            on_done(ok)
        return latency

    send = traced if tracing.active() else one

    async def lane() -> None:
        for index in counter:
            await send(index)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(concurrency, requests))))
    result.duration_s = time.perf_counter() - started
    return result
