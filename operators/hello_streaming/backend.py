"""hello_streaming backend: appends its suffix to the text and streams one response per word.

``delay`` (seconds, from the deployment file) is spent before each word: simulated generation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline_runner import Operator, Request

from .stage import max_words, request_text, seconds, serve_each


class Backend(Operator):
    async def setup(self) -> None:
        self.suffix = str(self.parameters.get("suffix", "-back"))
        self.delay = seconds(self.parameters, "delay")
        self.max_words = max_words(self.parameters)
        self.words_sent = 0

    async def execute(self, requests: list[Request]) -> None:
        await serve_each(requests, self._generate)

    async def _generate(self, request: Request) -> None:
        text = request_text(request, self.max_words) + self.suffix
        for word in text.split():
            if self.delay:
                await asyncio.sleep(self.delay)
            await request.respond(parameters={"text": f"Backend: {word}"}, final=False)
            self.words_sent += 1
        await request.respond(final=True)

    def stats(self) -> dict[str, Any]:
        return {"words_sent": self.words_sent}
