"""The three stages of deployments/hello_streaming.yaml as typed endpoints calling each other
through ``depends``: the same checks (operators/hello_streaming/stage.py), worker counts and
parameters, and the same streamed answers; the callee is a class instead of a ``next`` parameter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import BaseModel

from pipeline_runner import Operator, OperatorHandle, depends, endpoint, operator_defaults

from ..hello_streaming.stage import checked_words, max_words, seconds


class TextRequest(BaseModel):
    """What every stage takes: ``{"text": "hello world"}``."""

    text: str


class TextChunk(BaseModel):
    """One streamed word, labelled by the stages it went through."""

    text: str


class Stage(Operator):
    """What the three stages share: their ``suffix`` and ``max_words`` parameters."""

    default_suffix: ClassVar[str] = ""

    async def setup(self) -> None:
        self.suffix = str(self.parameters.get("suffix", self.default_suffix))
        self.max_words = max_words(self.parameters)

    def text_to_pass_on(self, request: TextRequest) -> str:
        return checked_words(request.text, self.max_words) + self.suffix


@operator_defaults(workers=2, max_inflight_requests=64, parameters={"suffix": "-back", "delay": 0.1})
class Backend(Stage):
    """Streams one response per word; ``delay`` seconds before each (simulated generation)."""

    default_suffix = "-back"

    async def setup(self) -> None:
        await super().setup()
        self.delay = seconds(self.parameters, "delay")
        self.words_sent = 0

    @endpoint
    async def generate(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        for word in self.text_to_pass_on(request).split():
            if self.delay:
                await asyncio.sleep(self.delay)
            yield TextChunk(text=f"Backend: {word}")
            self.words_sent += 1

    def stats(self) -> dict[str, Any]:
        return {"words_sent": self.words_sent}


class Relay(Stage):
    """Calls the next stage with the text plus its suffix and re-streams each word labelled."""

    label: ClassVar[str] = "Relay"

    async def relay(self, callee: OperatorHandle, request: TextRequest) -> AsyncIterator[TextChunk]:
        async for chunk in callee.stream(TextRequest(text=self.text_to_pass_on(request))):
            yield TextChunk(text=f"{self.label}: {chunk.text}")  # type: ignore[attr-defined]


@operator_defaults(workers=1, max_inflight_requests=64, parameters={"suffix": "-mid"})
class Middle(Relay):
    label = "Middle"
    default_suffix = "-mid"
    backend = depends(Backend)

    @endpoint
    async def generate(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        async for chunk in self.relay(self.backend, request):
            yield chunk


@operator_defaults(workers=1, max_inflight_requests=64, parameters={"max_words": 1000})  # longer texts are bad_input
class Frontend(Relay):
    label = "Frontend"
    middle = depends(Middle)

    @endpoint
    async def generate(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        async for chunk in self.relay(self.middle, request):
            yield chunk
