"""The wire format: every tensor kind round-trips; malformed messages fail with ProtocolError."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from pipeline_runner.errors import ProtocolError
from pipeline_runner.protocol import (
    RemoteTensor,
    RequestHeader,
    ResponseHeader,
    decode_request,
    decode_response,
    encode_message,
)
from pipeline_runner.tensor import Tensor, decode_tensors, encode_tensors

NUMERIC = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bool",
]  # fmt: skip
SHAPES = [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 1, 1, 3)]


async def _round_trip(tensors: dict[str, np.ndarray]) -> dict[str, Tensor]:
    encoded = await encode_tensors(tensors)
    header = RequestHeader(id="r1", reply_to="_INBOX.x.r1", timeout_s=1.0, tensors=encoded.descriptors)
    decoded_header, body = decode_request(encode_message(header, encoded.buffers))
    assert decoded_header.id == "r1" and decoded_header.reply_to == "_INBOX.x.r1"
    return decode_tensors(decoded_header.tensors, body)


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
async def test_numeric_and_bool_tensors_round_trip_exactly(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    out = await (await _round_trip({"t": array}))["t"].array()
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes()


async def test_big_endian_and_non_contiguous_arrays_keep_their_values() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(20, dtype=np.float32)[::3]
    transposed = np.arange(12, dtype=np.int16).reshape(3, 4).T
    decoded = await _round_trip({"be": big_endian, "strided": strided, "t": transposed})
    for name, original in (("be", big_endian), ("strided", strided), ("t", transposed)):
        out = await decoded[name].array()
        np.testing.assert_array_equal(out, original)
        assert out.dtype == original.dtype


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 2)], ids=str)
async def test_bytes_and_strings_round_trip_including_empty_and_unicode(shape: tuple[int, ...]) -> None:
    count = int(np.prod(shape))
    raw = np.array([b"", b"\x00\xff", b"abc", b"longer value"][:count] * 2, dtype=object)[:count]
    text = np.array(["", "héllo", "日本", "x"][:count] * 2, dtype=object)[:count]
    decoded = await _round_trip({"raw": raw.reshape(shape), "text": text.reshape(shape)})
    out_raw, out_text = await decoded["raw"].array(), await decoded["text"].array()
    assert out_raw.shape == shape and out_text.shape == shape
    assert out_raw.reshape(-1).tolist() == raw.tolist()
    assert out_text.reshape(-1).tolist() == text.tolist()


async def test_dates_and_durations_round_trip_though_numpy_cannot_export_them_as_buffers() -> None:
    dates = np.array(["2026-12-03T14:00", "1970-01-01T00:00"], dtype="datetime64[s]")
    durations = np.arange(4, dtype="timedelta64[ms]").reshape(2, 2)
    decoded = await _round_trip({"dates": dates, "durations": durations})
    for name, original in (("dates", dates), ("durations", durations)):
        out = await decoded[name].array()
        assert out.dtype == original.dtype and out.shape == original.shape
        np.testing.assert_array_equal(out, original)


async def test_fixed_width_numpy_strings_round_trip() -> None:
    array = np.array(["ab", "cde"], dtype="<U3")
    out = await (await _round_trip({"s": array}))["s"].array()
    assert out.dtype == array.dtype and out.tolist() == ["ab", "cde"]


async def test_object_arrays_of_other_python_objects_are_refused() -> None:
    with pytest.raises(ProtocolError, match="only bytes or only str"):
        await encode_tensors({"bad": np.array([1, "a"], dtype=object)})


async def test_remote_descriptors_are_forwarded_without_their_bytes() -> None:
    remote = RemoteTensor(
        name="x", dtype="<f4", shape=(1024, 1024), nbytes=4 << 20,
        address="ucx://10.0.0.1:1234", tensor_id="abc",
    )  # fmt: skip
    encoded = await encode_tensors({"forwarded": Tensor("x", remote=remote)})
    assert encoded.buffers == [] and encoded.published == []
    assert encoded.descriptors[0].kind == "remote" and encoded.descriptors[0].name == "forwarded"
    assert encoded.descriptors[0].tensor_id == "abc"
    assert encoded.forwarded == encoded.descriptors


async def test_a_remote_tensor_without_a_data_plane_fails_clearly() -> None:
    remote = RemoteTensor(name="x", dtype="<f4", shape=(2,), nbytes=8, address="a", tensor_id="t")
    with pytest.raises(ProtocolError, match="no data plane is configured"):
        await Tensor("x", remote=remote).array()


def test_response_headers_carry_final_flag_error_and_worker() -> None:
    header = ResponseHeader(id="r", final=False, worker="enc.0", parameters={"k": [1, 2]})
    decoded, body = decode_response(encode_message(header, []))
    assert decoded == header and len(body) == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"GARBAGE!", "not a pipeline_runner message"),
        (b"PRN1\xff\x00\x00\x00{}", "runs past the end"),
        (b"PRN1\x02\x00\x00\x00{}", "invalid request header"),
        (b"PRN1\x04\x00\x00\x00null", "invalid request header"),
        (b'PRN1\x0b\x00\x00\x00{"id": 1}xx', "invalid request header"),
    ],
)
def test_malformed_requests_raise_protocol_errors(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_request(payload)


def _unchecked(descriptor: object, **changes: object) -> dict[str, object]:
    """A descriptor as a lying sender would write it: the fields changed, nothing checked."""
    return {**msgspec.to_builtins(descriptor), **changes}


async def test_a_tensor_whose_bytes_do_not_match_its_shape_is_rejected() -> None:
    encoded = await encode_tensors({"t": np.arange(4, dtype=np.int32)})
    descriptors, buffers = encoded.descriptors, encoded.buffers
    lying = _unchecked(descriptors[0], shape=(5,))
    header = RequestHeader(id="r", reply_to="x", timeout_s=1, tensors=[lying])
    # Refused with the header, before any tensor is looked at: nbytes decides allocations.
    with pytest.raises(ProtocolError, match=r"nbytes 16 does not match dtype <i4 and shape \[5\] \(20 bytes\)"):
        decode_request(encode_message(header, buffers))


async def test_a_pickled_dtype_is_never_accepted() -> None:
    encoded = await encode_tensors({"t": np.arange(2, dtype=np.int64)})
    descriptors, buffers = encoded.descriptors, encoded.buffers
    pickled = _unchecked(descriptors[0], dtype="|O")
    header = RequestHeader(id="r", reply_to="x", timeout_s=1, tensors=[pickled])
    with pytest.raises(ProtocolError, match="not allowed on the wire"):
        decode_request(encode_message(header, buffers))
