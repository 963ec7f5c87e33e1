"""The Open Inference Protocol v2 codec of the front door (JSON tensors and binary extension)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pipeline_runner.http.errors import HttpError, http_error
from pipeline_runner.http.oip import decode_request, encode_response
from pipeline_runner.errors import OperatorError, PayloadTooLargeError, RequestTimeoutError


def _binary(doc: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), str(len(head))


def test_json_tensors_decode_to_arrays_of_their_datatype_and_shape() -> None:
    body = json.dumps({
        "id": "r1",
        "parameters": {"k": 1, "binary_data_output": True},
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
            {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["hi", "wörld"]},
        ],
    }).encode()  # fmt: skip
    request = decode_request(body, None)
    assert request.id == "r1" and request.parameters == {"k": 1} and request.binary_outputs
    assert request.inputs["a"].dtype == np.float32 and request.inputs["a"].shape == (2, 2)
    assert request.inputs["b"].tolist() == [True, False]
    assert request.inputs["s"].tolist() == [b"hi", "wörld".encode()]


def test_binary_tensors_follow_the_json_part_in_input_order() -> None:
    x = np.arange(6, dtype=np.int16).reshape(2, 3)
    words = b"".join(struct.pack("<I", len(w)) + w for w in (b"ab", b""))
    doc = {"inputs": [
        {"name": "x", "datatype": "INT16", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "w", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(words)}},
    ]}  # fmt: skip
    request = decode_request(*_binary(doc, x.tobytes(), words))
    assert np.array_equal(request.inputs["x"], x)
    assert request.inputs["w"].tolist() == [b"ab", b""]


@pytest.mark.parametrize(
    "body, header, message",
    [
        (b"{", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": {}}', None, "must be a list"),
        (b'{"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}', None, "unknown datatype"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1]}]}', None, "do not fill"),
        (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": ["a"]}]}', None, "does not hold"),
        (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1]}]}', None, "neither 'data'"),
        (b'{"inputs": []}', "99", "Inference-Header-Content-Length"),
        (b'{"inputs": []}xx', "14", "not claimed"),
    ],
)
def test_malformed_requests_are_400s_that_say_what_is_wrong(body: bytes, header: str | None, message: str) -> None:
    with pytest.raises(HttpError) as caught:
        decode_request(body, header)
    assert caught.value.status == 400 and message in caught.value.message


def test_outputs_go_binary_when_asked_and_json_otherwise() -> None:
    request = decode_request(b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]}', None)
    y, z = np.array([1.5, 2.5], dtype=np.float64), np.array([b"q"], dtype=object)
    body, json_length = encode_response("m", 2, request, {"y": y, "z": z, "unasked": y}, {"p": 1})
    assert json_length is not None
    doc = json.loads(body[:json_length])
    assert doc["model_version"] == "2" and doc["parameters"] == {"p": 1}
    assert [o["name"] for o in doc["outputs"]] == ["y", "z"]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert np.array_equal(np.frombuffer(body[json_length:], dtype=np.float64), y)
    assert doc["outputs"][1] == {"name": "z", "datatype": "BYTES", "shape": [1], "data": ["q"]}


def test_errors_of_a_call_map_to_one_status_each() -> None:
    def status(exc: Exception) -> tuple[int, str]:
        error = http_error(exc)
        return error.status, error.code

    assert status(OperatorError("op", "bad_input", "x")) == (400, "bad_input")
    assert status(OperatorError("op", "overloaded", "x")) == (429, "overloaded")
    assert status(OperatorError("op", "worker_lost", "x")) == (503, "worker_lost")
    assert status(OperatorError("op", "operator_failed", "x")) == (500, "operator_failed")
    assert status(RequestTimeoutError("no final response arrived")) == (504, "timeout")
    assert status(RequestTimeoutError("timed out: no worker is serving this subject")) == (503, "no_worker")
    assert status(PayloadTooLargeError("tensor 'x' is too large")) == (413, "too_large")
    assert status(ValueError("boom")) == (500, "internal")
    assert http_error(OperatorError("op", "overloaded", "x")).headers() == [(b"retry-after", b"1")]
