"""What every hello_streaming stage shares: checking ``text`` and parameters, serving a batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline_runner import BadInputError, OperatorError, Request

DEFAULT_MAX_WORDS = 1000


def request_text(request: Request, max_words: int) -> str:
    """The request's ``text`` parameter: a string of 1 to ``max_words`` words."""
    text = request.parameters.get("text")
    if text is None:
        raise BadInputError('missing parameter "text" (send {"text": "hello world"})')
    if not isinstance(text, str):
        raise BadInputError(f'parameter "text" must be a string, got {type(text).__name__}')
    return checked_words(text, max_words)


def checked_words(text: str, max_words: int) -> str:
    """``text`` itself when it has 1 to ``max_words`` words; BadInputError otherwise."""
    words = len(text.split())
    if words == 0:
        raise BadInputError('parameter "text" has no words')
    if words > max_words:
        raise BadInputError(f'parameter "text" has {words} words, more than the {max_words} taken')
    return text


def max_words(parameters: dict[str, Any]) -> int:
    """The stage's ``max_words`` parameter (a positive integer)."""
    value = parameters.get("max_words", DEFAULT_MAX_WORDS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"parameter max_words must be an integer >= 1, got {value!r}")
    return value


def seconds(parameters: dict[str, Any], name: str) -> float:
    """A non-negative number of seconds from the stage's parameters (0 when absent)."""
    value = parameters.get(name, 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"parameter {name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


async def serve_each(requests: list[Request], handler: Callable[[Request], Awaitable[None]]) -> None:
    """Run ``handler`` on every request of the batch at once; a request that fails fails alone."""

    async def one(request: Request) -> None:
        try:
            await handler(request)
        except BadInputError as exc:
            await request.fail(str(exc), "bad_input")
        except OperatorError as exc:  # from downstream: keeps its code
            await request.fail(str(exc), exc.code)

    if len(requests) == 1:  # the usual batch: gathering one coroutine costs more than awaiting it
        await one(requests[0])
    else:
        await asyncio.gather(*(one(request) for request in requests))
