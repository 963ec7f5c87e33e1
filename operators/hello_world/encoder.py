"""hello_world encoder: tile the input ``input_copies`` times and invert it.

On the worker's device: ``request.array`` gives a CuPy array on a GPU worker (``device: gpu``), and
the kernels' ``encode`` then runs a fused CuPy kernel whose result stays on the GPU for the decoder.
"""

from __future__ import annotations

import asyncio

from pipeline_runner import BadInputError, Operator, Request

from pipeline_runner.kernels.hello_world import encode


def copies_and_delay(operator: Operator, request: Request) -> tuple[int, float]:
    """``input_copies`` and ``delay`` (seconds): per-request values override the deployment's."""
    merged = {**operator.parameters, **request.parameters}
    copies, delay = merged.get("input_copies", 1), merged.get("delay", 0.0)
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        raise BadInputError(f"input_copies must be an integer >= 1, got {copies!r}")
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
        raise BadInputError(f"delay must be a number >= 0, got {delay!r}")
    return copies, float(delay)


class Encoder(Operator):
    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            copies, delay = copies_and_delay(self, request)
            if delay:
                await asyncio.sleep(delay)  # simulated compute
            output = encode(await request.array("input"), copies)
            await request.respond({"output": output})
