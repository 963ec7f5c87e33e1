"""The hello_world transforms in NumPy: the reference every other implementation must match."""

from __future__ import annotations

import numpy as np

from pipeline_runner.errors import BadInputError


def check_input(array: np.ndarray) -> None:
    """hello_world takes integer, float or bool tensors with at least one dimension."""
    if array.dtype.kind not in "biuf":
        raise BadInputError(f"input must be an integer, float or bool tensor, got dtype {array.dtype}")
    if array.ndim == 0:
        raise BadInputError("input must have at least one dimension, got a scalar")


def invert(array: np.ndarray) -> np.ndarray:
    """Bitwise NOT for integers and bools, negation for floats: an exact involution for each."""
    return np.negative(array) if array.dtype.kind == "f" else np.invert(array)


def encode(array: np.ndarray, copies: int) -> np.ndarray:
    """Tile ``copies`` times along the last axis, then invert."""
    check_input(array)
    return invert(np.tile(array, copies))


def decode(array: np.ndarray, copies: int) -> np.ndarray:
    """Undo :func:`encode`: invert and keep the first copy along the last axis."""
    check_input(array)
    if array.shape[-1] % copies:
        raise BadInputError(f"last dimension {array.shape[-1]} is not a multiple of input_copies={copies}")
    return invert(array[..., : array.shape[-1] // copies])
