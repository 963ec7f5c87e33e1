"""hello_streaming's middle and frontend: pass the text on, re-stream every word labelled.

Each calls the next stage (parameter ``next``) with the text plus its ``suffix`` and sends one
response per response received, its text prefixed by the stage's label, then an empty final one.
An error from downstream reaches the caller with its code.
"""

from __future__ import annotations

from pipeline_runner import Operator, RemoteOperator, Request

from .stage import max_words, request_text, serve_each


class Relay(Operator):
    label = "Relay"
    default_next = ""
    default_suffix = ""

    async def setup(self) -> None:
        self.next = RemoteOperator(str(self.parameters.get("next", self.default_next)))
        self.suffix = str(self.parameters.get("suffix", self.default_suffix))
        self.max_words = max_words(self.parameters)

    async def execute(self, requests: list[Request]) -> None:
        await serve_each(requests, self._relay)

    async def _relay(self, request: Request) -> None:
        text = request_text(request, self.max_words) + self.suffix
        async for response in self.next.call(parameters={"text": text}):
            word = response.parameters.get("text")
            if word is not None:
                await request.respond(parameters={"text": f"{self.label}: {word}"}, final=False)
        await request.respond(final=True)


class Middle(Relay):
    label = "Middle"
    default_next = "backend"
    default_suffix = "-mid"


class Frontend(Relay):
    label = "Frontend"
    default_next = "middle"
