"""The hello_world CuPy kernels compile for the GPUs we target, without a GPU.

CuPy writes the CUDA source of an ``ElementwiseKernel`` launch (its parameter list, the ``CArray``
views, the grid-stride loop) and compiles it with NVRTC on first use. NVRTC is a compiler library
and needs no device, so these tests ask CuPy's own code generator for the source of every launch
hello_world makes (each dtype; contiguous and strided inputs; 32- and 64-bit indexing) and compile
it for Ampere (sm_80) and Hopper (sm_90), then read the PTX: one global load and one global store
per element for ``invert``, element-width memory traffic only and no local-memory temporaries.

What this cannot show is the arithmetic on a device: tests/test_kernels.py runs the same kernel
source as host C++ against the NumPy reference, and its ``gpu`` tests run the real kernels.

CuPy's code generator is private API (``cupy._core._kernel``); the dev extra pins CuPy's major
version so that a change there fails here first, with a message that says so.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline_runner.kernels import hello_world as hw

DTYPES = [
    np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.bool_,
]  # fmt: skip
ARCHS = ["sm_80", "sm_90"]

# CuPy's _ArgKind (cupy/_core/_kernel.pxd): what each kernel argument is.
_NDARRAY, _INDEXER, _SCALAR = 1, 2, 3

# (ndim, C-contiguous, 32-bit indexing) of the array arguments as CuPy sees them at launch:
# contiguous inputs are reduced to 1-D, strided ones keep their dimensions, and arrays of
# 2**31 elements or more index with 64 bits.
LAYOUTS = [(1, True, True), (3, False, True), (1, True, False), (2, False, False)]
LAYOUT_IDS = ["contiguous", "strided 3-D", "contiguous 64-bit", "strided 2-D 64-bit"]


@functools.cache
def _cupy_codegen() -> SimpleNamespace:
    """CuPy's kernel code generator and NVRTC (both in the dev extra), or a failure naming what is missing."""
    try:
        import cupy
        from cupy._core import _carray, _kernel, _scalar
        from cupy._core import core as cupy_core
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:
        pytest.fail(f"CuPy is part of the dev extra ({error}): pip install -e '.[dev]'")
    private = [
        (_kernel, "_get_elementwise_kernel_code"), (_kernel, "_ArgInfo"), (cupy_core, "_cupy_header_list"),
        (cupy_core, "_get_header_dir_path"), (cupy_core, "assemble_cupy_compiler_options"),
    ]  # fmt: skip
    missing = [f"{module.__name__}.{name}" for module, name in private if not hasattr(module, name)]
    if missing:
        pytest.fail(f"CuPy {cupy.__version__} changed its private kernel code generator ({missing}); update this test")
    try:
        nvrtc.getVersion()
    except Exception as error:  # noqa: BLE001 - CuPy raises its library loader's own error types
        pytest.fail(f"NVRTC not found ({error}); the dev extra installs it: pip install -e '.[dev]'")
    return SimpleNamespace(cupy=cupy, kernel=_kernel, carray=_carray, scalar=_scalar, core=cupy_core, nvrtc=nvrtc)


def _array(cg: Any, dtype: np.dtype, ndim: int, contiguous: bool, index_32_bits: bool) -> Any:
    return cg.kernel._ArgInfo(_NDARRAY, cg.cupy.ndarray, dtype, ndim, contiguous, index_32_bits)


def _scalar_arg(cg: Any, dtype: str) -> Any:
    return cg.kernel._ArgInfo(_SCALAR, cg.scalar.CScalar, np.dtype(dtype), 0, True, True)


def _indexer(cg: Any, ndim: int, index_32_bits: bool) -> Any:
    return cg.kernel._ArgInfo(_INDEXER, cg.carray.Indexer, None, ndim, True, index_32_bits)


def kernel_source(op: str, dtype: Any, layout: tuple[int, bool, bool], wide: bool = False) -> tuple[str, str]:
    """(kernel name, CUDA source) that CuPy compiles for hello_world's launch of ``op`` on ``dtype``."""
    cg = _cupy_codegen()
    kernel = hw._kernel(op, np.dtype(dtype), wide)
    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    ndim, contiguous, index_32_bits = layout
    if op == "invert":  # invert(x) -> y: y is a fresh contiguous array of x's shape
        in_types: tuple[Any, ...] = (bits,)
        arginfos = (
            _array(cg, bits, ndim, contiguous, index_32_bits),
            _array(cg, bits, ndim, True, index_32_bits),
            _indexer(cg, ndim, index_32_bits),
        )
    else:  # encode(x_in, ncols, out_cols, copies, one_row) -> y, all raw, launched with size=
        index = "uint64" if wide else "uint32"
        in_types = (bits, None, None, None, None)
        arginfos = (
            _array(cg, bits, ndim, contiguous, index_32_bits),
            _scalar_arg(cg, index), _scalar_arg(cg, index), _scalar_arg(cg, "int32"), _scalar_arg(cg, "bool"),
            _array(cg, bits, 1, True, index_32_bits),
            _indexer(cg, 1, index_32_bits),
        )  # fmt: skip
    _, _, type_map = kernel._decide_params_type(in_types, (bits,))
    code = cg.kernel._get_elementwise_kernel_code(
        arginfos, type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble
    )
    return kernel.name, "".join(f"#include <{h}>\n" for h in cg.core._cupy_header_list) + code


def compile_ptx(name: str, source: str, arch: str) -> str:
    """PTX of ``source`` from NVRTC for ``arch``, with the options CuPy compiles kernels with."""
    cg = _cupy_codegen()
    options = cg.core.assemble_cupy_compiler_options(("-I" + cg.core._get_header_dir_path(),))
    program = cg.nvrtc.createProgram(source, f"{name}.cu", (), ())
    try:
        try:
            cg.nvrtc.compileProgram(program, options + (f"--gpu-architecture={arch}",))
        except Exception:  # noqa: BLE001 - the log is the useful part
            pytest.fail(f"NVRTC rejected {name} for {arch}:\n{cg.nvrtc.getProgramLog(program)}\n--- source ---\n{source}")
        ptx = cg.nvrtc.getPTX(program)
    finally:
        cg.nvrtc.destroyProgram(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def memory_instructions(ptx: str) -> dict[str, list[str]]:
    """The PTX's global and local loads and stores, by kind."""
    return {
        kind: re.findall(rf"\b{kind}\.[\w.]+", ptx)
        for kind in ("ld.global", "st.global", "ld.local", "st.local")
    }


def element_width(dtype: Any) -> str:
    return f"u{np.dtype(dtype).itemsize * 8}" if np.dtype(dtype).itemsize > 1 else "u8"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
def test_invert_compiles_to_one_load_and_one_store_per_element(dtype: Any, layout: tuple, arch: str) -> None:
    name, source = kernel_source("invert", dtype, layout)
    ptx = compile_ptx(name, source, arch)
    assert f".entry {name}(" in ptx
    memory = memory_instructions(ptx)
    width = element_width(dtype)
    assert [i.rsplit(".", 1)[-1] for i in memory["ld.global"]] == [width]
    assert [i.rsplit(".", 1)[-1] for i in memory["st.global"]] == [width]
    assert memory["ld.local"] == memory["st.local"] == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("wide", [False, True], ids=["32-bit index", "64-bit index"])
@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
def test_encode_compiles_to_element_width_traffic_without_temporaries(
    dtype: Any, layout: tuple, wide: bool, arch: str
) -> None:
    name, source = kernel_source("encode", dtype, layout, wide)
    ptx = compile_ptx(name, source, arch)
    assert f".entry {name}(" in ptx
    memory = memory_instructions(ptx)
    width = element_width(dtype)
    assert memory["ld.global"] and memory["st.global"]
    # Only elements move through global memory (the copies loop is unrolled, so there are several
    # stores, but nothing of another width: no index tables, no intermediate arrays).
    assert {i.rsplit(".", 1)[-1] for i in memory["ld.global"] + memory["st.global"]} == {width}
    assert memory["ld.local"] == memory["st.local"] == []


def test_a_broken_kernel_is_reported_with_nvrtc_log() -> None:
    """The compile check can fail: a kernel with a type error is rejected with NVRTC's message."""
    name, source = kernel_source("invert", np.int32, LAYOUTS[0])
    broken = source.replace("y = (hw_uint)~x;", "y = ~undeclared_name;")
    assert broken != source
    with pytest.raises(pytest.fail.Exception, match="undeclared_name"):
        compile_ptx(name, broken, "sm_90")
