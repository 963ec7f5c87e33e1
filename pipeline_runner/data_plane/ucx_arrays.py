"""ucxx views of the buffers the data plane fills and serves: NumPy, device arrays, bytes.

Device arrays (anything with ``__cuda_array_interface__``, such as CuPy) go to ucxx as they are;
this module never imports CuPy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import DataPlaneError

ArrayFactory = Callable[[Any], Any]  # ucxx._lib.arr.Array


def writable_view(out: Any, array: ArrayFactory) -> tuple[Any, int]:
    """(ucxx Array over ``out`` or None when empty, nbytes); ``out`` must be writable, C-contiguous.

    Raises DataPlaneError otherwise.
    """
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise DataPlaneError("fetch needs a writable output array")
        if not out.flags.c_contiguous:
            raise DataPlaneError("fetch needs a C-contiguous output array")
        return (array(out) if out.nbytes else None), out.nbytes
    if hasattr(out, "__cuda_array_interface__"):  # CuPy and friends: ucxx takes them as they are
        if out.__cuda_array_interface__.get("data", (0, False))[1]:
            raise DataPlaneError("fetch needs a writable output array")
        view = array(out)
        if not view.c_contiguous:
            raise DataPlaneError("fetch needs a C-contiguous output array")
        return (view if view.nbytes else None), view.nbytes
    try:
        memory = memoryview(out)
    except TypeError as exc:
        raise DataPlaneError(f"fetch needs a NumPy or CuPy array to fill, not {type(out).__name__}") from exc
    if memory.readonly:
        raise DataPlaneError("fetch needs a writable output array")
    if not memory.c_contiguous:
        raise DataPlaneError("fetch needs a C-contiguous output array")
    if memory.nbytes == 0:
        return None, 0
    return array(np.frombuffer(memory, np.uint8)), memory.nbytes


def readable_view(obj: Any, array: ArrayFactory) -> tuple[Any, int]:
    """(ucxx Array over ``obj`` or None when empty, nbytes) for a buffer to serve.

    Raises ValueError for a buffer that is not C-contiguous.
    """
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError("array is not C-contiguous")
        return (array(obj) if obj.nbytes else None), obj.nbytes
    if hasattr(obj, "__cuda_array_interface__"):
        view = array(obj)
        if not view.c_contiguous:
            raise ValueError("device array is not C-contiguous")
        return (view if view.nbytes else None), view.nbytes
    memory = memoryview(obj)
    if not memory.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    if memory.nbytes == 0:
        return None, 0
    return array(np.frombuffer(memory, np.uint8)), memory.nbytes
