"""Tensor handles: what operator code receives and passes on.

A :class:`Tensor` is either local (an array in this process) or a descriptor of bytes held
elsewhere. Operator code calls ``await tensor.array()`` either way; passing a handle on to another
operator forwards its descriptor without fetching the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import numpy as np

from .errors import ProtocolError
from .protocol import (
    InlineTensor,
    RemoteTensor,
    TensorDescriptor,
    encode_inline_tensors,
    inline_array,
)


class Tensor:
    """A named n-dimensional array, possibly not yet fetched."""

    __slots__ = ("name", "_array", "_remote")

    def __init__(self, name: str, array: np.ndarray | None = None, remote: RemoteTensor | None = None):
        if (array is None) == (remote is None):
            raise ValueError("a Tensor holds either an array or a remote descriptor")
        self.name = name
        self._array = array
        self._remote = remote

    @property
    def dtype(self) -> np.dtype | str:
        """NumPy dtype, or ``'bytes'``/``'string'`` for variable-length elements of a remote tensor."""
        if self._array is not None:
            return self._array.dtype
        assert self._remote is not None
        return self._remote.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        if self._array is not None:
            return self._array.shape
        assert self._remote is not None
        return self._remote.shape

    @property
    def is_local(self) -> bool:
        return self._array is not None

    @property
    def descriptor(self) -> RemoteTensor | None:
        """The data-plane descriptor of a tensor that lives elsewhere."""
        return self._remote

    async def array(self) -> np.ndarray:
        """The tensor's values. Arrays decoded from a message are read-only views."""
        if self._array is None:
            assert self._remote is not None
            raise ProtocolError(
                f"tensor {self.name!r} is held by the data plane at {self._remote.address}, "
                "and no data plane is configured in this process"
            )
        return self._array

    def __repr__(self) -> str:
        where = "local" if self.is_local else "remote"
        return f"Tensor({self.name!r}, dtype={self.dtype}, shape={self.shape}, {where})"


TensorLike = Union[Tensor, np.ndarray]


def decode_tensors(descriptors: list[TensorDescriptor], body: memoryview) -> dict[str, Tensor]:
    """Tensor handles for the descriptors of a received message."""
    tensors: dict[str, Tensor] = {}
    for desc in descriptors:
        if desc.name in tensors:
            raise ProtocolError(f"tensor {desc.name!r} appears twice in one message")
        if isinstance(desc, InlineTensor):
            tensors[desc.name] = Tensor(desc.name, array=inline_array(desc, body))
        else:
            tensors[desc.name] = Tensor(desc.name, remote=desc)
    return tensors


def encode_tensors(tensors: Mapping[str, TensorLike]) -> tuple[list[TensorDescriptor], list[memoryview]]:
    """Descriptors and inline buffers for sending ``tensors``; remote handles are forwarded."""
    local: dict[str, np.ndarray] = {}
    forwarded: list[TensorDescriptor] = []
    for name, value in tensors.items():
        if isinstance(value, Tensor):
            if value.descriptor is not None:
                forwarded.append(value.descriptor.model_copy(update={"name": name}))
                continue
            assert value._array is not None
            value = value._array
        local[name] = value
    descriptors, buffers = encode_inline_tensors(local)
    return descriptors + forwarded, buffers
