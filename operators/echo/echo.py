"""Echo: answers every request with its own inputs. The smallest possible operator."""

from __future__ import annotations

from pipeline_runner import Operator, Request


class Echo(Operator):
    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            await request.respond(request.inputs)
