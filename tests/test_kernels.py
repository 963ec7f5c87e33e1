"""pipeline_runner.kernels: the array-module helpers and the hello_world kernels.

CPU tests compare the NumPy path with the plain NumPy reference bit for bit, and run the CuPy
kernels' C++ source on the host (a stand-in for CuPy's CArray, compiled with the system C++
compiler) against the same reference. GPU tests (marked ``gpu``) run the real CuPy kernels.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline_runner.errors import BadInputError
from pipeline_runner.kernels import hello_world as hw
from pipeline_runner.kernels import xp
from pipeline_runner.kernels.hello_world import decode, decode_reference, encode, encode_reference
from pipeline_runner.kernels.xp import array_module, gpu_available, is_cupy_array, to_device

REPO = Path(__file__).resolve().parents[1]

DTYPES = [
    np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.bool_,
]  # fmt: skip
DTYPE_IDS = [np.dtype(d).name for d in DTYPES]
SHAPES = [(1,), (7,), (0,), (1, 1), (3, 5), (4, 0), (0, 3), (2, 3, 4), (2, 1, 6), (3, 2, 2, 5)]
COPIES = [1, 2, 3, 4, 5]

# Views that are not C-contiguous, each written for NumPy and CuPy alike: (name, shapes, view).
VIEWS: list[tuple[str, tuple[int, ...], Callable[[Any, Any], Any]]] = [
    ("every other column", (4, 10), lambda m, a: a[:, ::2]),
    ("column slice", (5, 9), lambda m, a: a[:, 2:7]),
    ("row slice of 3-D", (6, 3, 4), lambda m, a: a[1:5:2]),
    ("transpose", (6, 4), lambda m, a: a.T),
    ("axes swapped, 3-D", (2, 3, 5), lambda m, a: m.swapaxes(a, 0, 2)),
    ("reversed", (11,), lambda m, a: a[::-1]),
    ("reversed rows and columns", (3, 8), lambda m, a: a[::-1, ::-2]),
    ("Fortran order", (4, 6), lambda m, a: m.asfortranarray(a)),
    ("broadcast row (stride 0)", (1, 5), lambda m, a: m.broadcast_to(a, (4,) + a.shape[1:])),
    # last dim of length 1 with a 16-byte (float32) / 64-byte (float64) row stride: np.negative(out=...)
    # reads these wrongly in NumPy 2.4 when the output is strided
    ("last axis of length 1, every 2nd row", (8, 2), lambda m, a: a[::2, :1]),
    ("last axis of length 1, every 4th row", (16, 2), lambda m, a: a[::4, :1]),
]


def _special_floats(dtype: np.dtype) -> np.ndarray:
    """NaNs (quiet, signalling, negative, with payloads), infinities, signed zeros, subnormals."""
    bits = np.dtype(f"u{dtype.itemsize}")
    width = dtype.itemsize * 8
    mantissa = {2: 10, 4: 23, 8: 52}[dtype.itemsize]
    exponent_all_ones = ((1 << (width - 1 - mantissa)) - 1) << mantissa
    sign = 1 << (width - 1)
    patterns = [
        exponent_all_ones | 1,  # signalling NaN
        exponent_all_ones | (1 << (mantissa - 1)),  # quiet NaN
        sign | exponent_all_ones | (1 << (mantissa - 1)) | 5,  # negative NaN with a payload
        exponent_all_ones,  # +inf
        sign | exponent_all_ones,  # -inf
        0,  # +0.0
        sign,  # -0.0
        1,  # smallest subnormal
        sign | ((1 << mantissa) - 1),  # largest negative subnormal
    ]
    return np.array(patterns, dtype=bits).view(dtype)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Random bit patterns of ``dtype`` (floats start with the special values); bools 0/1."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    flat = rng.integers(0, 256, size=size * dtype.itemsize, dtype=np.uint8).view(dtype)
    if dtype.kind == "f":
        specials = _special_floats(dtype)[:size]
        flat[: len(specials)] = specials
    return flat.reshape(shape)


def assert_bits_equal(out: Any, ref: np.ndarray) -> None:
    assert type(out) is np.ndarray
    assert out.dtype == ref.dtype
    assert out.shape == ref.shape
    assert out.tobytes() == ref.tobytes()  # C-order bytes: NaN payloads and signs included


def noncanonical_bools() -> np.ndarray:
    """A bool array whose bytes are not all 0/1 (as from a raw buffer); NumPy treats nonzero as True."""
    return np.array([0, 1, 2, 255, 0, 128], dtype=np.uint8).view(np.bool_).reshape(2, 3)


# --- the NumPy path against the reference --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_numpy_encode_and_decode_equal_the_reference_bit_for_bit(dtype: Any) -> None:
    rng = np.random.default_rng(1234)
    for shape in SHAPES:
        x = random_array(rng, shape, dtype)
        for copies in COPIES:
            encoded = encode(x, copies)
            assert_bits_equal(encoded, encode_reference(x, copies))
            assert encoded.flags.c_contiguous and not np.shares_memory(encoded, x)
            assert_bits_equal(decode(encoded, copies), decode_reference(encoded, copies))
            assert_bits_equal(decode(encoded, copies), x)  # decode(encode(x)) == x
            # decode reads only the first copy: the others may hold anything
            other = random_array(rng, shape[:-1] + (shape[-1] * copies,), dtype)
            decoded = decode(other, copies)
            assert_bits_equal(decoded, decode_reference(other, copies))
            assert not np.shares_memory(decoded, other)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, shape, view", VIEWS, ids=[v[0] for v in VIEWS])
def test_numpy_path_on_non_contiguous_inputs(dtype: Any, name: str, shape: tuple[int, ...], view: Callable) -> None:
    rng = np.random.default_rng(99)
    x = view(np, random_array(rng, shape, dtype))
    for copies in COPIES:
        assert_bits_equal(encode(x, copies), encode_reference(x, copies))
        y = view(np, random_array(rng, shape[:-1] + (shape[-1] * copies,), dtype))
        if y.shape[-1] % copies == 0:
            assert_bits_equal(decode(y, copies), decode_reference(y, copies))
        encoded_view = view(np, encode_reference(random_array(rng, shape, dtype), copies))
        if encoded_view.shape[-1] % copies == 0:
            assert_bits_equal(decode(encoded_view, copies), decode_reference(encoded_view, copies))


def test_numpy_path_on_read_only_and_non_canonical_inputs() -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    x.setflags(write=False)  # as decoded from a message
    assert_bits_equal(encode(x, 2), encode_reference(x, 2))
    assert_bits_equal(decode(encode(x, 3), 3), x)
    odd = noncanonical_bools()
    for copies in (1, 3):
        assert_bits_equal(encode(odd, copies), encode_reference(odd, copies))
        assert_bits_equal(decode(odd, 1), decode_reference(odd, 1))
    assert encode(odd, 1).view(np.uint8).max() == 1  # logical NOT: canonical output


def test_numpy_path_accepts_array_likes_and_numpy_integer_copies() -> None:
    assert_bits_equal(encode([[1, 2], [3, 4]], np.int64(2)), encode_reference(np.array([[1, 2], [3, 4]]), 2))
    assert_bits_equal(decode([1.5, -2.0, 1.5, -2.0], 2), decode_reference(np.array([1.5, -2.0, 1.5, -2.0]), 2))


def test_the_hello_world_operators_use_this_reference_not_a_copy() -> None:
    spec = importlib.util.spec_from_file_location("hello_world_math", REPO / "operators/hello_world/math.py")
    assert spec is not None and spec.loader is not None
    math = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(math)
    assert (math.encode, math.decode, math.invert, math.check_input) == (
        encode_reference, decode_reference, hw.invert, hw.check_input
    )


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [encode, decode, encode_reference, decode_reference])
def test_bad_inputs_raise_bad_input_error(function: Callable) -> None:
    with pytest.raises(BadInputError, match=r"^input must have at least one dimension, got a scalar$"):
        function(np.array(3, dtype=np.int32), 1)
    with pytest.raises(BadInputError, match="at least one dimension"):
        function(np.float32(2.5), 1)
    for bad, name in [
        (np.array([1, "a"], dtype=object), "object"),
        (np.array([1 + 2j]), "complex128"),
        (np.array(["ab"]), "<U2"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
    ]:
        with pytest.raises(BadInputError, match=rf"^input must be an integer, float or bool tensor, got dtype {name}"):
            function(bad, 1)


@pytest.mark.parametrize("function", [decode, decode_reference])
def test_decode_needs_a_multiple_of_copies(function: Callable) -> None:
    with pytest.raises(BadInputError, match=r"^last dimension 5 is not a multiple of input_copies=2$"):
        function(np.zeros((3, 5), np.int16), 2)
    with pytest.raises(BadInputError, match="last dimension 1 is not a multiple of input_copies=3"):
        function(np.zeros(1, np.bool_), 3)


@pytest.mark.parametrize("copies", [0, -1, True, 2.0, "2", None])
@pytest.mark.parametrize("function", [encode, decode])
def test_copies_must_be_a_positive_integer(function: Callable, copies: Any) -> None:
    with pytest.raises(BadInputError, match=r"^input_copies must be an integer >= 1, got "):
        function(np.zeros(4, np.int8), copies)


# --- the CuPy kernels' source, run as host C++ -------------------------------------------------------

HOST_PRELUDE = r"""
#include <cstddef>
// Stand-in for CuPy's CArray: element ``idx`` in C order over shape and (byte) strides.
template <typename T> struct HostArray {
  T* data; int ndim; const long long* shape; const long long* strides;
  T& operator[](ptrdiff_t idx) const {
    ptrdiff_t diff = 0, i = idx;
    for (int d = ndim - 1; d > 0; --d) { diff += strides[d] * (i % shape[d]); i /= shape[d]; }
    diff += strides[0] * i;
    return *reinterpret_cast<T*>(reinterpret_cast<char*>(const_cast<void*>(static_cast<const void*>(data))) + diff);
  }
};
"""

HOST_INVERT = """
namespace {fn} {{
{preamble}
extern "C" void {fn}(const void* xp, int ndim, const long long* shape, const long long* xs, void* yp,
                     const long long* ys, long long size) {{
  const HostArray<const hw_uint> xa{{(const hw_uint*)xp, ndim, shape, xs}};
  const HostArray<hw_uint> ya{{(hw_uint*)yp, ndim, shape, ys}};
  for (ptrdiff_t i = 0; i < size; ++i) {{
    const hw_uint& x = xa[i];  // as CuPy binds non-raw parameters
    hw_uint& y = ya[i];
    {operation}
  }}
}}
}}
"""

HOST_ENCODE = """
namespace {fn} {{
{preamble}
extern "C" void {fn}(const void* xp, int ndim, const long long* shape, const long long* xs, {index} ncols,
                     {index} out_cols, int copies, bool one_row, void* yp, long long ysize, long long size) {{
  const HostArray<const hw_uint> x_in{{(const hw_uint*)xp, ndim, shape, xs}};
  const long long yshape[1] = {{ysize}};
  const long long ystrides[1] = {{(long long)sizeof(hw_uint)}};
  HostArray<hw_uint> y{{(hw_uint*)yp, 1, yshape, ystrides}};
  for (ptrdiff_t i = 0; i < size; ++i) {{
    {operation}
  }}
}}
}}
"""


def _host_key_name(key: tuple[str, np.dtype, bool]) -> str:
    op, dtype, wide = key
    return f"host_{op}_{dtype.name}{'_wide' if wide else ''}"


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """Every kernel source of hello_world, compiled for the host into one shared library."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler to run the kernel source on the host")
    parts = [HOST_PRELUDE]
    for dtype in map(np.dtype, DTYPES):
        source = hw._kernel_source("invert", dtype)
        parts.append(HOST_INVERT.format(fn=_host_key_name(("invert", dtype, False)), **source))
        for wide in (False, True):
            source = hw._kernel_source("encode", dtype, wide)
            index = "unsigned long long" if wide else "unsigned int"
            parts.append(HOST_ENCODE.format(fn=_host_key_name(("encode", dtype, wide)), index=index, **source))
    workdir = tmp_path_factory.mktemp("host_kernels")
    (workdir / "kernels.cpp").write_text("\n".join(parts))
    library = workdir / "kernels.so"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-Wall", "-shared", "-fPIC", "-o", str(library), "kernels.cpp"],
        cwd=workdir, check=True, capture_output=True,
    )  # fmt: skip
    return ctypes.CDLL(str(library))


def _ll(values: tuple[int, ...]) -> Any:
    return (ctypes.c_longlong * max(len(values), 1))(*values)


def _host_launch(lib: ctypes.CDLL, key: tuple[str, np.dtype, bool], args: tuple[Any, ...], size: int | None) -> None:
    function = getattr(lib, _host_key_name(key))
    if key[0] == "invert":
        x, y = args
        assert x.shape == y.shape and y.flags.c_contiguous
        function(
            ctypes.c_void_p(x.ctypes.data), x.ndim, _ll(x.shape), _ll(x.strides),
            ctypes.c_void_p(y.ctypes.data), _ll(y.strides), ctypes.c_longlong(x.size),
        )  # fmt: skip
        return
    x, ncols, out_cols, copies, one_row, y = args
    index = ctypes.c_uint64 if key[2] else ctypes.c_uint32
    assert y.ndim == 1 and y.flags.c_contiguous and size is not None
    function(
        ctypes.c_void_p(x.ctypes.data), x.ndim, _ll(x.shape), _ll(x.strides), index(ncols), index(out_cols),
        ctypes.c_int(copies), ctypes.c_bool(one_row), ctypes.c_void_p(y.ctypes.data), ctypes.c_longlong(y.size),
        ctypes.c_longlong(size),
    )  # fmt: skip


def host_encode(lib: ctypes.CDLL, x: np.ndarray, copies: int, wide: bool) -> np.ndarray:
    """encode as the CuPy path launches it (same plan), with the kernel source run on the host."""
    n = x.shape[-1]
    out = np.empty(x.shape[:-1] + (n * copies,), dtype=x.dtype)
    if x.size:
        key, args, size = hw._encode_plan(x, out, copies)
        if key[0] == "encode":
            key = (key[0], key[1], wide)
        _host_launch(lib, key, args, size)
    return out


def host_decode(lib: ctypes.CDLL, x: np.ndarray, copies: int) -> np.ndarray:
    first = x[..., : x.shape[-1] // copies]
    out = np.empty(first.shape, dtype=x.dtype)
    if first.size:
        key, args = hw._decode_plan(first, out)
        _host_launch(lib, key, args, None)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_source_on_the_host_equals_the_reference(host_kernels: ctypes.CDLL, dtype: Any) -> None:
    rng = np.random.default_rng(7)
    cases = [random_array(rng, shape, dtype) for shape in SHAPES]
    cases += [view(np, random_array(rng, shape, dtype)) for _, shape, view in VIEWS]
    if np.dtype(dtype).kind == "b":
        cases.append(noncanonical_bools())
    for x in cases:
        for copies in COPIES:
            reference = encode_reference(x, copies)
            for wide in (False, True):
                assert_bits_equal(host_encode(host_kernels, x, copies, wide), reference)
            assert_bits_equal(host_decode(host_kernels, reference, copies), decode_reference(reference, copies))
            if x.ndim >= 2:
                strided = np.swapaxes(reference, 0, -2)  # a non-contiguous input with whole copies
                assert_bits_equal(host_decode(host_kernels, strided, copies), decode_reference(strided, copies))


# --- xp: array modules and devices -----------------------------------------------------------------


@pytest.fixture
def fresh_gpu_cache() -> Any:
    gpu_available.cache_clear()
    yield
    gpu_available.cache_clear()


class FakeCupyArray:
    """Looks like a CuPy array to ``is_cupy_array`` (module name); DLPack behaviour configurable."""

    __module__ = "cupy._core.core"

    def __init__(self, host: np.ndarray, dlpack_to_cpu: bool):
        self.host, self.dlpack_to_cpu, self.got = host, dlpack_to_cpu, False

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA

    def __dlpack__(
        self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None
    ) -> Any:
        if self.dlpack_to_cpu and dl_device == (1, 0):
            return self.host.copy().__dlpack__(max_version=max_version)
        raise BufferError("cannot export to the CPU")

    def get(self) -> np.ndarray:
        self.got = True
        return self.host.copy()


class HostDLPack:
    """A CPU DLPack producer that is not a NumPy array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.array.__dlpack__(**kwargs)


def test_importing_the_kernels_does_not_import_cupy() -> None:
    code = (
        "import sys, numpy as np\n"
        "import pipeline_runner.kernels, pipeline_runner.kernels.hello_world as hw\n"
        "from pipeline_runner.kernels import array_module, to_device\n"
        "x = np.arange(6).reshape(2, 3)\n"
        "assert array_module(x) is np and to_device(x, 'cpu') is x\n"
        "assert (hw.decode(hw.encode(x, 3), 3) == x).all()\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_everything_works_without_cupy_installed(monkeypatch: pytest.MonkeyPatch, fresh_gpu_cache: None) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # ``import cupy`` raises ImportError
    assert gpu_available() is False
    x = np.arange(10, dtype=np.uint16)
    assert array_module(x) is np and array_module([1, 2]) is np
    assert to_device(x, "cpu") is x
    assert_bits_equal(decode(encode(x, 2), 2), x)
    with pytest.raises(RuntimeError, match="no CUDA device found by CuPy"):
        to_device(x, "gpu")


def test_gpu_available_is_false_and_quiet_without_a_device(fresh_gpu_cache: None) -> None:
    try:
        import cupy
    except ImportError:
        assert gpu_available() is False
        return
    try:
        has_device = bool(cupy.is_available())
    except Exception:
        has_device = False
    result = gpu_available()
    assert isinstance(result, bool)
    if not has_device:
        assert result is False
    assert gpu_available() is result  # cached


def _raises(error: Exception) -> Callable[[], Any]:
    def call() -> Any:
        raise error

    return call


def fake_cupy(is_available: Callable[[], bool], device_count: Callable[[], int] = lambda: 1) -> SimpleNamespace:
    runtime = SimpleNamespace(getDeviceCount=device_count)
    return SimpleNamespace(is_available=is_available, cuda=SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize(
    "fake",
    [
        fake_cupy(lambda: False),
        fake_cupy(_raises(RuntimeError("cudaErrorInsufficientDriver"))),
        fake_cupy(lambda: True, _raises(RuntimeError("cudaErrorNoDevice"))),
        fake_cupy(lambda: True, lambda: 0),
    ],
    ids=["not available", "is_available raises", "device count raises", "no devices"],
)
def test_gpu_available_never_raises(monkeypatch: pytest.MonkeyPatch, fresh_gpu_cache: None, fake: Any) -> None:
    monkeypatch.setattr(xp, "_cupy", lambda: fake)
    assert gpu_available() is False


def test_gpu_available_with_a_device(monkeypatch: pytest.MonkeyPatch, fresh_gpu_cache: None) -> None:
    monkeypatch.setattr(xp, "_cupy", lambda: fake_cupy(lambda: True, lambda: 2))
    assert gpu_available() is True


def test_array_module_picks_cupy_by_type_module(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = SimpleNamespace(name="cupy stand-in")
    monkeypatch.setattr(xp, "_cupy", lambda: sentinel)
    fake = FakeCupyArray(np.zeros(2), dlpack_to_cpu=True)
    assert is_cupy_array(fake) and array_module(fake) is sentinel
    assert not is_cupy_array(np.zeros(2)) and array_module(np.zeros(2)) is np
    assert array_module(3.0) is np and array_module(memoryview(b"ab")) is np


def test_to_device_cpu() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_device(x, "cpu") is x  # no copy
    assert_bits_equal(to_device([[1, 2], [3, 4]], "cpu"), np.array([[1, 2], [3, 4]]))
    via_dlpack = to_device(HostDLPack(x), "cpu")
    assert np.shares_memory(via_dlpack, x)  # a CPU DLPack producer: zero-copy
    device = FakeCupyArray(x, dlpack_to_cpu=True)
    assert_bits_equal(to_device(device, "cpu"), x)
    assert not device.got  # exported through DLPack
    device = FakeCupyArray(x, dlpack_to_cpu=False)
    assert_bits_equal(to_device(device, "cpu"), x)
    assert device.got  # fell back to .get()
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        to_device(x, "cuda")  # type: ignore[arg-type]


def test_to_device_gpu_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    fake_cupy = SimpleNamespace(
        asarray=lambda a: calls.append(("asarray", a)) or "copied",
        from_dlpack=lambda a: calls.append(("from_dlpack", a)) or "imported",
    )
    monkeypatch.setattr(xp, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(xp, "gpu_available", lambda: True)
    x = np.arange(3)
    assert to_device(x, "gpu") == "copied"  # CuPy refuses CPU DLPack producers: cupy.asarray
    assert calls[-1][0] == "asarray" and calls[-1][1] is x
    on_device = FakeCupyArray(x, dlpack_to_cpu=False)
    assert to_device(on_device, "gpu") is on_device  # already there
    other_gpu_library = SimpleNamespace(__dlpack_device__=lambda: (2, 0), __dlpack__=lambda **kw: None)
    assert to_device(other_gpu_library, "gpu") == "imported"  # CUDA DLPack producer: zero-copy
    monkeypatch.setattr(xp, "gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device found by CuPy"):
        to_device(x, "gpu")


def test_kernels_are_built_once_per_op_and_dtype() -> None:
    pytest.importorskip("cupy", reason="CuPy is not installed")
    first = hw._kernel("encode", np.dtype(np.float16))
    assert hw._kernel("encode", np.dtype("float16")) is first
    assert hw._kernel("encode", np.dtype(np.int16)) is not first
    assert hw._kernel("invert", np.dtype(np.bool_)).name == "hello_world_invert_bool"
    assert hw._kernel("encode", np.dtype(np.int8), True).name == "hello_world_encode_int8_wide"


# --- GPU ---------------------------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA device found by CuPy")


def assert_device_bits_equal(out: Any, ref: np.ndarray) -> None:
    import cupy

    assert isinstance(out, cupy.ndarray)  # stays on the device
    assert out.flags.c_contiguous
    assert_bits_equal(cupy.asnumpy(out), ref)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cupy_kernels_equal_the_numpy_twin_bit_for_bit(dtype: Any) -> None:
    import cupy

    rng = np.random.default_rng(1234)
    for shape in SHAPES:
        x = random_array(rng, shape, dtype)
        on_device = cupy.asarray(x)
        for copies in COPIES:
            reference = encode_reference(x, copies)
            encoded = encode(on_device, copies)
            assert_device_bits_equal(encoded, reference)
            assert_device_bits_equal(decode(encoded, copies), x)
            other = random_array(rng, shape[:-1] + (shape[-1] * copies,), dtype)
            assert_device_bits_equal(decode(cupy.asarray(other), copies), decode_reference(other, copies))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, shape, view", VIEWS, ids=[v[0] for v in VIEWS])
def test_cupy_kernels_on_non_contiguous_inputs(dtype: Any, name: str, shape: tuple[int, ...], view: Callable) -> None:
    import cupy

    rng = np.random.default_rng(99)
    base = random_array(rng, shape, dtype)
    x, x_device = view(np, base), view(cupy, cupy.asarray(base))
    assert x.strides == x_device.strides
    for copies in COPIES:
        assert_device_bits_equal(encode(x_device, copies), encode_reference(x, copies))
        wide = random_array(rng, shape[:-1] + (shape[-1] * copies,), dtype)
        y, y_device = view(np, wide), view(cupy, cupy.asarray(wide))
        if y.shape[-1] % copies == 0:
            assert_device_bits_equal(decode(y_device, copies), decode_reference(y, copies))


@pytest.mark.gpu
@requires_gpu
def test_cupy_kernels_on_larger_arrays_and_odd_bools() -> None:
    import cupy

    rng = np.random.default_rng(3)
    cases = [
        (np.int32, ((1 << 20) + 3,)), (np.float16, (257, 1031)), (np.uint8, (3, 5, 4099)), (np.float64, (70000, 3)),
    ]  # fmt: skip
    for dtype, shape in cases:
        x = random_array(rng, shape, dtype)
        for copies in (1, 2, 5):
            reference = encode_reference(x, copies)
            assert_device_bits_equal(encode(cupy.asarray(x), copies), reference)
            assert_device_bits_equal(decode(cupy.asarray(reference), copies), x)
    odd = noncanonical_bools()
    for copies in (1, 3):
        assert_device_bits_equal(encode(cupy.asarray(odd), copies), encode_reference(odd, copies))
    assert_device_bits_equal(decode(cupy.asarray(odd), 1), decode_reference(odd, 1))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.int8, np.float32, np.bool_], ids=["int8", "float32", "bool"])
def test_cupy_wide_index_kernel_on_small_arrays(dtype: Any) -> None:
    """The 64-bit-index variant (normally only for outputs of 2**32 elements or more)."""
    import cupy

    rng = np.random.default_rng(11)
    for shape in [(9,), (4, 7), (2, 3, 5)]:
        base = random_array(rng, shape, dtype)
        for x, x_device in [(base, cupy.asarray(base)), (base.T, cupy.asarray(base).T)]:
            for copies in (2, 3):
                out = cupy.empty(x.shape[:-1] + (x.shape[-1] * copies,), dtype=x.dtype)
                key, args, size = hw._encode_plan(x_device, out, copies)
                hw._kernel(key[0], key[1], True)(*args, size=size)
                assert_device_bits_equal(out, encode_reference(x, copies))


def _device_random_bytes(n: int) -> Any:
    """``n`` device bytes: a random block of prime length tiled (no multi-GiB host buffer)."""
    import cupy

    block = cupy.asarray(np.random.default_rng(0).integers(0, 256, 1_000_003, dtype=np.uint8))
    out = cupy.empty(n, dtype=cupy.uint8)
    full = n // block.size
    out[: full * block.size].reshape(full, block.size)[...] = block
    out[full * block.size :] = block[: n - full * block.size]
    return out


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shape, copies", [((2**31 + 5,), 2), ((2, 2**30 + 3), 3)], ids=["1-D", "2-D"])
def test_cupy_encode_beyond_32_bit_indices(shape: tuple[int, ...], copies: int) -> None:
    import cupy

    needed = int(np.prod(shape)) * (1 + copies) + (1 << 30)
    if cupy.cuda.Device().mem_info[0] < needed:
        pytest.skip(f"needs {needed >> 30} GiB of free device memory")
    x = _device_random_bytes(int(np.prod(shape))).view(cupy.int8).reshape(shape)
    out = encode(x, copies)
    assert out.shape == shape[:-1] + (shape[-1] * copies,) and out.size >= 2**32
    n, width = shape[-1], shape[-1] * copies
    rng = np.random.default_rng(0)
    columns = np.unique(np.concatenate([
        np.arange(0, 4096), np.arange(n - 4096, n + 4096), np.arange(width - 4096, width),
        rng.integers(0, width, 100_000),
    ]))  # fmt: skip
    for row in range(int(np.prod(shape[:-1]))):
        got = cupy.asnumpy(out.reshape(-1, width)[row, cupy.asarray(columns)])
        want = np.invert(cupy.asnumpy(x.reshape(-1, n)[row, cupy.asarray(columns % n)]))
        assert got.tobytes() == want.tobytes()
    del out
    decoded = decode(encode(x[..., : 1 << 20], copies), copies)
    assert bool((decoded == x[..., : 1 << 20]).all())


@pytest.mark.gpu
@requires_gpu
def test_cupy_bad_inputs() -> None:
    import cupy

    with pytest.raises(BadInputError, match="at least one dimension"):
        encode(cupy.asarray(np.array(3, np.int32)), 2)
    with pytest.raises(BadInputError, match="got dtype complex64"):
        encode(cupy.zeros(4, cupy.complex64), 2)
    with pytest.raises(BadInputError, match="last dimension 5 is not a multiple of input_copies=2"):
        decode(cupy.zeros((2, 5), cupy.int32), 2)


@pytest.mark.gpu
@requires_gpu
def test_to_device_round_trips_on_a_gpu() -> None:
    import cupy

    assert gpu_available() is True
    x = random_array(np.random.default_rng(2), (4, 6), np.float16)
    on_device = to_device(x, "gpu")
    assert isinstance(on_device, cupy.ndarray) and is_cupy_array(on_device) and array_module(on_device) is cupy
    assert to_device(on_device, "gpu") is on_device
    assert_bits_equal(to_device(on_device, "cpu"), x)
    assert_bits_equal(to_device(on_device.T, "cpu"), x.T.copy())
    assert_bits_equal(to_device(on_device[:, ::2], "cpu"), np.ascontiguousarray(x[:, ::2]))
    assert_bits_equal(to_device(cupy.asarray([True, False]), "cpu"), np.array([True, False]))
