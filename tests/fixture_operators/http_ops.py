"""Operators the HTTP front door tests call: JSON-parameter operators that stream, relay and fail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pipeline_runner import Operator, RemoteOperator, Request, Response


class Relay(Operator):
    """Passes each request on to the operator named by parameter ``next`` and re-streams its
    responses, adding its own name to ``hops``."""

    async def setup(self) -> None:
        self.next = RemoteOperator(self.parameters["next"])

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            # aclosing ends the call with this request rather than with the batch; the serving
            # loop would close it then (see test_downstream_cancel.py).
            async with contextlib.aclosing(self.next.call(parameters=request.parameters)) as responses:
                await self._relay(request, responses)

    async def _relay(self, request: Request, responses: AsyncIterator[Response]) -> None:
        async for response in responses:
            hops = [self.context.operator, *response.parameters.get("hops", [])]
            params = {**response.parameters, "hops": hops} if response.parameters else {}
            await request.respond(parameters=params, final=response.final)


class Ticker(Operator):
    """Streams ``{"index": i}`` ``count`` times, ``interval`` s apart, then a final empty response.

    When cancelled it writes the time it saw the cancel (``time.time()``) to the file named by
    parameter ``record``, so a test can tell how long the cancel took to come down the chain.
    """

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            record = request.parameters.get("record")
            try:
                for index in range(int(request.parameters.get("count", 3))):
                    await request.respond(parameters={"index": index}, final=False)
                    await asyncio.sleep(float(request.parameters.get("interval", 0.0)))
                if request.parameters.get("fail_at_end"):
                    raise ValueError("the ticker broke after streaming")
                await request.respond()
            except asyncio.CancelledError:
                if record:
                    Path(record).write_text(repr(time.time()))
                raise


class Answer(Operator):
    """Answers once with ``{"text": <the request's text, upper-cased>}`` after ``sleep`` seconds."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            await asyncio.sleep(float(request.parameters.get("sleep", 0)))
            await request.respond(parameters={"text": str(request.parameters.get("text", "")).upper()})
