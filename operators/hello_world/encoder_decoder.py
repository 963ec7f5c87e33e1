"""hello_world pipeline: call the encoder, then the decoder; the result equals the input."""

from __future__ import annotations

import asyncio

from pipeline_runner import Operator, RemoteOperator, Request


class EncoderDecoder(Operator):
    async def setup(self) -> None:
        self.encoder = RemoteOperator(self.parameters.get("encoder", "encoder"))
        self.decoder = RemoteOperator(self.parameters.get("decoder", "decoder"))

    async def execute(self, requests: list[Request]) -> None:
        if len(requests) == 1:  # the usual batch: run it here rather than in a task of its own
            await self._run(requests[0])
        else:
            await asyncio.gather(*(self._run(request) for request in requests))

    async def _run(self, request: Request) -> None:
        await encode_then_decode(request, self.encoder, self.decoder, self.parameters.get("input_copies", 3))


async def encode_then_decode(
    request: Request, encoder: RemoteOperator, decoder: RemoteOperator, default_copies: int
) -> None:
    """Answer ``request`` with decoder(encoder(input)): the pipeline's one step, in either style."""
    # Both stages must agree on the number of copies, so the pipeline decides it once.
    copies = request.parameters.get("input_copies", default_copies)
    params = {**request.parameters, "input_copies": copies}
    encoded = await encoder.infer(request.inputs, parameters=params)
    decoded = await decoder.infer({"input": encoded.outputs["output"]}, parameters=params)
    await request.respond({"output": decoded.outputs["output"]})
