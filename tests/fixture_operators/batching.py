"""Operators for the dynamic batching tests: they report the batches they were handed."""

from __future__ import annotations

import asyncio

from pipeline_runner import Operator, Request


class Batches(Operator):
    """Answers each request with the size of its batch and the ids in it.

    A request with parameter ``fail`` fails the whole batch (execute raises); ``sleep`` holds
    the batch that long first.
    """

    async def execute(self, requests: list[Request]) -> None:
        if any(r.parameters.get("fail") for r in requests):
            raise ValueError("one request of the batch asked to fail")
        delay = max(float(r.parameters.get("sleep", 0)) for r in requests)
        if delay:
            await asyncio.sleep(delay)
        ids = [r.id for r in requests]
        for request in requests:
            if not request.cancelled:
                await request.respond(parameters={"batch": len(requests), "ids": ids})
