"""Wire format of the request plane: a pydantic header followed by raw tensor bytes.

A message is ``MAGIC | u32 header length | header JSON | tensor bytes``. The header describes
every tensor either as *inline* (its bytes follow the header) or as a *remote* reference to be
fetched from a data plane. Nothing is ever pickled: dtypes travel as NumPy dtype strings and
variable-length bytes/strings use a length-prefixed layout.
"""

from __future__ import annotations

import json
import math
import struct
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeVar, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ProtocolError

MAGIC = b"PRN1"
_PREFIX = struct.Struct("<4sI")
# Variable-length elements (numpy object arrays of bytes or str) travel as u32 length + bytes.
BYTES_DTYPE = "bytes"
STRING_DTYPE = "string"
_LEN = struct.Struct("<I")

JSONValue = Any


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TensorFields(_Wire):
    name: str
    dtype: str
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    nbytes: int = Field(ge=0)

    @model_validator(mode="after")
    def _nbytes_match_dtype_and_shape(self) -> _TensorFields:
        # nbytes decides what a receiver allocates before any byte arrives: it must be what the
        # dtype and shape take (variable-length elements: at least their length prefixes).
        count = math.prod(self.shape)
        if self.dtype in (BYTES_DTYPE, STRING_DTYPE):
            if self.nbytes < count * _LEN.size:
                raise ValueError(
                    f"tensor {self.name!r}: {self.nbytes} bytes cannot hold {count} {self.dtype} "
                    f"elements (each needs at least {_LEN.size})"
                )
            return self
        expected = count * wire_dtype(self.name, self.dtype).itemsize
        if self.nbytes != expected:
            raise ValueError(
                f"tensor {self.name!r}: nbytes {self.nbytes} does not match dtype {self.dtype} and "
                f"shape {list(self.shape)} ({expected} bytes)"
            )
        return self


class InlineTensor(_TensorFields):
    """A tensor whose bytes follow the header, at ``offset`` within the tensor section."""

    kind: Literal["inline"] = "inline"
    offset: int = Field(ge=0)


class RemoteTensor(_TensorFields):
    """A tensor left in the producing worker, to be fetched from its data plane."""

    kind: Literal["remote"] = "remote"
    address: str
    tensor_id: str
    memory_type: Literal["cpu", "gpu"] = "cpu"
    device_id: int = 0


TensorDescriptor = Annotated[Union[InlineTensor, RemoteTensor], Field(discriminator="kind")]


class ErrorInfo(_Wire):
    """Why a request failed. ``code`` is short and machine-readable; ``message`` is for people."""

    code: str
    message: str


class RequestHeader(_Wire):
    """Everything about a request except the tensor bytes."""

    id: str
    reply_to: str
    timeout_s: float = Field(gt=0, description="Time left for the request when it was sent.")
    parameters: dict[str, JSONValue] = Field(default_factory=dict)
    tensors: list[TensorDescriptor] = Field(default_factory=list)
    trace_context: dict[str, str] | None = Field(
        None, description="W3C trace context (traceparent, tracestate) of the caller's span, when tracing is on."
    )
    sent_at: float | None = Field(
        None, description="Caller's wall-clock time.time() at sending, when tracing is on (start of the queue-wait span)."
    )


class ResponseHeader(_Wire):
    """One response to a request; the last one of a request has ``final`` set."""

    id: str
    final: bool = True
    error: ErrorInfo | None = None
    parameters: dict[str, JSONValue] = Field(default_factory=dict)
    tensors: list[TensorDescriptor] = Field(default_factory=list)
    worker: str | None = Field(None, description="Which worker answered (for tracing).")
    attempt: int = Field(1, ge=1, description="Delivery attempt that produced it (>1 after a worker died).")


# --- tensors -----------------------------------------------------------------------------


def _element_kind(array: np.ndarray) -> str | None:
    """For object arrays, which variable-length kind they hold (bytes or str)."""
    flat = array.reshape(-1)
    if all(isinstance(x, bytes) for x in flat):
        return BYTES_DTYPE
    if all(isinstance(x, str) for x in flat):
        return STRING_DTYPE
    return None


def tensor_bytes(name: str, array: np.ndarray) -> tuple[str, memoryview]:
    """The dtype string and raw bytes of ``array`` as they go on the wire."""
    if array.dtype.hasobject:
        kind = _element_kind(array)
        if kind is None:
            raise ProtocolError(
                f"tensor {name!r}: object arrays must hold only bytes or only str, "
                "other Python objects cannot be sent"
            )
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item if kind == BYTES_DTYPE else item.encode("utf-8")
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return kind, memoryview(b"".join(parts))
    if array.dtype.kind == "V":
        raise ProtocolError(f"tensor {name!r}: structured/void dtype {array.dtype} is not supported")
    contiguous = np.ascontiguousarray(array)
    return contiguous.dtype.str, memoryview(contiguous.reshape(-1).view(np.uint8))


def array_from_bytes(name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> np.ndarray:
    """Rebuild an array from wire bytes; fixed-width dtypes are zero-copy (and read-only)."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise ProtocolError(f"tensor {name!r}: negative dimension in shape {shape}")
        count *= dim
    if dtype in (BYTES_DTYPE, STRING_DTYPE):
        return _variable_length_array(name, dtype, shape, count, data)
    np_dtype = wire_dtype(name, dtype)
    if count * np_dtype.itemsize != len(data):
        raise ProtocolError(
            f"tensor {name!r}: {len(data)} bytes do not match dtype {dtype} and shape {list(shape)}"
        )
    return np.frombuffer(data, dtype=np_dtype, count=count).reshape(shape)


def wire_dtype(name: str, dtype: str) -> np.dtype:
    """The NumPy dtype a fixed-width tensor's dtype string names; ProtocolError if none may travel."""
    np_dtype = _parsed_dtype(dtype)
    if np_dtype is None:
        raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype[:40]!r}")
    if np_dtype.hasobject or np_dtype.kind == "V":
        raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not allowed on the wire")
    return np_dtype


@lru_cache(maxsize=256)
def _parsed_dtype(dtype: str) -> np.dtype | None:
    try:
        return np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):
        return None


def _variable_length_array(
    name: str, dtype: str, shape: tuple[int, ...], count: int, data: memoryview
) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos = 0
    try:
        for i in range(count):
            (length,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + length > len(data):
                raise ProtocolError(f"tensor {name!r}: element {i} runs past the end of its bytes")
            item = bytes(data[pos : pos + length])
            out[i] = item if dtype == BYTES_DTYPE else item.decode("utf-8")
            pos += length
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"tensor {name!r}: malformed {dtype} elements: {exc}") from exc
    if pos != len(data):
        raise ProtocolError(f"tensor {name!r}: {len(data) - pos} trailing bytes after {count} elements")
    return out.reshape(shape)


# --- messages ----------------------------------------------------------------------------

_H = TypeVar("_H", RequestHeader, ResponseHeader)


def encode_inline_tensors(
    tensors: dict[str, np.ndarray],
) -> tuple[list[TensorDescriptor], list[memoryview]]:
    """Descriptors and byte buffers for sending ``tensors`` inline."""
    descriptors: list[TensorDescriptor] = []
    buffers: list[memoryview] = []
    offset = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype, data = tensor_bytes(name, array)
        descriptors.append(
            InlineTensor(name=name, dtype=dtype, shape=array.shape, offset=offset, nbytes=len(data))
        )
        buffers.append(data)
        offset += len(data)
    return descriptors, buffers


def encode_message(header: RequestHeader | ResponseHeader, buffers: list[memoryview]) -> bytes:
    """Frame a header and its inline tensor buffers into one message payload."""
    header_json = header.model_dump_json(exclude_defaults=False).encode()
    return b"".join([_PREFIX.pack(MAGIC, len(header_json)), header_json, *buffers])


def _split(payload: bytes) -> tuple[memoryview, memoryview]:
    view = memoryview(payload)
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"message too short ({len(view)} bytes) to hold a header")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"not a pipeline_runner message (magic {bytes(magic)!r})")
    end = _PREFIX.size + header_len
    if end > len(view):
        raise ProtocolError(f"header length {header_len} runs past the end of the message")
    return view[_PREFIX.size : end], view[end:]


def _decode(payload: bytes, model: type[_H], what: str) -> tuple[_H, memoryview]:
    header_bytes, body = _split(payload)
    try:
        return model.model_validate_json(bytes(header_bytes)), body
    except ValidationError as exc:
        raise ProtocolError(f"invalid {what} header: {_first_error(exc)}") from None


def decode_request(payload: bytes) -> tuple[RequestHeader, memoryview]:
    """Header and tensor section of a request message; raises ProtocolError when malformed."""
    return _decode(payload, RequestHeader, "request")


def salvage_reply_to(payload: bytes) -> str | None:
    """The ``reply_to`` of a request too malformed to decode, when its header still names one."""
    try:
        header_bytes, _ = _split(payload)
        reply_to = json.loads(bytes(header_bytes)).get("reply_to")
    except (ProtocolError, ValueError, AttributeError):
        return None
    return reply_to if isinstance(reply_to, str) and reply_to else None


def decode_response(payload: bytes) -> tuple[ResponseHeader, memoryview]:
    """Header and tensor section of a response message; raises ProtocolError when malformed."""
    return _decode(payload, ResponseHeader, "response")


def inline_array(descriptor: InlineTensor, body: memoryview) -> np.ndarray:
    """The array an inline descriptor points at inside a message's tensor section."""
    end = descriptor.offset + descriptor.nbytes
    if end > len(body):
        raise ProtocolError(f"tensor {descriptor.name!r}: bytes run past the end of the message")
    data = body[descriptor.offset : end]
    return array_from_bytes(descriptor.name, descriptor.dtype, descriptor.shape, data)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "header"
    return f"{loc}: {err['msg']}"
