"""An operator that reports where it runs, as its worker sees it (tests of device placement)."""

from __future__ import annotations

import os

from pipeline_runner import Operator, Request
from pipeline_runner.kernels import is_cupy_array


class WhereAmI(Operator):
    """Answers ``x * 2`` computed with the context's ``xp``, and what this worker sees.

    Parameters of the response: the context's device and GPU, ``CUDA_VISIBLE_DEVICES`` in this
    process, the array module ``request.array`` delivered the input in, that of the result, and
    on a GPU the device count CuPy reports here and the PCI bus id of the device in use.
    """

    async def execute(self, requests: list[Request]) -> None:
        xp = self.context.xp
        for request in requests:
            x = await request.array("x")
            doubled = xp.multiply(x, 2)
            facts = {
                "device": self.context.device,
                "gpu": self.context.gpu,
                "xp": xp.__name__,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "input_module": type(x).__module__.split(".")[0],
                "input_on_gpu": is_cupy_array(x),
                "output_on_gpu": is_cupy_array(doubled),
                "worker": self.context.worker,
            }
            if self.context.device == "gpu":
                import cupy

                facts["cuda_device_count"] = cupy.cuda.runtime.getDeviceCount()
                facts["pci_bus_id"] = cupy.cuda.Device().pci_bus_id
            await request.respond({"y": doubled}, parameters=facts)
