"""The serving path inside a worker, without nats-server: a Worker driven through a fake inbound
and a recording response sink runs the real admission, batching, cancellation, redelivery and
error-mapping code; the serving context hands requests' deadlines to what runs inside them."""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from pipeline_runner import BadInputError, Operator, OperatorContext, Request
from pipeline_runner.config import DataPlaneConfig, OperatorConfig
from pipeline_runner.context import ServingContext, current_context, reset_context, set_context
from pipeline_runner.data_plane.errors import DataPlaneError
from pipeline_runner.data_plane.plane import DataPlane
from pipeline_runner.inbound import Delivery, Inbound, OnDelivery
from pipeline_runner.protocol import (
    RemoteTensor,
    RequestHeader,
    ResponseHeader,
    decode_response,
    encode_inline_tensors,
    encode_message,
    inline_array,
)
from pipeline_runner.reply import Responder
from pipeline_runner.tensor import Tensor
from pipeline_runner.worker import Worker, WorkerSpec

from .test_ucx_transport import producer

pytestmark = pytest.mark.timeout(60)


# --- the serving context ---------------------------------------------------------------------


def test_outside_a_worker_the_serving_context_is_empty() -> None:
    context = current_context()
    assert context == ServingContext()
    assert context.time_left(default_s=7.0) == 7.0


async def test_a_fetch_inside_a_request_gives_up_at_the_requests_deadline_not_the_fetch_timeout() -> None:
    data_plane = DataPlane(DataPlaneConfig(fetch_timeout_s=30.0))
    await data_plane.start()
    try:
        async with producer() as peer:
            await peer.put("x", 1 << 20)
            remote = RemoteTensor(
                name="x", dtype="|u1", shape=(1 << 20,), nbytes=1 << 20, address=peer.address, tensor_id="x"
            )
            peer.signal(signal.SIGSTOP)  # it will never answer
            token = set_context(ServingContext(deadline=time.monotonic() + 0.5))
            started = time.monotonic()
            try:
                with pytest.raises(DataPlaneError, match="timed out"):
                    await Tensor("x", remote=remote, data_plane=data_plane).array()
            finally:
                reset_context(token)
                peer.signal(signal.SIGCONT)
            assert time.monotonic() - started < 3.0  # not the 30 s fetch_timeout_s
            # Outside the request the same fetch works (and would wait up to fetch_timeout_s).
            fetched = await Tensor("x", remote=remote, data_plane=data_plane).array()
            assert fetched.nbytes == 1 << 20 and isinstance(fetched, np.ndarray)
    finally:
        await data_plane.stop()


async def test_tasks_started_inside_a_request_inherit_its_context() -> None:
    context = ServingContext(deadline=time.monotonic() + 5.0)
    token = set_context(context)
    try:
        seen = await asyncio.create_task(_current())
    finally:
        reset_context(token)
    assert seen is context
    assert current_context() == ServingContext()


async def _current() -> ServingContext:
    return current_context()


# --- a Worker driven without NATS --------------------------------------------------------------


class FakeInbound(Inbound):
    """Hands the worker deliveries a test makes up, and records which of them were done."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.done: list[str] = []
        self.taking = False
        self._on_delivery: OnDelivery | None = None
        self.capacity: Callable[[], int] = lambda: 0

    async def start(self, on_delivery: OnDelivery, capacity: Callable[[], int]) -> None:
        self._on_delivery, self.capacity, self.taking = on_delivery, capacity, True
        self.started.set()

    async def stop_taking(self) -> None:
        self.taking = False

    async def close(self) -> None:
        pass

    async def deliver(
        self, data: bytes, *, attempt: int = 1, reply_to: str | None = "caller.inbox", tag: str = ""
    ) -> None:
        assert self._on_delivery is not None and self.taking
        await self._on_delivery(Delivery(data, reply_to, attempt, settle=self._settle, message=tag))

    async def _settle(self, tag: Any) -> None:
        self.done.append(tag)


class RecordingSink:
    """Where the worker's responses go: decoded, in order."""

    max_payload = 1 << 20

    def __init__(self) -> None:
        self.responses: asyncio.Queue[tuple[str, ResponseHeader, dict[str, np.ndarray]]] = asyncio.Queue()

    async def publish_response(self, subject: str, payload: bytes, final: bool) -> None:
        header, body = decode_response(payload)
        arrays = {d.name: inline_array(d, body) for d in header.tensors}  # type: ignore[arg-type]
        assert header.final == final
        self.responses.put_nowait((subject, header, arrays))

    async def next(self) -> tuple[str, ResponseHeader, dict[str, np.ndarray]]:
        return await asyncio.wait_for(self.responses.get(), timeout=5.0)


def request(
    request_id: str, inputs: dict[str, np.ndarray] | None = None, *, timeout_s: float = 10.0, **parameters: Any
) -> bytes:
    descriptors, buffers = encode_inline_tensors(inputs or {})
    header = RequestHeader(
        id=request_id, reply_to=f"caller.{request_id}", timeout_s=timeout_s, parameters=parameters, tensors=descriptors
    )
    return encode_message(header, buffers)


class Behaving(Operator):
    """Does what each request's ``do`` parameter says."""

    def __init__(self, context: OperatorContext):
        super().__init__(context)
        self.cancelled: list[str] = []
        self.started: dict[str, asyncio.Event] = {}

    async def execute(self, requests: list[Request]) -> None:
        for req in requests:
            do = req.parameters.get("do", "echo")
            if do == "echo":
                await req.respond({"y": await req.array("x")}, parameters={"batch": len(requests)})
            elif do == "bad_input":
                raise BadInputError("x must be positive")
            elif do == "crash":
                raise ZeroDivisionError("division by zero")
            elif do == "hang":
                self.started.setdefault(req.id, asyncio.Event()).set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.cancelled.append(req.id)
                    raise
            # "nothing": return without answering


@asynccontextmanager
async def serving(**operator_fields: Any) -> AsyncIterator[tuple[Worker, FakeInbound, RecordingSink, Behaving]]:
    config = OperatorConfig(name="op", implementation="tests:Behaving", **operator_fields)
    spec = WorkerSpec(deployment="d", operator=config, index=0, nats_url="nats://unused", root=".", drain_timeout_s=5)
    operator = Behaving(OperatorContext("d", "op", 1, spec.worker_id))
    inbound, sink = FakeInbound(), RecordingSink()
    worker = Worker(
        spec, operator, inbound=inbound, responder=Responder(sink, None, spec.worker_id), data_plane=DataPlane()
    )
    task = asyncio.create_task(worker.serve())
    await asyncio.wait_for(inbound.started.wait(), 5.0)
    try:
        yield worker, inbound, sink, operator
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10.0)


async def test_a_request_is_answered_to_its_reply_subject_and_then_done() -> None:
    async with serving() as (worker, inbound, sink, _):
        await inbound.deliver(request("r1", {"x": np.arange(4, dtype=np.int32)}), tag="r1")
        subject, header, arrays = await sink.next()
        assert subject == "caller.r1"
        assert (header.id, header.final, header.error, header.worker, header.attempt) == ("r1", True, None, "op.0", 1)
        np.testing.assert_array_equal(arrays["y"], np.arange(4, dtype=np.int32))
        while inbound.done != ["r1"]:
            await asyncio.sleep(0.01)
        assert worker.stats()["served"] == 1 and worker.stats()["unfinished"] == 0


async def test_requests_waiting_together_are_batched_up_to_max_batch_size() -> None:
    async with serving(max_batch_size=3) as (_, inbound, sink, _op):
        for i in range(3):  # delivered before the dispatcher runs: they wait together
            await inbound.deliver(request(f"r{i}", {"x": np.zeros(1)}))
        batches = [(await sink.next())[1].parameters["batch"] for _ in range(3)]
        assert batches == [3, 3, 3]


async def test_a_malformed_request_gets_a_bad_request_error_and_serving_goes_on() -> None:
    async with serving() as (_, inbound, sink, _op):
        await inbound.deliver(b"PRN1 garbage", reply_to="caller.inbox", tag="garbage")
        subject, header, _ = await sink.next()
        assert subject == "caller.inbox"
        assert header.error is not None and header.error.code == "bad_request"
        # Without a reply subject from the transport (a work queue), the header still names one.
        invalid = b'{"id": "r2", "reply_to": "caller.r2", "timeout_s": -1}'
        await inbound.deliver(b"PRN1" + struct.pack("<I", len(invalid)) + invalid, reply_to=None)
        subject, header, _ = await sink.next()
        assert subject == "caller.r2" and header.error is not None and header.error.code == "bad_request"
        await inbound.deliver(request("r3", {"x": np.ones(2)}))
        assert (await sink.next())[1].error is None
        assert "garbage" in inbound.done


async def test_a_redelivery_beyond_max_attempts_gets_worker_lost_without_running() -> None:
    async with serving(delivery={"max_attempts": 2}) as (worker, inbound, sink, _):
        await inbound.deliver(request("r1", {"x": np.ones(1)}), attempt=2)
        _, header, _ = await sink.next()
        assert header.error is None and header.attempt == 2
        await inbound.deliver(request("r2", {"x": np.ones(1)}), attempt=3, tag="r2")
        _, header, _ = await sink.next()
        assert header.error is not None and header.error.code == "worker_lost"
        assert "max_attempts: 2" in header.error.message and header.attempt == 3
        assert worker.stats()["served"] == 1 and worker.stats()["redelivered"] == 2
        while "r2" not in inbound.done:
            await asyncio.sleep(0.01)


async def test_a_non_idempotent_operator_never_runs_a_request_twice() -> None:
    async with serving(delivery={"idempotent": False}) as (worker, inbound, sink, _):
        await inbound.deliver(request("r1", {"x": np.ones(1)}), attempt=2)
        _, header, _ = await sink.next()
        assert header.error is not None and header.error.code == "worker_lost"
        assert "not idempotent" in header.error.message
        assert worker.stats()["served"] == 0


async def test_cancelling_a_running_request_cancels_the_task_running_execute() -> None:
    async with serving() as (worker, inbound, sink, operator):
        await inbound.deliver(request("r1", do="hang"), tag="r1")
        await asyncio.wait_for(operator.started.setdefault("r1", asyncio.Event()).wait(), 5.0)
        worker.cancel("r1")
        while "r1" not in inbound.done:
            await asyncio.sleep(0.01)
        assert operator.cancelled == ["r1"]
        assert worker.stats()["cancelled"] == 1 and worker.stats()["unfinished"] == 0
        assert sink.responses.empty()  # its caller is gone: nobody to answer


async def test_a_request_cancelled_before_it_arrives_is_never_run() -> None:
    async with serving() as (worker, inbound, sink, _):
        worker.cancel("r1")
        await inbound.deliver(request("r1", {"x": np.ones(1)}), tag="r1")
        while "r1" not in inbound.done:
            await asyncio.sleep(0.01)
        assert sink.responses.empty() and worker.stats()["served"] == 0


@pytest.mark.parametrize(
    ("do", "code", "text"),
    [
        ("nothing", "no_response", "returned without a final response"),
        ("bad_input", "bad_input", "x must be positive"),
        ("crash", "operator_failed", "ZeroDivisionError: division by zero"),
    ],
)
async def test_the_worker_answers_what_the_operator_left_unanswered(do: str, code: str, text: str) -> None:
    async with serving() as (_, inbound, sink, _op):
        await inbound.deliver(request("r1", do=do))
        _, header, _ = await sink.next()
        assert header.final and header.error is not None
        assert (header.error.code, text in header.error.message) == (code, True)
        await inbound.deliver(request("r2", {"x": np.ones(1)}))  # and it keeps serving
        assert (await sink.next())[1].error is None


async def test_a_worker_holding_its_limit_refuses_more_at_once_as_overloaded() -> None:
    async with serving(max_inflight_requests=1, max_queued_requests=1) as (_, inbound, sink, operator):
        await inbound.deliver(request("r1", do="hang"))
        await inbound.deliver(request("r2", do="hang"))
        await inbound.deliver(request("r3", do="hang"), tag="r3")
        subject, header, _ = await sink.next()
        assert subject == "caller.r3" and header.error is not None and header.error.code == "overloaded"
        assert "max_queued_requests=1" in header.error.message
        assert inbound.done == ["r3"]  # the refused one is done at once; the others are held
        assert inbound.capacity() == -1  # 1 slot, 2 held: a pulling inbound would ask for none


async def test_execute_runs_inside_the_requests_serving_context() -> None:
    seen: list[ServingContext] = []

    class Recording(Behaving):
        async def execute(self, requests: list[Request]) -> None:
            seen.append(current_context())
            await super().execute(requests)

    async with serving() as (worker, inbound, sink, _):
        worker.operator = Recording(worker.operator.context)
        sent = time.monotonic()
        await inbound.deliver(request("r1", {"x": np.ones(1)}, timeout_s=4.0))
        await sink.next()
    (context,) = seen
    assert context.deadline is not None and sent + 3.5 < context.deadline <= time.monotonic() + 4.0
    assert context.scope is not None


# --- dynamic batching ------------------------------------------------------------------------


async def _collect(sink: RecordingSink, n: int) -> dict[str, ResponseHeader]:
    answers = [await sink.next() for _ in range(n)]
    return {header.id: header for _, header, _ in answers}


async def test_a_batch_runs_as_soon_as_it_is_full_without_waiting_out_max_wait() -> None:
    async with serving(batching={"max_batch_size": 4, "max_wait_ms": 4_000}) as (worker, inbound, sink, _):
        sent = time.monotonic()
        for i in range(4):
            await inbound.deliver(request(f"r{i}", {"x": np.ones(1)}))
        headers = await _collect(sink, 4)
        assert time.monotonic() - sent < 4.0
        assert [h.parameters["batch"] for h in headers.values()] == [4, 4, 4, 4]
        assert worker.stats()["batches"] == 1


async def test_a_lone_request_runs_once_its_wait_is_over_and_not_before() -> None:
    async with serving(batching={"max_batch_size": 8, "max_wait_ms": 300}) as (_, inbound, sink, _op):
        sent = time.monotonic()
        await inbound.deliver(request("r1", {"x": np.ones(1)}))
        _, header, _ = await sink.next()
        waited = time.monotonic() - sent
        assert header.error is None and header.parameters["batch"] == 1
        assert 0.3 <= waited < 3.0


async def test_requests_arriving_within_the_wait_share_one_batch() -> None:
    async with serving(batching={"max_batch_size": 8, "max_wait_ms": 400}) as (worker, inbound, sink, _):
        for i in range(3):
            await inbound.deliver(request(f"r{i}", {"x": np.ones(1)}))
            await asyncio.sleep(0.05)
        headers = await _collect(sink, 3)
        assert {h.parameters["batch"] for h in headers.values()} == {3}
        assert worker.stats()["batches"] == 1


async def test_a_request_whose_deadline_is_nearer_than_max_wait_is_not_held_until_it_passes() -> None:
    async with serving(batching={"max_batch_size": 8, "max_wait_ms": 5_000}) as (_, inbound, sink, _op):
        sent = time.monotonic()
        await inbound.deliver(request("hurried", {"x": np.ones(1)}, timeout_s=1.0))
        _, header, _ = await sink.next()
        assert header.id == "hurried" and header.error is None
        assert time.monotonic() - sent < 1.0  # answered within its deadline, not after 5 s


async def test_a_hurried_request_closes_the_batch_it_joins() -> None:
    async with serving(batching={"max_batch_size": 8, "max_wait_ms": 5_000}) as (_, inbound, sink, _op):
        await inbound.deliver(request("patient", {"x": np.ones(1)}, timeout_s=30.0))
        await asyncio.sleep(0.05)
        sent = time.monotonic()
        await inbound.deliver(request("hurried", {"x": np.ones(1)}, timeout_s=1.0))
        headers = await _collect(sink, 2)
        assert time.monotonic() - sent < 1.0
        assert {h.parameters["batch"] for h in headers.values()} == {2}


async def test_an_error_in_a_batch_goes_to_every_member() -> None:
    async with serving(batching={"max_batch_size": 3, "max_wait_ms": 4_000}) as (_, inbound, sink, _op):
        for i, do in enumerate(["crash", "echo", "echo"]):
            await inbound.deliver(request(f"r{i}", {"x": np.ones(1)}, do=do))
        headers = await _collect(sink, 3)
        # "crash" is first: execute raised before answering anyone.
        assert {h.error.code for h in headers.values() if h.error} == {"operator_failed"}
        assert all(h.error and "ZeroDivisionError" in h.error.message for h in headers.values())


async def test_cancelling_a_waiting_request_drops_it_from_its_batch() -> None:
    async with serving(batching={"max_batch_size": 8, "max_wait_ms": 300}) as (worker, inbound, sink, _):
        await inbound.deliver(request("stays", {"x": np.ones(1)}))
        await inbound.deliver(request("leaves", {"x": np.ones(1)}), tag="leaves")
        worker.cancel("leaves")
        while "leaves" not in inbound.done:  # done at once, not when the batch runs
            await asyncio.sleep(0.01)
        _, header, _ = await sink.next()
        assert header.id == "stays" and header.parameters["batch"] == 1
        await asyncio.sleep(0.1)
        assert sink.responses.empty() and worker.stats()["cancelled"] == 1


async def test_cancelling_one_running_request_of_a_batch_leaves_the_others_running() -> None:
    async with serving(batching={"max_batch_size": 2, "max_wait_ms": 4_000}) as (worker, inbound, sink, operator):
        await inbound.deliver(request("r1", do="hang"), tag="r1")
        await inbound.deliver(request("r2", do="hang"), tag="r2")
        await asyncio.wait_for(operator.started.setdefault("r1", asyncio.Event()).wait(), 5.0)
        worker.cancel("r2")
        await asyncio.sleep(0.1)
        assert operator.cancelled == [] and inbound.done == []  # r1 still runs: so does the batch
        worker.cancel("r1")
        while sorted(inbound.done) != ["r1", "r2"]:
            await asyncio.sleep(0.01)
        assert operator.cancelled == ["r1"] and worker.stats()["cancelled"] == 2


async def test_a_batching_worker_takes_in_one_batch_beyond_its_slots_so_the_next_one_fills() -> None:
    async with serving(
        max_inflight_requests=4, batching={"max_batch_size": 4, "max_wait_ms": 4_000}
    ) as (_, inbound, _sink, operator):
        assert inbound.capacity() == 8
        for i in range(4):
            await inbound.deliver(request(f"r{i}", do="hang"))
        await asyncio.wait_for(operator.started.setdefault("r0", asyncio.Event()).wait(), 5.0)
        assert inbound.capacity() == 4  # a running batch of 4, room for the next
