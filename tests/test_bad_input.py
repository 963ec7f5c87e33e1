"""Malformed messages on an operator's subject: an error reply each, and the worker keeps serving."""

from __future__ import annotations

import asyncio
import json
import random
import struct

import numpy as np

from pipeline_runner.protocol import MAGIC, RequestHeader, decode_response, encode_message
from pipeline_runner.request_plane import operator_subject
from pipeline_runner.tensor import encode_tensors
from pipeline_runner.work_queue import stream_name

from .conftest import connected, make_config, op, running


def _framed(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<4sI", MAGIC, len(body)) + body


async def _fuzz_messages(rng: random.Random, reply_to: str) -> list[bytes]:
    encoded = await encode_tensors({"x": np.arange(64, dtype=np.int32)})
    valid = encode_message(
        RequestHeader(id="r", reply_to=reply_to, timeout_s=5, tensors=encoded.descriptors), encoded.buffers
    )
    good = {"id": "r", "reply_to": reply_to, "timeout_s": 5.0, "parameters": {}, "tensors": []}
    tensor = {"kind": "inline", "name": "x", "dtype": "<i4", "shape": [4], "offset": 0, "nbytes": 16}
    wrong_types = [
        {**good, "timeout_s": "soon"},
        {**good, "timeout_s": -1},
        {**good, "id": 42},
        {**good, "parameters": [1, 2]},
        {**good, "tensors": {"x": 1}},
        {**good, "tensors": [{**tensor, "kind": "pickle"}]},
        {**good, "tensors": [{**tensor, "dtype": "|O"}]},
        {**good, "tensors": [{**tensor, "dtype": "not-a-dtype"}]},
        {**good, "tensors": [{**tensor, "shape": [-4]}]},
        {**good, "tensors": [{**tensor, "shape": [1 << 40, 1 << 40]}]},
        {**good, "tensors": [{**tensor, "offset": 1 << 30}]},
        {**good, "tensors": [tensor, tensor]},
        {**good, "unexpected": True},
    ]
    messages = [rng.randbytes(rng.randint(0, 300)) for _ in range(70)]
    messages += [valid[: rng.randint(0, len(valid) - 1)] for _ in range(65)]
    messages += [_framed(wrong_types[i % len(wrong_types)]) for i in range(65)]
    return messages


def _names_reply_address(payload: bytes) -> bool:
    """Whether a malformed message still carries a readable reply_to in a framed JSON header."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        return False
    (length,) = struct.unpack_from("<I", payload, 4)
    try:
        header = json.loads(payload[8 : 8 + length])
    except ValueError:
        return False
    return isinstance(header, dict) and isinstance(header.get("reply_to"), str)


async def _send_fuzz(nc):  # type: ignore[no-untyped-def]
    """Publish the 200 fuzzed messages on echo's subject; what comes back lands in ``replies``."""
    inbox = nc.new_inbox()
    replies: asyncio.Queue = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=replies.put)
    messages = await _fuzz_messages(random.Random(7), inbox)
    assert len(messages) == 200
    for payload in messages:
        await nc.publish(operator_subject("test", "echo", 1), payload, reply=inbox)
    return messages, replies, sub


async def test_200_fuzzed_messages_on_a_plain_subject_each_get_an_error_and_the_worker_keeps_serving(
    nats_url: str,
) -> None:
    config = make_config(op("echo", "echo:Echo", delivery={"mode": "at_most_once"}))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        nc = conn.plane.nats
        messages, replies, sub = await _send_fuzz(nc)
        codes = []
        for _ in messages:
            msg = await asyncio.wait_for(replies.get(), timeout=10)
            header, _ = decode_response(msg.data)
            assert header.final and header.error is not None, header
            codes.append(header.error.code)
        await sub.unsubscribe()
        assert set(codes) == {"bad_request"}
        # Still serving, and never restarted.
        response = await conn.operator("echo").infer({"x": np.array([1, 2, 3])})
        assert list(await response.array("x")) == [1, 2, 3]
        assert deployment.workers[0].restarts == 0


async def test_200_fuzzed_messages_in_a_work_queue_are_answered_where_they_name_a_reply_address(
    nats_url: str,
) -> None:
    # JetStream answers the NATS reply address with its PubAck, so a worker can only answer
    # a malformed request at the reply_to its header names.
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        nc = conn.plane.nats
        messages, replies, sub = await _send_fuzz(nc)
        answerable = sum(_names_reply_address(m) for m in messages)
        assert 65 <= answerable < 200
        stored, codes = 0, []
        while stored < 200 or len(codes) < answerable:
            msg = await asyncio.wait_for(replies.get(), timeout=10)
            if msg.data.startswith(b"{"):
                assert "error" not in json.loads(msg.data)
                stored += 1
                continue
            header, _ = decode_response(msg.data)
            assert header.final and header.error is not None, header
            codes.append(header.error.code)
        await asyncio.sleep(0.3)
        assert replies.empty(), "a malformed request was answered twice"
        await sub.unsubscribe()
        assert set(codes) == {"bad_request"}
        # Nothing malformed is left behind in the queue to be delivered again.
        info = await nc.jsm().stream_info(stream_name("test", "echo", 1))
        assert info.state.messages == 0
        response = await conn.operator("echo").infer({"x": np.array([1, 2, 3])})
        assert list(await response.array("x")) == [1, 2, 3]
        assert deployment.workers[0].restarts == 0
