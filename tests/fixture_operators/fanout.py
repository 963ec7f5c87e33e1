"""A Python stage fanning out to two Triton models: (a + b) / (a * b)."""

from __future__ import annotations

import asyncio

import numpy as np

from pipeline_runner import Operator, RemoteOperator, Request


class Divide(Operator):
    async def setup(self) -> None:
        self.add = RemoteOperator("add")
        self.multiply = RemoteOperator("multiply")

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            inputs = {"a": await request.array("a"), "b": await request.array("b")}
            added, multiplied = await asyncio.gather(self.add.infer(inputs), self.multiply.infer(inputs))
            total, product = await added.array("sum"), await multiplied.array("product")
            await request.respond({"quotient": (total / product).astype(np.float32)})
