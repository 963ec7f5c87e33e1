"""The hello_world transforms in NumPy: the reference every other implementation must match.

They live in :mod:`pipeline_runner.kernels.hello_world` beside their fused NumPy and CuPy
versions, so there is one copy of the reference; the Triton models under ``triton_models/``
repeat it because Triton runs them in their own Python environment.
"""

from __future__ import annotations

from pipeline_runner.kernels.hello_world import check_input, invert
from pipeline_runner.kernels.hello_world import decode_reference as decode
from pipeline_runner.kernels.hello_world import encode_reference as encode

__all__ = ["check_input", "decode", "encode", "invert"]
