"""The producer side of the data plane: tensors kept for peers to fetch, each with a lease."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    buffer: Any
    nbytes: int
    expires_at: float


class TensorStore:
    """Holds published tensors until released or until their lease (the request's deadline) ends.

    A consumer that crashes never releases what it was sent; the lease frees it anyway.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def put(self, buffer: Any, nbytes: int, lease_s: float) -> str:
        """Keep ``buffer`` for at most ``lease_s`` seconds; returns its id."""
        tensor_id = secrets.token_hex(12)
        self._entries[tensor_id] = _Entry(buffer, nbytes, self._clock() + lease_s)
        self._nbytes += nbytes
        return tensor_id

    def get(self, tensor_id: str) -> Any | None:
        """The buffer of a live tensor, or None when unknown, released or expired."""
        entry = self._entries.get(tensor_id)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(tensor_id)
            return None
        return entry.buffer

    def release(self, tensor_ids: list[str]) -> None:
        for tensor_id in tensor_ids:
            self._drop(tensor_id)

    def expire(self) -> int:
        """Free every tensor whose lease ended; returns how many."""
        now = self._clock()
        expired = [tid for tid, entry in self._entries.items() if entry.expires_at <= now]
        self.release(expired)
        return len(expired)

    def _drop(self, tensor_id: str) -> None:
        entry = self._entries.pop(tensor_id, None)
        if entry is not None:
            self._nbytes -= entry.nbytes
