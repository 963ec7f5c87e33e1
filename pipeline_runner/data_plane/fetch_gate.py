"""How many large host-memory fetches one process runs at once; the others wait their turn.

Between processes of one host a large message is copied through shared memory fragment by
fragment, with producer and consumer both copying. Dozens of such transfers at once do not
move more bytes per second: they interleave, every one of them finishes late, each process
keeps receive buffers for all of them (past what the buffer pool keeps, so fresh pages are
zeroed again), and both sides spend their CPU polling for one another. Letting a few run and
queueing the rest (first come, first served) keeps the copies streaming and the latency of
each fetch that of a fetch alone (what it changed: benchmarks/RESULTS.md, "Hop: large tensors").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from .errors import DataPlaneError

# Fetches of at least this many bytes take a turn; smaller ones never wait.
GATED_MIN_BYTES = 1 << 20
# Large fetches one process runs at once (data_plane.parallel_fetches).
PARALLEL_LARGE_FETCHES = 2


class FetchGate:
    """At most ``parallel`` large fetches at once in this process, served in arrival order."""

    def __init__(self, parallel: int = PARALLEL_LARGE_FETCHES, min_bytes: int = GATED_MIN_BYTES):
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.parallel = parallel
        self.min_bytes = min_bytes
        self._slots = asyncio.Semaphore(parallel)
        self.waited = 0  # fetches that had to wait for a turn

    @contextlib.asynccontextmanager
    async def turn(self, nbytes: int, deadline: float, what: str) -> AsyncIterator[None]:
        """A slot for a fetch of ``nbytes`` for the duration of the block (none is needed below
        ``min_bytes``), waited for until ``deadline`` (``time.monotonic()``); DataPlaneError
        when the deadline passes first."""
        if nbytes < self.min_bytes:
            yield
            return
        if self._slots.locked():
            self.waited += 1
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._slots.acquire()
            except TimeoutError:
                raise DataPlaneError(
                    f"fetch of {what} timed out waiting for its turn behind other large fetches"
                ) from None
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()
