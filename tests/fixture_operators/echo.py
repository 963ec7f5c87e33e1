"""Operators used by the tests: each does one observable thing."""

from __future__ import annotations

import asyncio
import os

import numpy as np

from pipeline_runner import BadInputError, Operator, Request


class Echo(Operator):
    """Returns every input as an output of the same name, and its parameters back."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            delay = request.parameters.get("sleep", 0)
            if delay:
                await asyncio.sleep(delay)
            await request.respond(
                request.inputs,
                parameters={**request.parameters, "pid": os.getpid(), "worker": self.context.worker},
            )


class Stream(Operator):
    """Sends ``count`` responses, each with ``index``; only the last is final."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            count = int(request.parameters.get("count", 3))
            for index in range(count):
                await request.respond(
                    {"index": np.array([index], dtype=np.int64)}, final=index == count - 1
                )


class Faulty(Operator):
    """Misbehaves as the ``mode`` parameter says."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            mode = request.parameters.get("mode")
            if mode == "bad_input":
                raise BadInputError("input 'x' must be float32")
            if mode == "raise":
                raise ValueError("something broke inside the operator")
            if mode == "forget":
                continue  # returns without answering
            if mode == "exit":
                os._exit(17)
            await request.respond({"ok": np.array([1], dtype=np.int8)})


class WrongAnswer(Operator):
    """Answers ``output = input + 1``: a pipeline whose results a client must reject."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            x = await request.array("input")
            await request.respond({"output": x + 1})


class Batched(Operator):
    """Reports the size of the batch each request was served in."""

    async def execute(self, requests: list[Request]) -> None:
        await asyncio.sleep(0.05)
        for request in requests:
            await request.respond(parameters={"batch": len(requests)})


class Inflate(Operator):
    """Answers with ``nbytes`` zero bytes: more than NATS takes when ``nbytes`` is large."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            await request.respond({"blob": np.zeros(int(request.parameters["nbytes"]), np.uint8)})


class Copy(Operator):
    """Reads every input into this process and answers with fresh copies (so they are re-published)."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            outputs = {}
            for name, tensor in request.inputs.items():
                value = await tensor.array()
                outputs[name] = value.copy()
            await request.respond(outputs)


class Chain(Operator):
    """Adds 1 to ``input`` and passes the result to the operator named by parameter ``next``."""

    async def execute(self, requests: list[Request]) -> None:
        from pipeline_runner import RemoteOperator

        for request in requests:
            x = await request.array("input")
            y = x + np.ones(1, dtype=x.dtype)
            next_name = self.parameters.get("next")
            if next_name:
                response = await RemoteOperator(next_name).infer({"input": y})
                await request.respond({"output": response.outputs["output"]})
            else:
                await request.respond({"output": y})


class Holder(Operator):
    """Asks ``producer`` for a big tensor, then holds on to it for ``hold`` seconds."""

    async def execute(self, requests: list[Request]) -> None:
        from pipeline_runner import RemoteOperator

        for request in requests:
            await RemoteOperator("producer").infer(request.inputs, parameters=request.parameters)
            await asyncio.sleep(float(request.parameters.get("hold", 60)))
            await request.respond()


class GpuCopy(Operator):
    """Takes every input onto the GPU and answers with device copies (needs CuPy and a GPU)."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            outputs = {}
            for name, tensor in request.inputs.items():
                device_array = await tensor.array("gpu")
                assert hasattr(device_array, "__cuda_array_interface__")
                outputs[name] = device_array.copy()
            await request.respond(outputs, parameters={"on_gpu": True})


class Deadline(Operator):
    """Reports the time left of each hop down a chain (parameter ``next``); the last one sleeps."""

    async def execute(self, requests: list[Request]) -> None:
        from pipeline_runner import RemoteOperator

        for request in requests:
            left = request.time_left()
            next_name = self.parameters.get("next")
            if next_name:
                response = await RemoteOperator(next_name).infer(parameters=request.parameters)
                chain = [left, *response.parameters["chain"]]
            else:
                await asyncio.sleep(float(request.parameters.get("sleep", 0)))
                chain = [left]
            await request.respond(parameters={"chain": chain})


class Crash(Operator):
    """Dies by SIGKILL while holding a request, as the ``mode`` parameter says.

    ``before``: before answering; ``after``: right after the final response; ``mid_stream``:
    after the first of three streamed responses. With ``once`` (a file path) it dies only the
    first time, and answers normally once the file exists.
    """

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            mode = request.parameters.get("mode", "before")
            once = request.parameters.get("once")
            crash = True
            if once:
                try:
                    with open(once, "x"):
                        pass
                except FileExistsError:
                    crash = False
            reply = {"worker": self.context.worker}
            if mode == "before" and crash:
                _die()
            if mode == "mid_stream":
                await request.respond({"index": np.array([0])}, parameters=reply, final=False)
                if crash:
                    await asyncio.sleep(0.3)  # lets the partial response leave the process
                    _die()
                await request.respond({"index": np.array([1])}, parameters=reply, final=False)
            await request.respond({"index": np.array([2])}, parameters=reply)
            if mode == "after" and crash:
                await asyncio.sleep(0.3)
                _die()


def _die() -> None:
    os.kill(os.getpid(), 9)
