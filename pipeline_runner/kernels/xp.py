"""NumPy / CuPy dispatch: which array module an array belongs to, and moving arrays between them.

Imports without CuPy installed; CuPy is only imported when a CuPy array is in hand or a
device is asked for.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Literal

import numpy as np

# DLPack device types (dlpack.h ``DLDeviceType``).
_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_MANAGED = 13

Device = Literal["cpu", "gpu"]


def _cupy() -> ModuleType:
    """``import cupy`` (a function so tests can substitute it)."""
    import cupy

    return cupy


@functools.cache
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device; never raises (cached)."""
    try:
        cupy = _cupy()
        # A CuPy without a usable driver answers False here, or raises on older versions.
        return bool(cupy.is_available()) and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_cupy_array(array: Any) -> bool:
    """True for CuPy arrays, decided by the type's module: never imports CuPy."""
    return type(array).__module__.split(".", 1)[0] == "cupy"


def array_module(array: Any) -> ModuleType:
    """``cupy`` for CuPy arrays, ``numpy`` for anything else."""
    return _cupy() if is_cupy_array(array) else np


def _dlpack_device(array: Any) -> tuple[int, int] | None:
    """``array.__dlpack_device__()`` as ``(type, id)``, or None for non-DLPack objects."""
    probe = getattr(array, "__dlpack_device__", None)
    if probe is None:
        return None
    try:
        kind, index = probe()
        return int(kind), int(index)
    except Exception:
        return None


def to_device(array: Any, device: Device) -> Any:
    """``array`` as a NumPy (``"cpu"``) or CuPy (``"gpu"``) array; returned as is when already there.

    - to ``"gpu"``: producers that DLPack reports on a CUDA device (e.g. a PyTorch CUDA tensor) are
      imported zero-copy with ``cupy.from_dlpack``. Host arrays are copied with ``cupy.asarray``:
      ``cupy.from_dlpack`` refuses CPU producers (TypeError in CuPy 14.2). Raises RuntimeError when
      CuPy finds no CUDA device.
    - to ``"cpu"``: ``numpy.from_dlpack(array, device="cpu")``: zero-copy for CPU producers; a CuPy
      that honours DLPack's ``dl_device`` request exports a host copy (blocking, as NumPy passes no
      stream). Where the producer cannot export to the CPU (BufferError and the like), falls back
      to ``array.get()`` for CuPy arrays and ``numpy.asarray`` for anything else.
    """
    if device == "gpu":
        if is_cupy_array(array):
            return array
        if not gpu_available():
            raise RuntimeError("cannot move an array to the GPU: no CUDA device found by CuPy")
        cupy = _cupy()
        dl = _dlpack_device(array)
        if dl is not None and dl[0] in (_DL_CUDA, _DL_CUDA_MANAGED):
            return cupy.from_dlpack(array)
        return cupy.asarray(array)
    if device == "cpu":
        if isinstance(array, np.ndarray):
            return array
        if _dlpack_device(array) is not None:
            try:
                return np.from_dlpack(array, device="cpu")
            except (BufferError, TypeError, ValueError, NotImplementedError, RuntimeError):
                pass  # a producer that cannot export to the host: the fallbacks below
        if is_cupy_array(array):
            return array.get()
        return np.asarray(array)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
