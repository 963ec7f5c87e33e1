"""The serving context: what code running on behalf of a request inherits from it.

A worker sets one :class:`ServingContext` for the whole process (its connection) and a narrower
one around each ``execute`` (the request's deadline and tensor scope). ``RemoteOperator`` calls
and tensor fetches inside ``execute`` read it, so they go out on the worker's connection, end
when the request's caller stops waiting and hand their tensors to the request's scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .remote import Connection
    from .tensor import TensorScope


class OpenCalls:
    """The downstream calls started while serving a request, closed when the request ends.

    An operator cancelled while it handles a streamed response (not while it awaits the next
    one) leaves that call's generator suspended at its ``yield``; closing it here tells the next
    hop at once rather than when the generator is garbage-collected.
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        # Made on the first call: most requests of a leaf operator make none.
        self._calls: weakref.WeakSet[AsyncGenerator[object, None]] | None = None

    def track(self, call: AsyncGenerator[object, None]) -> None:
        if self._calls is None:
            self._calls = weakref.WeakSet()
        self._calls.add(call)

    async def close_all(self) -> None:
        """Close every call still open: each cancels its request downstream."""
        if not self._calls:
            return
        for call in list(self._calls):
            # A call another task is still iterating ("already running") ends with that task.
            with contextlib.suppress(Exception):
                await call.aclose()
        self._calls.clear()


@dataclass(frozen=True, slots=True)
class ServingContext:
    """Where the code running now serves from, and for how long."""

    #: The worker's connection, used by ``RemoteOperator`` handles created without one.
    connection: Connection | None = None
    #: ``time.monotonic()`` value at which the caller of the request being served gives up.
    deadline: float | None = None
    #: Remote tensors received while serving the request, released when it finishes.
    scope: TensorScope | None = None
    #: Downstream calls made while serving the request, closed when it finishes.
    calls: OpenCalls | None = field(default=None, compare=False)

    def time_left(self, default_s: float) -> float:
        """Seconds until the deadline (at least 1 ms), or ``default_s`` outside a request."""
        if self.deadline is None:
            return default_s
        return max(self.deadline - time.monotonic(), 0.001)


_current: contextvars.ContextVar[ServingContext] = contextvars.ContextVar(
    "pipeline_runner_serving_context", default=ServingContext()
)


def current_context() -> ServingContext:
    """The serving context of the running code (an empty one outside a worker)."""
    return _current.get()


def set_context(context: ServingContext) -> contextvars.Token[ServingContext]:
    """Make ``context`` current; undo with :func:`reset_context`."""
    return _current.set(context)


def reset_context(token: contextvars.Token[ServingContext]) -> None:
    _current.reset(token)
