"""hello_world encode / decode for NumPy and CuPy arrays, with the plain NumPy reference twin.

``invert``: bitwise NOT for integers and bools, negation for floats (an exact involution).
``encode(a, copies)``: ``invert(np.tile(a, copies))`` (tiles the last axis).
``decode(a, copies)``: ``invert(a[..., : a.shape[-1] // copies])``.

:func:`encode` / :func:`decode` dispatch on the array module: NumPy arrays take a NumPy path with
no temporaries (ufuncs writing straight into the preallocated output), CuPy arrays fused CuPy
kernels that read each input element once and write each output element once (results stay on the
device).

The CuPy kernels work on the bits: every dtype is viewed as the unsigned integer of its width, and
``invert`` is ``~x`` for integers, ``x ^ sign bit`` for floats (what NumPy's negation does, NaN
payloads included) and ``x == 0`` for bools (logical NOT, as ``np.invert`` on bool). The result is
therefore bit-for-bit NumPy's, with no dependence on how the GPU negates NaNs or subnormals.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..errors import BadInputError
from .xp import is_cupy_array

__all__ = ["check_input", "decode", "decode_reference", "encode", "encode_reference", "invert"]


# --- the reference: exactly operators/hello_world/math.py -----------------------------------------


def check_input(array: Any) -> None:
    """hello_world takes integer, float or bool tensors with at least one dimension."""
    if array.dtype.kind not in "biuf":
        raise BadInputError(f"input must be an integer, float or bool tensor, got dtype {array.dtype}")
    if array.ndim == 0:
        raise BadInputError("input must have at least one dimension, got a scalar")


def invert(array: np.ndarray) -> np.ndarray:
    """Bitwise NOT for integers and bools, negation for floats: an exact involution for each."""
    return np.negative(array) if array.dtype.kind == "f" else np.invert(array)


def encode_reference(array: np.ndarray, copies: int) -> np.ndarray:
    """Tile ``copies`` times along the last axis, then invert (plain NumPy)."""
    check_input(array)
    return invert(np.tile(array, copies))


def decode_reference(array: np.ndarray, copies: int) -> np.ndarray:
    """Undo :func:`encode_reference`: invert and keep the first copy along the last axis."""
    check_input(array)
    if array.shape[-1] % copies:
        raise BadInputError(f"last dimension {array.shape[-1]} is not a multiple of input_copies={copies}")
    return invert(array[..., : array.shape[-1] // copies])


# --- dispatch ----------------------------------------------------------------------------------------


def _check_copies(copies: Any) -> int:
    if not isinstance(copies, (int, np.integer)) or isinstance(copies, (bool, np.bool_)) or copies < 1:
        raise BadInputError(f"input_copies must be an integer >= 1, got {copies!r}")
    return int(copies)


def encode(array: Any, copies: int) -> Any:
    """``invert(tile(array, copies))`` along the last axis; CuPy in, CuPy out."""
    copies = _check_copies(copies)
    if is_cupy_array(array):
        check_input(array)
        return _encode_cupy(array, copies)
    array = np.asarray(array)
    check_input(array)
    n = array.shape[-1]
    out = np.empty(array.shape[:-1] + (n * copies,), dtype=array.dtype)
    for c in range(copies):
        _invert_into(array, out[..., c * n : (c + 1) * n])
    return out


def decode(array: Any, copies: int) -> Any:
    """Invert the first of ``copies`` copies along the last axis; CuPy in, CuPy out."""
    copies = _check_copies(copies)
    if not is_cupy_array(array):
        array = np.asarray(array)
    check_input(array)
    if array.shape[-1] % copies:
        raise BadInputError(f"last dimension {array.shape[-1]} is not a multiple of input_copies={copies}")
    first = array[..., : array.shape[-1] // copies]
    if is_cupy_array(array):
        return _decode_cupy(first)
    out = np.empty(first.shape, dtype=first.dtype)
    _invert_into(first, out)
    return out


def _invert_into(array: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = invert(array)``, ``out`` possibly a strided view.

    Floats flip the sign bit on the bits: NumPy's negation bit for bit (NaN payloads included),
    and clear of a NumPy 2.4 bug: ``np.negative(x, out=y)`` on 32/64-bit types reads ``x`` wrongly
    when x's stride is 16 bytes (float32) or 64 bytes (float64) and y's stride is not one element,
    as happens here for a last dimension of length 1 (see tests/test_kernels.py).
    """
    if array.dtype.kind == "f":
        bits = np.dtype(f"u{array.dtype.itemsize}")
        sign = bits.type(1 << (8 * array.dtype.itemsize - 1))
        np.bitwise_xor(array.view(bits), sign, out=out.view(bits))
    else:
        np.invert(array, out=out)


# --- CuPy kernels ------------------------------------------------------------------------------------

_C_UINT = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "unsigned long long"}
_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def _invert_expression(dtype: np.dtype) -> str:
    """``invert`` of ``x`` (the element viewed as the unsigned integer ``hw_uint``), as C."""
    if dtype.kind == "b":
        return "(hw_uint)(x == 0)"
    if dtype.kind == "f":
        return f"(hw_uint)(x ^ (hw_uint)(1ull << {dtype.itemsize * 8 - 1}))"
    return "(hw_uint)~x"


def _kernel_source(op: str, dtype: np.dtype, wide: bool = False) -> dict[str, str]:
    """ElementwiseKernel arguments of ``op`` ('invert' or 'encode') on ``dtype``, as plain strings.

    ``wide`` picks 64-bit index arithmetic in 'encode' (outputs of 2**32 elements or more).
    """
    u = _UINT[dtype.itemsize]
    source = {
        "preamble": f"typedef {_C_UINT[dtype.itemsize]} hw_uint;",
        "name": f"hello_world_{op}_{dtype.name}",
    }
    expression = _invert_expression(dtype)
    if op == "invert":  # y = invert(x), elementwise (CuPy handles the strides of x)
        return {**source, "in_params": f"{u} x", "out_params": f"{u} y", "operation": f"y = {expression};"}
    if op == "encode":
        # One thread per input element (k, C order over x's shape): read it once, write it to each
        # of the ``copies`` copies of its row. Rows are the flattened leading dims.
        index, c_index = ("uint64", "unsigned long long") if wide else ("uint32", "unsigned int")
        operation = f"""
            typedef {c_index} hw_index;
            const hw_index k = (hw_index)i;
            const hw_index row = one_row ? (hw_index)0 : k / ncols;
            hw_index o = row * out_cols + (k - row * ncols);
            const hw_uint x = x_in[k];
            const hw_uint v = {expression};
            for (int c = 0; c < copies; ++c, o += ncols) y[o] = v;
            """
        return {
            **source,
            "name": source["name"] + ("_wide" if wide else ""),
            "in_params": f"raw {u} x_in, {index} ncols, {index} out_cols, int32 copies, bool one_row",
            "out_params": f"raw {u} y",
            "operation": operation,
        }
    raise ValueError(f"unknown kernel {op!r}")


@functools.cache
def _kernel(op: str, dtype: np.dtype, wide: bool = False) -> Any:
    """The ``cupy.ElementwiseKernel`` of :func:`_kernel_source`, created once per (op, dtype, wide).

    CuPy compiles it on first launch (and caches the binary on disk).
    """
    import cupy

    source = _kernel_source(op, dtype, wide)
    return cupy.ElementwiseKernel(
        source["in_params"], source["out_params"], source["operation"], source["name"], preamble=source["preamble"]
    )


def _encode_plan(array: Any, out: Any, copies: int) -> tuple[tuple[str, np.dtype, bool], tuple[Any, ...], int | None]:
    """How encode launches: (kernel key, kernel arguments, loop size or None).

    Works on NumPy arrays too (same attributes), which the tests use to run the kernel source as
    host C++.
    """
    dtype = np.dtype(array.dtype)
    u = _UINT[dtype.itemsize]
    if copies == 1:
        return ("invert", dtype, False), (array.view(u), out.view(u)), None
    n = array.shape[-1]
    # x: 1-D when contiguous (direct indexing); otherwise as is, indexed in C order over its strides.
    x = array.reshape(-1) if array.flags.c_contiguous else array
    wide = out.size >= 2**32
    args = (x.view(u), n, n * copies, copies, array.size == n, out.reshape(-1).view(u))
    return ("encode", dtype, wide), args, array.size


def _encode_cupy(array: Any, copies: int) -> Any:
    import cupy

    n = array.shape[-1]
    out = cupy.empty(array.shape[:-1] + (n * copies,), dtype=array.dtype)
    if array.size:
        key, args, size = _encode_plan(array, out, copies)
        if size is None:
            _kernel(*key)(*args)
        else:
            _kernel(*key)(*args, size=size)
    return out


def _decode_plan(first: Any, out: Any) -> tuple[tuple[str, np.dtype, bool], tuple[Any, ...]]:
    """How decode launches on the first copy ``first``: (kernel key, kernel arguments)."""
    dtype = np.dtype(first.dtype)
    u = _UINT[dtype.itemsize]
    return ("invert", dtype, False), (first.view(u), out.view(u))


def _decode_cupy(first: Any) -> Any:
    import cupy

    out = cupy.empty(first.shape, dtype=first.dtype)
    if first.size:
        key, args = _decode_plan(first, out)
        _kernel(*key)(*args)
    return out
