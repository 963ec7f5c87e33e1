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


async def test_200_fuzzed_messages_each_get_an_error_and_the_worker_keeps_serving(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo"))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        nc = conn.plane.nats
        inbox = nc.new_inbox()
        replies: asyncio.Queue = asyncio.Queue()
        sub = await nc.subscribe(inbox, cb=replies.put)
        messages = await _fuzz_messages(random.Random(7), inbox)
        assert len(messages) == 200
        subject = operator_subject("test", "echo", 1)
        for payload in messages:
            await nc.publish(subject, payload, reply=inbox)
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
