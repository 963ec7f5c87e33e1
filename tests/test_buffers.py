"""Receive buffers are recycled only once nothing uses them any more."""

from __future__ import annotations

import gc

import numpy as np

from pipeline_runner.data_plane.buffers import POOLED_MIN_BYTES, BufferPool


def test_a_buffer_returns_to_the_pool_only_after_its_last_view_is_gone() -> None:
    pool = BufferPool()
    a = pool.take(3 << 20)
    a[:] = 7
    view = a.view(np.int32).reshape(3, -1)
    del a
    gc.collect()
    assert pool.idle_bytes == 0, "a view still uses the buffer"
    assert int(view[2, -1]) == 0x07070707
    del view
    gc.collect()
    assert pool.idle_bytes == 4 << 20  # size classes are powers of two


def test_a_returned_buffer_is_reused_for_the_same_size_class() -> None:
    pool = BufferPool()
    first = pool.take(5 << 20)
    address = first.__array_interface__["data"][0]
    del first
    gc.collect()
    second = pool.take(6 << 20)
    assert second.__array_interface__["data"][0] == address
    assert second.nbytes == 6 << 20 and second.flags.writeable
    assert (pool.hits, pool.misses) == (1, 1)


def test_idle_memory_is_bounded_and_small_buffers_are_not_pooled() -> None:
    pool = BufferPool(max_idle_bytes=8 << 20)
    held = [pool.take(4 << 20) for _ in range(3)]
    small = pool.take(POOLED_MIN_BYTES - 1)
    assert small.nbytes == POOLED_MIN_BYTES - 1
    del held, small
    gc.collect()
    assert pool.idle_bytes == 8 << 20
