"""hello_world pipeline: call the encoder, then the decoder; the result equals the input."""

from __future__ import annotations

import asyncio

from pipeline_runner import Operator, RemoteOperator, Request


class EncoderDecoder(Operator):
    async def setup(self) -> None:
        self.encoder = RemoteOperator(self.parameters.get("encoder", "encoder"))
        self.decoder = RemoteOperator(self.parameters.get("decoder", "decoder"))

    async def execute(self, requests: list[Request]) -> None:
        await asyncio.gather(*(self._run(request) for request in requests))

    async def _run(self, request: Request) -> None:
        # Both stages must agree on the number of copies, so the pipeline decides it once.
        copies = request.parameters.get("input_copies", self.parameters.get("input_copies", 3))
        params = {**request.parameters, "input_copies": copies}
        encoded = await self.encoder.infer(request.inputs, parameters=params)
        decoded = await self.decoder.infer({"input": encoded.outputs["output"]}, parameters=params)
        await request.respond({"output": decoded.outputs["output"]})
