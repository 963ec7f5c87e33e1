"""Reusable host receive buffers for large fetches.

Fresh memory costs as much as the transfer itself for large tensors: the kernel zeroes every
page on first touch (about 30 ms for 256 MiB here, as long as the copy). Arrays handed out by
:class:`BufferPool` return their buffer to the pool once the last view of them is gone.
"""

from __future__ import annotations

import threading

import numpy as np

POOLED_MIN_BYTES = 1 << 20  # below this, malloc is cheap enough


class _Loan:
    """Keeps a pooled buffer out of the pool while any array built on it is alive."""

    def __init__(self, pool: BufferPool, buffer: np.ndarray, nbytes: int):
        self._pool = pool
        self._buffer = buffer
        self.__array_interface__ = buffer[:nbytes].__array_interface__

    def __del__(self) -> None:
        self._pool._give_back(self._buffer)


class BufferPool:
    """Host buffers in power-of-two size classes, at most ``max_idle_bytes`` kept idle."""

    def __init__(self, max_idle_bytes: int = 1 << 30):
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()  # __del__ may run on any thread
        self.hits = 0
        self.misses = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes``; its buffer comes back when it is garbage."""
        if nbytes < POOLED_MIN_BYTES:
            return np.empty(nbytes, dtype=np.uint8)
        size_class = 1 << (nbytes - 1).bit_length()
        with self._lock:
            free = self._idle.get(size_class)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._idle_bytes -= size_class
                self.hits += 1
            else:
                self.misses += 1
        if buffer is None:
            buffer = np.empty(size_class, dtype=np.uint8)
        return np.asarray(_Loan(self, buffer, nbytes))

    def _give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            if self._idle_bytes + buffer.nbytes <= self.max_idle_bytes:
                self._idle.setdefault(buffer.nbytes, []).append(buffer)
                self._idle_bytes += buffer.nbytes
