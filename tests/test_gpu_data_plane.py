"""GPU arrays on the data plane (run on a machine with a CUDA device; skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import connected, make_config, op, running

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]')")
try:
    _HAS_DEVICE = bool(cupy.is_available())
except Exception:  # a CuPy without a driver raises instead of answering False
    _HAS_DEVICE = False
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _HAS_DEVICE, reason="no CUDA device found by CuPy")]


async def test_a_device_array_travels_gpu_to_gpu_through_a_worker(nats_url: str) -> None:
    config = make_config(op("gpu_copy", "echo:GpuCopy"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        x = cupy.arange(1 << 20, dtype=cupy.float32)
        response = await conn.operator("gpu_copy").infer({"x": x})
        descriptor = response.outputs["x"].descriptor
        assert descriptor is not None and descriptor.memory_type == "gpu"
        out = await response.array("x", "gpu")
        assert isinstance(out, cupy.ndarray)
        assert bool(cupy.all(out == x))
        host = await response.outputs["x"].array("cpu")
        np.testing.assert_array_equal(host, cupy.asnumpy(x))
        response.release()
