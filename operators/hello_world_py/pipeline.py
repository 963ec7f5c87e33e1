"""encoder -> decoder behind an encoder_decoder pipeline, as deployments/hello_world_python.yaml
runs it, but declared in code: the same transforms (operators/hello_world/math.py) and the same
worker counts and parameters, and the callees named by class instead of by string.
"""

from __future__ import annotations

import asyncio

from pipeline_runner import Operator, Request, depends, operator_defaults

from ..hello_world.encoder import copies_and_delay
from ..hello_world.encoder_decoder import encode_then_decode
from ..hello_world.math import decode, encode


@operator_defaults(workers=2, max_inflight_requests=32, parameters={"input_copies": 3, "delay": 0.0})
class Encoder(Operator):
    """Tile the input ``input_copies`` times and invert it."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            copies, delay = copies_and_delay(self, request)
            if delay:
                await asyncio.sleep(delay)  # simulated compute
            await request.respond({"output": encode(await request.array("input", "cpu"), copies)})


@operator_defaults(workers=2, max_inflight_requests=32)
class Decoder(Operator):
    """Invert back and keep one copy."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            copies, delay = copies_and_delay(self, request)
            if delay:
                await asyncio.sleep(delay)
            await request.respond({"output": decode(await request.array("input", "cpu"), copies)})


@operator_defaults(
    workers=2,
    max_inflight_requests=64,
    parameters={"input_copies": 3},
    # Open Inference Protocol metadata of the HTTP front door (GET /v2/models/encoder_decoder)
    inputs=[{"name": "input", "datatype": "INT32", "shape": [-1]}],
    outputs=[{"name": "output", "datatype": "INT32", "shape": [-1]}],
)
class EncoderDecoder(Operator):
    """Call the encoder, then the decoder; the result equals the input."""

    encoder = depends(Encoder)
    decoder = depends(Decoder)

    async def execute(self, requests: list[Request]) -> None:
        await asyncio.gather(*(self._run(request) for request in requests))

    async def _run(self, request: Request) -> None:
        await encode_then_decode(request, self.encoder, self.decoder, self.parameters.get("input_copies", 3))
