"""Tensor handles: what operator code receives and passes on.

A :class:`Tensor` is either local (an array in this process) or a descriptor of bytes another
process keeps on its data plane. Operator code calls ``await tensor.array()`` either way; passing
a handle on to another operator forwards its descriptor, so the next consumer fetches straight
from the producer.

Ownership of published tensors follows the requests (see :class:`TensorScope`): inputs a caller
publishes live until its call ends; tensors received in a response belong to the receiver, which
releases them when the request it is serving finishes, unless it handed them on in its own
response. Every published tensor also has a lease that ends with its request's deadline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import msgspec
import numpy as np

from . import tracing
from .context import current_context
from .errors import PayloadTooLargeError, ProtocolError, RequestTooLargeError
from .kernels.xp import to_device
from .protocol import (
    InlineTensor,
    RemoteTensor,
    TensorDescriptor,
    encode_inline_tensors,
    inline_array,
)

if TYPE_CHECKING:
    from .data_plane.plane import DataPlane


class Tensor:
    """A named n-dimensional array, fetched from its producer on first access."""

    __slots__ = ("name", "_array", "_remote", "_data_plane", "_request_deadline")

    def __init__(
        self,
        name: str,
        array: Any = None,
        remote: RemoteTensor | None = None,
        data_plane: DataPlane | None = None,
        request_deadline: float | None = None,
    ):
        if array is None and remote is None:
            raise ValueError("a Tensor needs an array or a remote descriptor")
        self.name = name
        self._array = array
        self._remote = remote
        self._data_plane = data_plane
        #: ``time.monotonic()`` deadline of the request whose response carried the tensor (its
        #: producer's lease on it ends shortly after).
        self._request_deadline = request_deadline

    @property
    def dtype(self) -> np.dtype | str:
        """NumPy dtype, or ``'bytes'``/``'string'`` for variable-length elements not yet fetched."""
        if self._array is not None:
            return self._array.dtype
        assert self._remote is not None
        return self._remote.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        if self._array is not None:
            return tuple(self._array.shape)
        assert self._remote is not None
        return self._remote.shape

    @property
    def is_local(self) -> bool:
        """True once the values are in this process."""
        return self._array is not None

    @property
    def descriptor(self) -> RemoteTensor | None:
        """The data-plane descriptor, for a tensor another process published."""
        return self._remote

    async def array(self, memory_type: str = "cpu") -> Any:
        """The values: NumPy (read-only when decoded from a message), or CuPy for ``'gpu'``.

        A fetch while a request is served gives up at its deadline (see ServingContext).
        """
        if self._array is None:
            assert self._remote is not None
            if self._data_plane is None:
                raise ProtocolError(
                    f"tensor {self.name!r} is held by the data plane at {self._remote.address}, "
                    "and no data plane is configured in this process"
                )
            deadline = current_context().deadline
            remote = self._remote
            request_deadline = self._request_deadline
            if tracing.active():
                from .tracing.spans import fetch_span

                with fetch_span(self.name, remote.nbytes, memory_type, remote.address):
                    self._array = await self._data_plane.fetch(
                        remote, memory_type, deadline=deadline, request_deadline=request_deadline
                    )
            else:
                self._array = await self._data_plane.fetch(
                    remote, memory_type, deadline=deadline, request_deadline=request_deadline
                )
        return _on(self._array, memory_type)

    def __repr__(self) -> str:
        where = "local" if self.is_local else "remote"
        return f"Tensor({self.name!r}, dtype={self.dtype}, shape={self.shape}, {where})"


TensorLike = Union[Tensor, np.ndarray, Any]


def _on(array: Any, memory_type: str) -> Any:
    """``array`` moved to ``memory_type`` if it is elsewhere (see :func:`~.kernels.xp.to_device`)."""
    want_gpu = memory_type == "gpu"
    if want_gpu != hasattr(array, "__cuda_array_interface__"):
        return to_device(array, "gpu" if want_gpu else "cpu")
    return array


def decode_tensors(
    descriptors: list[TensorDescriptor],
    body: memoryview,
    data_plane: DataPlane | None = None,
    request_deadline: float | None = None,
) -> dict[str, Tensor]:
    """Tensor handles for the descriptors of a received message (a response to a request with
    ``request_deadline``, whose remote tensors can be fetched until shortly after it)."""
    tensors: dict[str, Tensor] = {}
    for desc in descriptors:
        if desc.name in tensors:
            raise ProtocolError(f"tensor {desc.name!r} appears twice in one message")
        if isinstance(desc, InlineTensor):
            tensors[desc.name] = Tensor(desc.name, array=inline_array(desc, body))
        else:
            tensors[desc.name] = Tensor(
                desc.name, remote=desc, data_plane=data_plane, request_deadline=request_deadline
            )
    return tensors


@dataclass
class EncodedTensors:
    """Tensors ready for a message: inline bytes, plus what went to (or came from) a data plane."""

    descriptors: list[TensorDescriptor]
    buffers: list[memoryview]
    published: list[RemoteTensor] = field(default_factory=list)
    forwarded: list[RemoteTensor] = field(default_factory=list)

    @property
    def remote(self) -> list[RemoteTensor]:
        return self.published + self.forwarded


async def encode_tensors(
    tensors: Mapping[str, TensorLike], data_plane: DataPlane | None = None, lease_s: float = 30.0
) -> EncodedTensors:
    """Describe ``tensors`` for a message: small ones inline, large ones published, handles forwarded."""
    inline: dict[str, np.ndarray] = {}
    encoded = EncodedTensors([], [])
    for name, value in tensors.items():
        if isinstance(value, Tensor):
            if value.descriptor is not None:
                encoded.forwarded.append(msgspec.structs.replace(value.descriptor, name=name))
                continue
            value = value._array
        if data_plane is not None and data_plane.should_publish(value):
            encoded.published.append(await data_plane.publish(name, value, lease_s))
        elif hasattr(value, "__cuda_array_interface__"):
            raise ProtocolError(f"tensor {name!r} is on a GPU and this process has no data plane")
        else:
            inline[name] = value
    encoded.descriptors, encoded.buffers = encode_inline_tensors(inline)
    if encoded.published or encoded.forwarded:
        encoded.descriptors += encoded.remote
    return encoded


def check_payload(size: int, limit: int, descriptors: Iterable[TensorDescriptor], what: str) -> None:
    """Fail at once, naming the largest inline tensor, when a message exceeds ``limit`` bytes."""
    if size <= limit:
        return
    inline = [d for d in descriptors if isinstance(d, InlineTensor)]
    biggest = max(inline, key=lambda d: d.nbytes, default=None)
    culprit = f"; its largest inline tensor is {biggest.name!r} ({biggest.nbytes} bytes)" if biggest else ""
    raise PayloadTooLargeError(
        f"{what} of {size} bytes exceeds the NATS max payload of {limit} bytes{culprit}. "
        "Tensors above data_plane.inline_threshold_bytes travel over the data plane instead."
    )


def check_request_size(descriptors: Iterable[TensorDescriptor], limit: int) -> None:
    """Refuse a request whose tensors declare more than ``limit`` bytes, before any is fetched."""
    descriptors = list(descriptors)
    total = sum(d.nbytes for d in descriptors)
    if total <= limit:
        return
    biggest = max(descriptors, key=lambda d: d.nbytes)
    raise RequestTooLargeError(
        f"the request's tensors declare {total} bytes, more than the operator's max_request_bytes "
        f"of {limit}; its largest is {biggest.name!r} ({biggest.nbytes} bytes)"
    )


# --- ownership ---------------------------------------------------------------------------


class TensorScope:
    """Remote tensors received while serving one request (batch), released when it finishes."""

    def __init__(self) -> None:
        self._received: dict[tuple[str, str], RemoteTensor] = {}
        self._handed_on: set[tuple[str, str]] = set()

    def adopt(self, descriptors: Iterable[RemoteTensor]) -> None:
        """Tensors that arrived in a response: ours to release."""
        for desc in descriptors:
            self._received[(desc.address, desc.tensor_id)] = desc

    def hand_on(self, descriptors: Iterable[RemoteTensor]) -> None:
        """Tensors we sent on in our own response: the receiver releases them now."""
        self._handed_on.update((d.address, d.tensor_id) for d in descriptors)

    def to_release(self) -> list[RemoteTensor]:
        if not self._received:
            return []
        return [d for key, d in self._received.items() if key not in self._handed_on]

