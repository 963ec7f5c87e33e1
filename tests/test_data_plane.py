"""The UCX data plane with real worker processes: placement, forwarding, lifetime, limits."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from pipeline_runner import OperatorError, PayloadTooLargeError
from pipeline_runner.data_plane.errors import DataPlaneError
from pipeline_runner.data_plane.store import TensorStore

from .conftest import connected, make_config, op, running

NUMERIC = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bool",
]  # fmt: skip
SHAPES = [(), (0,), (7,), (3, 0), (2, 3, 4)]


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(shape) * 100).astype(dtype)


@pytest.mark.parametrize("threshold", [0, 1 << 20], ids=["over_ucx", "inline"])
async def test_every_dtype_and_shape_round_trips_through_a_worker(nats_url: str, threshold: int) -> None:
    config = make_config(op("copy", "echo:Copy"), data_plane={"inline_threshold_bytes": threshold})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        copy = conn.operator("copy")
        tensors = {f"{dtype}_{i}": _sample(dtype, shape) for dtype in NUMERIC for i, shape in enumerate(SHAPES)}
        tensors["bytes"] = np.array([b"", b"\x00\x01", b"x" * 1000], dtype=object)
        tensors["text"] = np.array([["h\u00e9llo", ""], ["\u65e5\u672c", "z"]], dtype=object)
        tensors["scalar_bytes"] = np.array(b"only", dtype=object)
        response = await copy.infer(tensors)
        remote = {name for name, t in response.outputs.items() if t.descriptor is not None}
        for name, original in tensors.items():
            out = await response.array(name)
            assert out.shape == original.shape, name
            if original.dtype == object:
                assert out.reshape(-1).tolist() == original.reshape(-1).tolist(), name
            else:
                assert out.dtype == original.dtype and out.tobytes() == original.tobytes(), name
        if threshold == 0:
            nonempty = {n for n, t in tensors.items() if _nbytes(t) > 0}
            assert remote == nonempty
            stats = await conn.worker_stats(expected=1)
            assert stats[0]["data_plane"]["fetches_served"] >= len(nonempty)  # the client fetched them
        else:
            assert remote == set()


def _nbytes(array: np.ndarray) -> int:
    if array.dtype == object:
        return 1  # length-prefixed encoding is never empty unless there are no elements
    return array.nbytes


async def test_hello_world_above_the_threshold_lets_the_decoder_fetch_from_the_encoder(
    nats_url: str,
) -> None:
    from pipeline_runner.client import make_inputs, run_load_test
    from pipeline_runner.config_loader import load_deployment

    from .conftest import REPO_ROOT

    config = load_deployment(REPO_ROOT / "deployments" / "hello_world_python.yaml")
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        size = 4 * config.data_plane.inline_threshold_bytes  # int32: 16x the threshold in bytes
        result = await run_load_test(
            conn.operator("encoder_decoder"), requests=100, concurrency=8,
            inputs=make_inputs(size, "int32", count=4),
        )  # fmt: skip
        assert result.ok == 100, result.errors
        stats = await conn.worker_stats(expected=len(deployment.workers))
    by_op: dict[str, list[dict]] = {}
    for s in stats:
        by_op.setdefault(s["operator"], []).append(s)
    encoder_addresses = {s["data_plane"]["address"] for s in by_op["encoder"]}
    decoder_sources = {a for s in by_op["decoder"] for a in s["data_plane"]["fetched_from"]}
    # The decoder fetched the encoded tensors straight from the encoders...
    assert decoder_sources and decoder_sources <= encoder_addresses
    assert sum(n for s in by_op["decoder"] for n in s["data_plane"]["fetched_from"].values()) == 100
    # ...and the pipeline in the middle only forwarded descriptors, never fetching a byte.
    assert all(s["data_plane"]["fetches"] == 0 for s in by_op["encoder_decoder"])


@pytest.mark.slow
async def test_a_256_mib_tensor_crosses_a_three_stage_pipeline(nats_url: str) -> None:
    config = make_config(
        op("stage1", "echo:Chain", parameters={"next": "stage2"}),
        op("stage2", "echo:Chain", parameters={"next": "stage3"}),
        op("stage3", "echo:Chain"),
    )
    async with running(config, nats_url) as deployment, connected(deployment, timeout_s=120) as conn:
        x = np.arange(256 << 20, dtype=np.uint8)
        response = await conn.operator("stage1").infer({"input": x})
        out = await response.array("output")
        assert out.nbytes == 256 << 20
        assert np.array_equal(out, x + np.uint8(3))
        response.release()


async def test_a_killed_consumer_does_not_leak_the_producers_tensors(nats_url: str) -> None:
    config = make_config(op("producer", "echo:Copy"), op("holder", "echo:Holder"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        holding = asyncio.create_task(
            conn.operator("holder").infer({"big": np.ones(1 << 20, np.uint8)}, parameters={"hold": 60}, timeout_s=5.0)
        )

        async def producer_store() -> int | None:
            for stats in await conn.worker_stats(expected=2, timeout_s=2.0):
                if stats["operator"] == "producer":
                    return int(stats["data_plane"]["stored_tensors"])
            return None  # no answer in time: ask again

        deadline = time.monotonic() + 10
        while not await producer_store():
            if time.monotonic() > deadline:
                holding.cancel()
                pytest.fail("the producer never published its tensor")
            await asyncio.sleep(0.1)
        holder = next(w for w in deployment.workers if w.spec.operator.name == "holder")
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        with pytest.raises(Exception):
            await holding
        # Nobody will release it: the lease (request deadline + grace) frees it.
        deadline = time.monotonic() + 25
        while await producer_store() != 0:
            assert time.monotonic() < deadline, "the producer kept the tensor of a dead consumer"
            await asyncio.sleep(0.5)


async def test_fetching_a_freed_tensor_fails_fast_with_a_data_plane_error(nats_url: str) -> None:
    config = make_config(op("copy", "echo:Copy"), data_plane={"inline_threshold_bytes": 1024})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        response = await conn.operator("copy").infer({"x": np.zeros(1 << 16, np.uint8)})
        assert response.outputs["x"].descriptor is not None
        response.release()
        await asyncio.sleep(0.3)  # the release notice reaches the producer
        started = time.monotonic()
        with pytest.raises(DataPlaneError, match=response.outputs["x"].descriptor.tensor_id):
            await response.array("x")
        assert time.monotonic() - started < 2.0


async def test_a_message_that_still_exceeds_the_nats_limit_names_the_tensor(nats_url: str) -> None:
    config = make_config(op("copy", "echo:Copy"), data_plane={"inline_threshold_bytes": 4 << 20})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        with pytest.raises(PayloadTooLargeError) as excinfo:
            await conn.operator("copy").infer({"small": np.zeros(3), "huge": np.zeros(2 << 20, np.uint8)})
        message = str(excinfo.value)
        assert "'huge'" in message and "1048576" in message and "inline_threshold_bytes" in message


async def test_an_operator_error_still_frees_what_the_caller_published(nats_url: str) -> None:
    config = make_config(op("faulty", "echo:Faulty"), data_plane={"inline_threshold_bytes": 1024})
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        with pytest.raises(OperatorError):
            await conn.operator("faulty").infer({"x": np.zeros(1 << 16)}, parameters={"mode": "raise"})
        assert len(conn.data_plane.store) == 0


def test_the_store_frees_tensors_on_release_or_when_their_lease_ends() -> None:
    now = [100.0]
    store = TensorStore(clock=lambda: now[0])
    a = store.put(b"a" * 10, 10, lease_s=5)
    b = store.put(b"b" * 20, 20, lease_s=50)
    assert len(store) == 2 and store.nbytes == 30
    store.release([a, "unknown"])
    assert store.get(a) is None and store.nbytes == 20
    now[0] += 49
    assert store.expire() == 0 and store.get(b) is not None
    now[0] += 1
    assert store.get(b) is None and len(store) == 0 and store.nbytes == 0
