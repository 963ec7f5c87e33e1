"""The serving path inside a worker, without nats-server: a Worker driven through a fake inbound
and a recording response sink runs the real admission, batching, cancellation, redelivery and
error-mapping code; the serving context hands requests' deadlines to what runs inside them."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from pipeline_runner.config import DataPlaneConfig
from pipeline_runner.context import ServingContext, current_context, reset_context, set_context
from pipeline_runner.data_plane.errors import DataPlaneError
from pipeline_runner.data_plane.plane import DataPlane
from pipeline_runner.protocol import RemoteTensor
from pipeline_runner.tensor import Tensor

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
