"""Request/response over a real nats-server with real worker processes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np
import pytest

from pipeline_runner import OperatorError, PayloadTooLargeError, RequestTimeoutError
from pipeline_runner.protocol import decode_response
from pipeline_runner.request_plane import operator_subject

from .conftest import connected, make_config, op, running


async def test_a_request_round_trips_tensors_and_parameters(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        labels = np.array([b"cat", b"dog"], dtype=object)
        response = await conn.operator("echo").infer(
            {"image": image, "labels": labels}, parameters={"threshold": 0.5, "tags": ["a"]}
        )
        assert response.final
        np.testing.assert_array_equal(await response.array("image"), image)
        assert (await response.array("image")).dtype == np.float32
        assert list(await response.array("labels")) == [b"cat", b"dog"]
        assert response.parameters["threshold"] == 0.5
        assert response.parameters["tags"] == ["a"]
        assert response.worker == "echo.0"


async def test_an_operator_streams_several_responses_and_marks_the_last_final(nats_url: str) -> None:
    config = make_config(op("stream", "echo:Stream"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        responses = [r async for r in conn.operator("stream").call(parameters={"count": 5})]
        indices = [int((await r.array("index"))[0]) for r in responses]
        assert indices == [0, 1, 2, 3, 4]
        assert [r.final for r in responses] == [False, False, False, False, True]


async def test_workers_of_one_operator_share_the_load(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", workers=3, max_inflight_requests=4))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")
        # Each request holds its worker a little, so a single worker cannot take them all.
        responses = await asyncio.gather(
            *(echo.infer({"x": np.array([i])}, parameters={"sleep": 0.02}) for i in range(90))
        )
        served = Counter(r.worker for r in responses)
        assert set(served) == {"echo.0", "echo.1", "echo.2"}, served
        assert sum(served.values()) == 90


async def test_a_request_to_an_operator_without_workers_times_out_clearly(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError) as excinfo:
            await conn.operator("nobody_home").infer({"x": np.zeros(3)}, timeout_s=1.0)
        elapsed = time.monotonic() - started
    message = str(excinfo.value)
    assert "nobody_home" in message
    assert "no worker is serving" in message
    assert "1 s" in message
    assert 0.9 <= elapsed < 3.0


async def test_a_slow_operator_times_out_with_no_final_response(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        with pytest.raises(RequestTimeoutError, match="no final response arrived"):
            await conn.operator("echo").infer(parameters={"sleep": 2.0}, timeout_s=0.3)


async def test_operator_errors_reach_the_caller_and_the_worker_keeps_serving(nats_url: str) -> None:
    config = make_config(op("faulty", "echo:Faulty"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        faulty = conn.operator("faulty")
        with pytest.raises(OperatorError) as bad:
            await faulty.infer(parameters={"mode": "bad_input"})
        assert bad.value.code == "bad_input"
        assert bad.value.message == "input 'x' must be float32"

        with pytest.raises(OperatorError) as raised:
            await faulty.infer(parameters={"mode": "raise"})
        assert raised.value.code == "operator_failed"
        assert raised.value.message == "ValueError: something broke inside the operator"
        assert "Traceback" not in raised.value.message

        with pytest.raises(OperatorError) as forgot:
            await faulty.infer(parameters={"mode": "forget"})
        assert forgot.value.code == "no_response"

        ok = await faulty.infer()
        assert list(await ok.array("ok")) == [1]
        assert deployment.workers[0].restarts == 0


async def test_garbage_on_an_operator_subject_gets_an_error_reply_and_serving_goes_on(
    nats_url: str,
) -> None:
    # Plain request/reply: the reply address is the worker's to answer (in a work queue it is
    # JetStream's, see test_bad_input).
    config = make_config(op("echo", "echo:Echo", delivery={"mode": "at_most_once"}))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        subject = operator_subject("test", "echo", 1)
        nc = conn.plane.nats
        for garbage in (b"", b"hello", b"PRN1\xff\xff\xff\xff{", b"PRN1\x05\x00\x00\x00{]}xx"):
            reply = await nc.request(subject, garbage, timeout=5)
            header, _ = decode_response(reply.data)
            assert header.final and header.error is not None
            assert header.error.code == "bad_request"
        response = await conn.operator("echo").infer({"x": np.array([7])})
        assert list(await response.array("x")) == [7]


ALL_INLINE = {"inline_threshold_bytes": 64 << 20}  # no data plane: NATS's limit applies


async def test_a_too_large_request_fails_at_once_naming_the_limit(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"), data_plane=ALL_INLINE)
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        big = np.zeros(2 * 1024 * 1024, dtype=np.uint8)
        started = time.monotonic()
        with pytest.raises(PayloadTooLargeError, match="exceeds the NATS max payload of 1048576 bytes.*'big'"):
            await conn.operator("echo").infer({"big": big})
        assert time.monotonic() - started < 1.0


async def test_a_too_large_response_becomes_an_error_response_not_a_timeout(nats_url: str) -> None:
    config = make_config(op("inflate", "echo:Inflate"), data_plane=ALL_INLINE)
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        inflate = conn.operator("inflate")
        with pytest.raises(OperatorError) as excinfo:
            await inflate.infer(parameters={"nbytes": 4 << 20}, timeout_s=5)
        assert excinfo.value.code == "operator_failed"
        assert "exceeds the NATS max payload" in excinfo.value.message
        small = await inflate.infer(parameters={"nbytes": 10})
        assert (await small.array("blob")).nbytes == 10


async def test_a_worker_batches_queued_requests_up_to_max_batch_size(nats_url: str) -> None:
    config = make_config(op("batched", "echo:Batched", max_batch_size=4, max_inflight_requests=8))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        batched = conn.operator("batched")
        responses = await asyncio.gather(*(batched.infer() for _ in range(16)))
        sizes = [r.parameters["batch"] for r in responses]
        assert max(sizes) > 1
        assert max(sizes) <= 4


@pytest.mark.parametrize("mode", ["at_least_once", "at_most_once"])
async def test_a_saturated_worker_refuses_extra_requests_at_once_as_overloaded(nats_url: str, mode: str) -> None:
    config = make_config(
        op("echo", "echo:Echo", max_inflight_requests=1, max_queued_requests=2, delivery={"mode": mode})
    )
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")

        async def timed() -> tuple[str, float]:
            started = time.monotonic()
            try:
                await echo.infer(parameters={"sleep": 1.0}, timeout_s=10)
                return "ok", time.monotonic() - started
            except OperatorError as exc:
                assert "max_queued_requests" in exc.message
                return exc.code, time.monotonic() - started

        outcomes = await asyncio.gather(*(timed() for _ in range(10)))
        codes = Counter(code for code, _ in outcomes)
        assert codes == {"ok": 3, "overloaded": 7}, codes
        assert all(elapsed < 0.9 for code, elapsed in outcomes if code == "overloaded")
        # Once the backlog is served, the worker takes requests again.
        response = await echo.infer({"x": np.array([5])})
        assert list(await response.array("x")) == [5]


async def test_the_deadline_propagates_down_three_hops_and_expires_there(nats_url: str) -> None:
    config = make_config(
        op("hop1", "echo:Deadline", parameters={"next": "hop2"}),
        op("hop2", "echo:Deadline", parameters={"next": "hop3"}),
        op("hop3", "echo:Deadline"),
    )
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=30) as conn:
        hop1 = conn.operator("hop1")
        response = await hop1.infer(timeout_s=3.0)
        chain = response.parameters["chain"]
        assert len(chain) == 3
        assert 2.5 < chain[0] <= 3.0 and chain[0] >= chain[1] >= chain[2] > 2.0, chain

        started = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await hop1.infer(parameters={"sleep": 2.5}, timeout_s=1.0)
        assert time.monotonic() - started < 1.5  # not the 30 s connection default


async def _cancelled_counts(conn, expected: int) -> dict[str, int]:
    return {s["worker"]: s["cancelled"] for s in await conn.worker_stats(expected=expected, timeout_s=2)}


async def test_cancelling_a_call_stops_the_slow_operator_working_on_it(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", max_inflight_requests=1, max_queued_requests=0))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")
        call = asyncio.create_task(echo.infer(parameters={"sleep": 30}, timeout_s=60))
        await asyncio.sleep(0.5)  # the operator is now sleeping on it
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        deadline = time.monotonic() + 5
        while (await _cancelled_counts(conn, 1)).get("echo.0") != 1:
            assert time.monotonic() < deadline, "the cancellation never reached the operator"
        # Its only slot is free again at once: no 'overloaded', no 30 s wait.
        started = time.monotonic()
        response = await echo.infer({"x": np.array([1])}, timeout_s=5)
        assert list(await response.array("x")) == [1]
        assert time.monotonic() - started < 1.0


async def test_cancellation_travels_down_the_pipeline(nats_url: str) -> None:
    config = make_config(
        op("hop1", "echo:Deadline", parameters={"next": "hop2"}),
        op("hop2", "echo:Deadline"),
    )
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        call = asyncio.create_task(conn.operator("hop1").infer(parameters={"sleep": 30}, timeout_s=60))
        await asyncio.sleep(0.5)
        call.cancel()
        deadline = time.monotonic() + 5
        while await _cancelled_counts(conn, 2) != {"hop1.0": 1, "hop2.0": 1}:
            assert time.monotonic() < deadline, "hop2 kept working on a request nobody waits for"
