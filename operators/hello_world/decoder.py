"""hello_world decoder: invert back and keep one copy, on the worker's device (see encoder)."""

from __future__ import annotations

import asyncio

from pipeline_runner import Operator, Request

from .encoder import copies_and_delay
from pipeline_runner.kernels.hello_world import decode


class Decoder(Operator):
    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            copies, delay = copies_and_delay(self, request)
            if delay:
                await asyncio.sleep(delay)
            output = decode(await request.array("input"), copies)
            await request.respond({"output": output})
