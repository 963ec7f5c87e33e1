"""Wire format of the request plane: a JSON header followed by raw tensor bytes.

A message is ``MAGIC | u32 header length | header JSON | tensor bytes``. The header describes
every tensor either as *inline* (its bytes follow the header) or as a *remote* reference to be
fetched from a data plane. Nothing is ever pickled: dtypes travel as NumPy dtype strings and
variable-length bytes/strings use a length-prefixed layout.
"""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import msgspec
import numpy as np

from .errors import ProtocolError

MAGIC = b"PRN1"
_PREFIX = struct.Struct("<4sI")
# Variable-length elements (numpy object arrays of bytes or str) travel as u32 length + bytes.
BYTES_DTYPE = "bytes"
STRING_DTYPE = "string"
_LEN = struct.Struct("<I")

JSONValue = Any
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class InvalidTensorError(ProtocolError, ValueError):
    """A tensor descriptor contradicts itself (nbytes against dtype and shape, a negative size)."""


# The headers are msgspec Structs rather than pydantic models: they are built, encoded and
# decoded four times per call, and msgspec does it in a fifth of pydantic's CPU (RESULTS.md, "Hop").
# Decoding validates types and the Meta constraints; __post_init__ (run when a header is built
# and when one is decoded) checks what a type cannot say.
class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class _TensorFields(_Wire, frozen=True):
    name: str
    dtype: str
    shape: tuple[_NonNegative, ...]
    nbytes: _NonNegative

    def __post_init__(self) -> None:
        # nbytes decides what a receiver allocates before any byte arrives: it must be what the
        # dtype and shape take (variable-length elements: at least their length prefixes).
        shape = self.shape
        if type(shape) is not tuple:
            shape = tuple(shape)
            msgspec.structs.force_setattr(self, "shape", shape)
        count = 1
        for dim in shape:
            if dim < 0:
                raise InvalidTensorError(f"tensor {self.name!r}: negative dimension in shape {list(shape)}")
            count *= dim
        dtype, nbytes = self.dtype, self.nbytes
        if dtype == BYTES_DTYPE or dtype == STRING_DTYPE:
            if nbytes < count * _LEN.size:
                raise InvalidTensorError(
                    f"tensor {self.name!r}: {nbytes} bytes cannot hold {count} {dtype} "
                    f"elements (each needs at least {_LEN.size})"
                )
            return
        itemsize = wire_dtype(self.name, dtype).itemsize
        if nbytes != count * itemsize:
            raise InvalidTensorError(
                f"tensor {self.name!r}: nbytes {nbytes} does not match dtype {dtype} and "
                f"shape {list(shape)} ({count * itemsize} bytes)"
            )


class InlineTensor(_TensorFields, frozen=True, tag_field="kind", tag="inline"):
    """A tensor whose bytes follow the header, at ``offset`` within the tensor section."""

    kind: ClassVar[Literal["inline"]] = "inline"
    offset: _NonNegative


class RemoteTensor(_TensorFields, frozen=True, tag_field="kind", tag="remote"):
    """A tensor left in the producing worker, to be fetched from its data plane."""

    kind: ClassVar[Literal["remote"]] = "remote"
    address: str
    tensor_id: str
    memory_type: Literal["cpu", "gpu"] = "cpu"
    device_id: int = 0


TensorDescriptor = Union[InlineTensor, RemoteTensor]


class ErrorInfo(_Wire, frozen=True):
    """Why a request failed. ``code`` is short and machine-readable; ``message`` is for people."""

    code: str
    message: str


class RequestHeader(_Wire, frozen=True):
    """Everything about a request except the tensor bytes.

    ``timeout_s``: time left for the request when it was sent; ``trace_context``: W3C trace
    context (traceparent, tracestate) of the caller's span, when tracing is on; ``sent_at``:
    the caller's ``time.time()`` at sending, when tracing is on (start of the queue-wait span).
    """

    id: str
    reply_to: str
    timeout_s: Annotated[float, msgspec.Meta(gt=0)]
    parameters: dict[str, JSONValue] = msgspec.field(default_factory=dict)
    tensors: list[TensorDescriptor] = msgspec.field(default_factory=list)
    trace_context: dict[str, str] | None = None
    sent_at: float | None = None


class ResponseHeader(_Wire, frozen=True):
    """One response to a request; the last one of a request has ``final`` set.

    ``worker``: which worker answered (for tracing); ``attempt``: the delivery attempt that
    produced it (>1 after a worker died).
    """

    id: str
    final: bool = True
    error: ErrorInfo | None = None
    parameters: dict[str, JSONValue] = msgspec.field(default_factory=dict)
    tensors: list[TensorDescriptor] = msgspec.field(default_factory=list)
    worker: str | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


_ENCODER = msgspec.json.Encoder()
_REQUEST_DECODER = msgspec.json.Decoder(RequestHeader)
_RESPONSE_DECODER = msgspec.json.Decoder(ResponseHeader)


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
    if array.flags.c_contiguous and array.size:  # the usual case: no copy, no reshape
        try:
            return _dtype_str(array.dtype), memoryview(array).cast("B")
        except ValueError:  # a dtype the buffer protocol cannot export (datetime64, ...)
            pass
    contiguous = np.ascontiguousarray(array)
    return contiguous.dtype.str, memoryview(contiguous.reshape(-1).view(np.uint8))


def _dtype_str(dtype: np.dtype) -> str:
    # ``dtype.str`` builds a new string on every access.
    text = _DTYPE_STRS.get(dtype)
    if text is None:
        text = dtype.str
        if len(_DTYPE_STRS) < 256:
            _DTYPE_STRS[dtype] = text
    return text


_DTYPE_STRS: dict[np.dtype, str] = {}


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
    array = np.frombuffer(data, dtype=np_dtype, count=count)
    return array if len(shape) == 1 else array.reshape(shape)



def wire_dtype(name: str, dtype: str) -> np.dtype:
    """The NumPy dtype a fixed-width tensor's dtype string names; ProtocolError if none may travel."""
    np_dtype = _WIRE_DTYPES.get(dtype)  # every descriptor asks: the allowed ones are remembered
    if np_dtype is not None:
        return np_dtype
    np_dtype = _parsed_dtype(dtype)
    if np_dtype is None:
        raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype[:40]!r}")
    if np_dtype.hasobject or np_dtype.kind == "V":
        raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not allowed on the wire")
    if len(_WIRE_DTYPES) < 256:
        _WIRE_DTYPES[dtype] = np_dtype
    return np_dtype


# The fixed-width dtypes wire_dtype allowed, by their wire string.
_WIRE_DTYPES: dict[str, np.dtype] = {}


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
    try:
        header_json = _ENCODER.encode(header)
    except (TypeError, ValueError) as exc:  # parameters holding what JSON cannot carry
        raise ProtocolError(f"cannot encode the message header: {exc}") from None
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


def _decode(payload: bytes, decoder: msgspec.json.Decoder[_H], what: str) -> tuple[_H, memoryview]:
    header_bytes, body = _split(payload)
    try:
        return decoder.decode(header_bytes), body
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {what} header: {_located(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"invalid {what} header: not JSON ({exc})") from None


def decode_request(payload: bytes) -> tuple[RequestHeader, memoryview]:
    """Header and tensor section of a request message; raises ProtocolError when malformed."""
    return _decode(payload, _REQUEST_DECODER, "request")


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
    return _decode(payload, _RESPONSE_DECODER, "response")


def inline_array(descriptor: InlineTensor, body: memoryview) -> np.ndarray:
    """The array an inline descriptor points at inside a message's tensor section."""
    end = descriptor.offset + descriptor.nbytes
    if end > len(body):
        raise ProtocolError(f"tensor {descriptor.name!r}: bytes run past the end of the message")
    data = body[descriptor.offset : end]
    return array_from_bytes(descriptor.name, descriptor.dtype, descriptor.shape, data)


def _located(exc: msgspec.ValidationError) -> str:
    """msgspec's "what - at `$.path`" as "path: what" (the field first, like the config errors)."""
    text = str(exc)
    what, sep, where = text.rpartition(" - at `")
    if not sep:
        return text
    path = where.rstrip("`").removeprefix("$").lstrip(".") or "header"
    return f"{path}: {what}"
