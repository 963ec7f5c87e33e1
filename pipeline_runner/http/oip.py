"""Open Inference Protocol v2 (KServe / Triton HTTP/REST) request and response bodies.

An inference request is JSON, optionally followed by raw tensor bytes (the binary tensor
extension): the header ``Inference-Header-Content-Length`` then says how many leading bytes are
JSON, and each input with ``parameters.binary_data_size`` takes that many bytes of the rest, in
order. A response carries an output in binary when the request asked for it (the output's
``parameters.binary_data``, or ``parameters.binary_data_output`` for all outputs). BYTES elements
in binary form are a little-endian u32 length followed by the bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import HttpError

HEADER_LENGTH = "inference-header-content-length"

_NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_DATATYPE_OF = {dtype: name for name, dtype in _NUMPY_OF.items()}


def datatype_of(array: np.ndarray) -> str:
    """The protocol's datatype name of ``array``'s dtype (object and bytes arrays are BYTES)."""
    if array.dtype.hasobject or array.dtype.kind in "SU":
        return "BYTES"
    name = _DATATYPE_OF.get(array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype)
    if name is None:
        raise HttpError("bad_output", f"output dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


@dataclass
class InferRequest:
    """A decoded inference request: input arrays, parameters, and how to send the outputs."""

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    #: Outputs asked for by name (None: all), each with whether it goes in binary.
    outputs: dict[str, bool] | None
    binary_outputs: bool = False
    timeout_s: float | None = field(default=None)


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an inference request body; any problem is a 400 naming what is wrong."""
    json_part, binary = body, b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HttpError(
                "bad_request",
                f"Inference-Header-Content-Length {header_length!r} must be a number of bytes up to the body's {len(body)}",
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError("bad_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HttpError("bad_json", "the request body must be a JSON object with 'inputs'")
    parameters = _mapping(doc.get("parameters", {}), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise HttpError("bad_tensor", "'inputs' must be a list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        name, array, used = _decode_input(raw, index, memoryview(binary)[offset:])
        if name in inputs:
            raise HttpError("bad_tensor", f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise HttpError("bad_tensor", f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise HttpError("bad_request", "'outputs' must be a list")
        outputs = {}
        for raw in doc["outputs"]:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise HttpError("bad_request", "each of 'outputs' must be an object with a 'name'")
            params = _mapping(raw.get("parameters", {}), f"outputs[{raw['name']!r}].parameters")
            outputs[raw["name"]] = bool(params.get("binary_data", False))
    request_id = doc.get("id")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        parameters={k: v for k, v in parameters.items() if k != "binary_data_output"},
        outputs=outputs,
        binary_outputs=bool(parameters.get("binary_data_output", False)),
    )


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HttpError("bad_request", f"{what!r} must be a JSON object")
    return value


def _decode_input(raw: Any, index: int, binary: memoryview) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise HttpError("bad_tensor", f"inputs[{index}] must be an object with a 'name'")
    name = raw["name"]
    datatype, shape = raw.get("datatype"), raw.get("shape")
    if datatype != "BYTES" and datatype not in _NUMPY_OF:
        raise HttpError("bad_tensor", f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HttpError("bad_tensor", f"input {name!r}: 'shape' must be a list of non-negative integers")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    params = _mapping(raw.get("parameters", {}), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise HttpError("bad_tensor", f"input {name!r}: binary_data_size {size!r} runs past the body's end")
        return name, _from_binary(name, datatype, shape, count, binary[:size]), size
    if "data" not in raw:
        raise HttpError("bad_tensor", f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return name, _from_json(name, datatype, shape, count, raw["data"]), 0


def _from_binary(name: str, datatype: str, shape: list[int], count: int, data: memoryview) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(data):
            if pos + 4 > len(data):
                raise HttpError("bad_tensor", f"input {name!r}: BYTES element {len(items)} is cut short")
            (length,) = struct.unpack_from("<I", data, pos)
            if pos + 4 + length > len(data):
                raise HttpError("bad_tensor", f"input {name!r}: BYTES element {len(items)} runs past its data")
            items.append(bytes(data[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        if len(items) != count:
            raise HttpError("bad_tensor", f"input {name!r}: {len(items)} BYTES elements for shape {shape}")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = _NUMPY_OF[datatype]
    if len(data) != count * dtype.itemsize:
        raise HttpError(
            "bad_tensor", f"input {name!r}: {len(data)} bytes do not hold {datatype} of shape {shape}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _from_json(name: str, datatype: str, shape: list[int], count: int, data: Any) -> np.ndarray:
    try:
        if datatype == "BYTES":
            flat = list(np.asarray(data, dtype=object).ravel()) if isinstance(data, list) else [data]
            if not all(isinstance(x, str) for x in flat):
                raise ValueError("BYTES elements must be strings")
            array = np.empty(len(flat), dtype=object)
            array[:] = [x.encode() for x in flat]
        else:
            array = np.asarray(data)
            wrong_kind = array.dtype.kind not in "biuf" or (datatype == "BOOL") != (array.dtype.kind == "b")
            if array.size and wrong_kind:
                raise ValueError(f"elements must be {'true/false' if datatype == 'BOOL' else 'numbers'}")
            array = array.astype(_NUMPY_OF[datatype], casting="unsafe").ravel()
    except (ValueError, TypeError) as exc:
        raise HttpError("bad_tensor", f"input {name!r}: 'data' does not hold {datatype}: {exc}") from None
    if array.size != count:
        raise HttpError("bad_tensor", f"input {name!r}: {array.size} elements do not fill shape {shape}")
    return array.reshape(shape)


def encode_response(
    model_name: str,
    model_version: int,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any],
) -> tuple[bytes, int | None]:
    """The response body and, when it has binary outputs, the length of its JSON part."""
    wanted = request.outputs
    if wanted is not None:
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise HttpError("bad_request", f"no output {missing[0]!r} (outputs: {', '.join(sorted(outputs))})")
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        array = np.asarray(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        binary = wanted[name] if wanted is not None else request.binary_outputs
        if binary:
            blob = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array)
        described.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version), "outputs": described}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = dict(parameters)
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype.hasobject or array.dtype.kind in "SU":
        parts = []
        for item in array.ravel():
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _to_json(array: np.ndarray) -> list[Any]:
    if array.dtype.hasobject or array.dtype.kind in "SU":
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    return array.ravel().tolist()
