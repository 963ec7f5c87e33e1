"""The data plane of one process: publishes large tensors and fetches other processes' tensors.

Tensors are published with a lease (the deadline of the request they belong to) and freed when
their owner releases them or the lease ends, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DataPlaneConfig
from ..protocol import RemoteTensor, array_from_bytes, tensor_bytes
from .buffers import BufferPool
from .errors import DataPlaneError
from .fetch_gate import FetchGate
from .peers import describe
from .store import TensorStore

if TYPE_CHECKING:
    from ..metrics.observers import DataPlaneMetrics
    from .ucx_transport import UcxTransport

log = logging.getLogger(__name__)

# A consumer may fetch a tensor just as its request's deadline passes; keep it a little longer.
LEASE_GRACE_S = 5.0
_SWEEP_INTERVAL_S = 0.5


def is_device_array(value: Any) -> bool:
    """True for GPU arrays (CuPy and anything with ``__cuda_array_interface__``)."""
    return hasattr(value, "__cuda_array_interface__")


class DataPlane:
    """Large-tensor transfer for one process, over UCX."""

    def __init__(self, config: DataPlaneConfig | None = None, metrics: DataPlaneMetrics | None = None):
        self.config = config or DataPlaneConfig()
        self.metrics = metrics
        self.store = TensorStore()
        self.buffers = BufferPool()
        self.gate = FetchGate(self.config.parallel_fetches)  # large host fetches take turns
        self.fetched_from: Counter[str] = Counter()
        # Where tensors lived and where they went: the evidence that GPU tensors stay on GPUs.
        self.published_memory: Counter[str] = Counter()  # 'cpu' | 'gpu'
        self.fetched_memory: Counter[str] = Counter()  # '<producer's memory>-><ours>', e.g. 'gpu->gpu'
        self._transport: UcxTransport | None = None
        self._start_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def threshold(self) -> int:
        return self.config.inline_threshold_bytes

    @property
    def address(self) -> str:
        if self._transport is None:
            raise DataPlaneError("the data plane is not started")
        address: str = self._transport.address
        return address

    async def start(self) -> None:
        """Start the UCX endpoint (idempotent; clients start it on first use)."""
        async with self._start_lock:
            if self._transport is not None:
                return
            from .ucx_transport import UcxTransport  # imports ucxx: only when needed

            transport = UcxTransport(self.store.get, host=self.config.host, on_release=self.store.release)
            await transport.start()
            self._transport = transport
            self._sweeper = asyncio.create_task(self._sweep())
            log.info("data plane listening at %s", transport.address)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._background):
            task.cancel()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.stop()
            self._transport = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            freed = self.store.expire()
            if freed:
                log.debug("freed %d tensors whose lease ended", freed)

    def should_publish(self, array: Any) -> bool:
        """Device arrays always, host arrays above the inline threshold."""
        return is_device_array(array) or array.nbytes > self.threshold

    async def publish(self, name: str, array: Any, lease_s: float) -> RemoteTensor:
        """Keep ``array`` here for peers to fetch and describe it for a message."""
        await self.start()
        lease = lease_s + LEASE_GRACE_S
        if is_device_array(array):
            import cupy  # only reached with a CuPy array in hand

            contiguous = cupy.ascontiguousarray(array)
            flat = contiguous.reshape(-1).view(cupy.uint8)
            tensor_id = self.store.put(flat, contiguous.nbytes, lease)
            self.published_memory["gpu"] += 1
            if self.metrics is not None:
                self.metrics.published("gpu", contiguous.nbytes)
            return RemoteTensor(
                name=name, dtype=contiguous.dtype.str, shape=contiguous.shape,
                nbytes=contiguous.nbytes, address=self.address, tensor_id=tensor_id,
                memory_type="gpu", device_id=contiguous.device.id,
            )  # fmt: skip
        dtype, data = tensor_bytes(name, np.asarray(array))
        tensor_id = self.store.put(data, len(data), lease)
        self.published_memory["cpu"] += 1
        if self.metrics is not None:
            self.metrics.published("cpu", len(data))
        return RemoteTensor(
            name=name, dtype=dtype, shape=np.shape(array), nbytes=len(data),
            address=self.address, tensor_id=tensor_id,
        )  # fmt: skip

    async def fetch(
        self,
        desc: RemoteTensor,
        memory_type: str = "cpu",
        deadline: float | None = None,
        request_deadline: float | None = None,
    ) -> Any:
        """The tensor ``desc`` describes: NumPy, or CuPy when ``memory_type`` is ``'gpu'``.

        Gives up at ``deadline`` (a ``time.monotonic()`` value) or after ``fetch_timeout_s``,
        whichever comes first. ``request_deadline``: that of the request the tensor was sent
        for; its producer frees it ``LEASE_GRACE_S`` later, so the fetch gives up then too.
        """
        if request_deadline is not None:
            lease_end = request_deadline + LEASE_GRACE_S
            deadline = lease_end if deadline is None else min(deadline, lease_end)
        await self.start()
        want_gpu = memory_type == "gpu" and _is_fixed_width(desc.dtype)
        move = f"{desc.memory_type}->{'gpu' if want_gpu else 'cpu'}"
        if desc.address == self.address:  # our own tensor came back: no transfer
            flat = self.store.get(desc.tensor_id)
            if flat is None:
                raise DataPlaneError(f"tensor {desc.name!r} ({desc.tensor_id}) was already freed here")
            self.fetched_memory[move] += 1
            return _as_array(desc, flat, want_gpu)
        timeout_s = self.config.fetch_timeout_s
        started = time.monotonic()
        if deadline is not None:
            timeout_s = max(min(timeout_s, deadline - time.monotonic()), 0.001)
        try:
            if want_gpu:
                import cupy

                out: Any = cupy.empty(desc.nbytes, dtype=cupy.uint8)
                await self._transport.fetch(desc.address, desc.tensor_id, out, timeout_s)
            else:
                # The receive buffer is taken once it is this fetch's turn: buffers of fetches
                # still waiting would only be fresh memory that the pool cannot hand out again.
                gives_up_at = time.monotonic() + timeout_s
                async with self.gate.turn(desc.nbytes, gives_up_at, repr(desc.name)):
                    out = self.buffers.take(desc.nbytes)
                    await self._transport.fetch(
                        desc.address, desc.tensor_id, out, max(gives_up_at - time.monotonic(), 0.001)
                    )
        except DataPlaneError as exc:
            if request_deadline is not None and time.monotonic() >= request_deadline:
                # Whatever the producer answered, the tensor's lease is over: say why.
                raise DataPlaneError(
                    f"fetch of tensor {desc.name!r} from {describe(desc.address)} gave up: its request's "
                    f"deadline passed and the producer's lease on it ended ({exc})"
                ) from None
            raise
        self.fetched_from[desc.address] += 1
        self.fetched_memory[move] += 1
        if self.metrics is not None:
            self.metrics.fetched("gpu" if want_gpu else "cpu", desc.nbytes, time.monotonic() - started)
        return _as_array(desc, out, want_gpu)

    def release(self, descriptors: list[RemoteTensor]) -> None:
        """Tell the producers these tensors are no longer needed (fire and forget)."""
        by_address: dict[str, list[str]] = {}
        for desc in descriptors:
            by_address.setdefault(desc.address, []).append(desc.tensor_id)
        for address, ids in by_address.items():
            if self._transport is not None and address == self.address:
                self.store.release(ids)
            elif self._transport is not None:
                task = asyncio.create_task(self._release_remote(address, ids))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _release_remote(self, address: str, ids: list[str]) -> None:
        try:
            await self._transport.release(address, ids)
        except Exception as exc:  # the producer may be gone; its leases free the tensors
            log.debug("release of %d tensors at %s failed: %s", len(ids), address, exc)

    def stats(self) -> dict[str, Any]:
        transport = dict(self._transport.stats) if self._transport is not None else {}
        return {
            "address": self._transport.address if self._transport else None,
            "stored_tensors": len(self.store),
            "stored_bytes": self.store.nbytes,
            "fetched_from": dict(self.fetched_from),
            "published_memory": dict(self.published_memory),
            "fetched_memory": dict(self.fetched_memory),
            **transport,
        }


def _as_array(desc: RemoteTensor, flat: Any, want_gpu: bool) -> Any:
    """Give the flat bytes of a fetched or stored tensor its dtype and shape."""
    if want_gpu:
        import cupy

        device_bytes = cupy.asarray(flat if is_device_array(flat) else np.frombuffer(flat, np.uint8))
        return device_bytes.view(np.dtype(desc.dtype)).reshape(desc.shape)
    if is_device_array(flat):
        import cupy

        flat = cupy.asnumpy(flat)
    return array_from_bytes(desc.name, desc.dtype, desc.shape, memoryview(flat).cast("B"))


def _is_fixed_width(dtype: str) -> bool:
    return dtype not in ("bytes", "string")
