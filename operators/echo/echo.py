"""Echo: answers every request with its own inputs. The smallest possible operator."""

from __future__ import annotations

from pipeline_runner import Operator, Request


class Echo(Operator):
    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            await request.respond(request.inputs)


class CopyEcho(Operator):
    """Reads every input into this process and answers with a copy: data moves both ways."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            outputs = {name: (await tensor.array()).copy() for name, tensor in request.inputs.items()}
            await request.respond(outputs)
