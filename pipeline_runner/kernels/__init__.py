"""Array kernels for the hot path: NumPy everywhere, fused CuPy kernels for CuPy arrays.

Importing this package never imports CuPy; see :mod:`.xp` for dispatch and device moves.
"""

from .xp import array_module, gpu_available, is_cupy_array, to_device

__all__ = ["array_module", "gpu_available", "is_cupy_array", "to_device"]
