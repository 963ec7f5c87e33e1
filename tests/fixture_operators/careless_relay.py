"""A relay written the plain way: ``async for`` over ``call()``, no ``aclosing``, slow to respond."""

from __future__ import annotations

import asyncio

from pipeline_runner import Operator, RemoteOperator, Request


class CarelessRelay(Operator):
    """Re-streams the responses of operator ``next``, spending ``pause`` seconds after each.

    A cancel almost always lands in that pause, outside the call's generator, which is left
    suspended at its ``yield`` and kept alive by ``responses`` (the cancel's traceback holds the
    frame): only the serving loop can end that downstream call before it is collected.
    """

    async def setup(self) -> None:
        self.next = RemoteOperator(self.parameters["next"])
        self.pause = float(self.parameters.get("pause", 0.5))

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            responses = self.next.call(parameters=request.parameters)
            async for response in responses:
                await request.respond(parameters=response.parameters, final=response.final)
                await asyncio.sleep(self.pause)
