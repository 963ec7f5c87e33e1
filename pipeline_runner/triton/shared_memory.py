"""System shared-memory regions for large inputs from a worker to its own Triton server.

Measured on this machine (1-4 MiB float32 inputs to a Python-backend model): about 2x faster
than sending the same bytes in the gRPC request (benchmarks/RESULTS.md). Regions are registered
with Triton once and reused. Each region's name is unlinked as soon as Triton has mapped it, so
nothing is left in /dev/shm when either process dies.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np
import tritonclient.grpc.aio as grpcclient

# Smaller inputs ride in the gRPC request: the copy saved does not pay for the bookkeeping.
SHM_THRESHOLD_BYTES = 256 * 1024
_MIN_REGION = 256 * 1024
_FREE_PER_SIZE = 4  # regions of one size kept for reuse; more are let go


@dataclass
class Region:
    name: str
    memory: shared_memory.SharedMemory
    size: int

    def write(self, array: np.ndarray) -> None:
        view = np.ndarray(array.shape, array.dtype, buffer=self.memory.buf)
        view[...] = array


@dataclass
class SharedMemoryPool:
    """Regions registered with one Triton server, handed out by size (powers of two)."""

    client: grpcclient.InferenceServerClient
    prefix: str = field(default_factory=lambda: f"pr{os.getpid()}")
    _free: dict[int, list[Region]] = field(default_factory=dict)
    _all: dict[str, Region] = field(default_factory=dict)
    _names: itertools.count = field(default_factory=itertools.count)

    async def acquire(self, nbytes: int) -> Region:
        size = max(_MIN_REGION, 1 << (nbytes - 1).bit_length())
        free = self._free.get(size)
        if free:
            return free.pop()
        name = f"{self.prefix}_{next(self._names)}"
        memory = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            await self.client.register_system_shared_memory(name, f"/{name}", size)
        finally:
            # Triton has mapped it (or failed): the name is no longer needed by anyone.
            memory.unlink()
        region = Region(name, memory, size)
        self._all[name] = region
        return region

    @property
    def regions(self) -> int:
        """Regions registered with Triton now."""
        return len(self._all)

    async def release(self, region: Region, reuse: bool = True) -> None:
        free = self._free.setdefault(region.size, [])
        if reuse and len(free) < _FREE_PER_SIZE:
            free.append(region)
        else:
            await self._drop(region)

    async def close(self) -> None:
        for region in list(self._all.values()):
            await self._drop(region)
        self._free.clear()

    async def _drop(self, region: Region) -> None:
        self._all.pop(region.name, None)
        with contextlib.suppress(Exception):
            await self.client.unregister_system_shared_memory(region.name)
        with contextlib.suppress(Exception):
            region.memory.close()

