"""hello_world kernels on the GPU: achieved memory bandwidth against a plain device copy.

For inputs of 1 MiB ... 1 GiB (powers of 4) of int32 and float16 (1-D, or ``--rows`` rows):

- encode (``--copies`` C): reads the S input bytes once, writes C*S bytes;
- decode (C) of an S-byte input: reads the first copy (S/C bytes), writes S/C bytes;
- copy: a plain device-to-device copy moving the same number of bytes (B read + B written), the
  practical limit: the faster of ``cupy.copyto`` (CuPy's copy kernel) and ``cudaMemcpyAsync``.

GB/s = (bytes read + bytes written) / time, 1 GB = 1e9 bytes. Each timing is the median over
``--repeats`` batches, after a warm-up call (which compiles the kernel), of a batch of calls
between two CUDA events (enough calls for about 2 ms of GPU time), divided by the batch size. A
call is what the hot path pays: output allocation from CuPy's pool plus the kernel launch, so small
sizes are bound by launch overhead rather than memory. Every dtype is first checked bit for bit
against the NumPy reference.

Without a GPU it says so in one line and exits 0. ``--numpy`` adds the NumPy path's timings
(``time.perf_counter``, sizes up to ``--numpy-max-size``) in a separate table, on any machine.

    python benchmarks/kernels.py [--max-size 1073741824] [--copies 2] [--rows 1] [--repeats 20]
                                 [--numpy] [--numpy-max-size 67108864] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline_runner.kernels import gpu_available
from pipeline_runner.kernels.hello_world import decode, decode_reference, encode, encode_reference

DTYPES = (np.int32, np.float16)
BATCH_SECONDS = 2e-3
NUMPY_MIN_SECONDS = 0.2


def _sizes(max_size: int, start: int = 1 << 20) -> list[int]:
    sizes, n = [], start
    while n <= max_size:
        sizes.append(n)
        n *= 4
    return sizes


def _human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _shape(n: int, rows: int, multiple: int) -> tuple[int, ...]:
    """``rows`` rows (1: a 1-D array) whose length is a multiple of ``multiple``; at most n elements."""
    columns = (n // rows) // multiple * multiple
    return (columns,) if rows == 1 else (rows, columns)


def gpu_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median seconds per call, from CUDA events around batches of calls (after a warm-up)."""
    import cupy

    call()  # warm-up: compiles the kernel, fills the memory pool
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    call()
    end.record()
    end.synchronize()
    once = cupy.cuda.get_elapsed_time(start, end) / 1e3
    calls = max(1, min(1000, int(BATCH_SECONDS / max(once, 1e-7))))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls)
    return float(np.median(samples))


def _device_bytes(nbytes: int) -> Any:
    """``nbytes`` (a multiple of 4) of scrambled device bytes."""
    import cupy

    words = cupy.arange(nbytes // 4, dtype=cupy.uint32)
    words *= np.uint32(2654435761)  # wraps: a cheap hash of the index
    return words.view(cupy.uint8)


def check_gpu_kernels(copies: int) -> None:
    """Every benchmarked dtype bit for bit against the NumPy reference (small arrays)."""
    import cupy

    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        x = rng.integers(0, 256, size=3 * 1000 * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype).reshape(3, 1000)
        got = cupy.asnumpy(encode(cupy.asarray(x), copies))
        if got.tobytes() != encode_reference(x, copies).tobytes():
            sys.exit(f"encode on the GPU differs from the NumPy reference for {np.dtype(dtype).name}")
        back = cupy.asnumpy(decode(cupy.asarray(got), copies))
        if back.tobytes() != decode_reference(got, copies).tobytes():
            sys.exit(f"decode on the GPU differs from the NumPy reference for {np.dtype(dtype).name}")


def measure_gpu(sizes: list[int], copies: int, rows: int, repeats: int) -> list[dict[str, Any]]:
    import cupy

    copy_cache: dict[int, float] = {}

    def copy_gb_s(moved: int) -> float:
        """Device copy of moved/2 bytes (so it moves ``moved`` bytes): the faster of two ways."""
        nbytes = moved // 2
        if nbytes not in copy_cache:
            src, dst = _device_bytes(nbytes // 4 * 4), cupy.empty(nbytes // 4 * 4, dtype=cupy.uint8)
            kernel = gpu_seconds(lambda: cupy.copyto(dst, src), repeats)
            memcpy = gpu_seconds(lambda: dst.data.copy_from_device_async(src.data, src.nbytes), repeats)
            copy_cache[nbytes] = 2 * src.nbytes / min(kernel, memcpy) / 1e9
            del src, dst
        return copy_cache[nbytes]

    results = []
    for dtype in map(np.dtype, DTYPES):
        for size in sizes:
            raw = _device_bytes(size).view(dtype)
            for op in ("encode", "decode"):
                x = raw[: int(np.prod(shape := _shape(raw.size, rows, copies if op == "decode" else 1)))].reshape(shape)
                if op == "encode":
                    moved = x.nbytes * (1 + copies)
                    seconds = gpu_seconds(lambda: encode(x, copies), repeats)
                else:
                    moved = 2 * x.nbytes // copies
                    seconds = gpu_seconds(lambda: decode(x, copies), repeats)
                gb_s = moved / seconds / 1e9
                copy = copy_gb_s(moved)
                results.append({
                    "op": op, "dtype": dtype.name, "size_bytes": size, "shape": list(x.shape),
                    "bytes_moved": moved, "seconds": seconds, "gb_s": gb_s, "copy_gb_s": copy,
                    "fraction_of_copy": gb_s / copy,
                })  # fmt: skip
            del raw
            cupy.get_default_memory_pool().free_all_blocks()
    return results


def measure_numpy(sizes: list[int], copies: int, rows: int) -> list[dict[str, Any]]:
    """The NumPy path of encode / decode and np.copyto, timed with perf_counter."""

    def seconds(call: Callable[[], Any]) -> float:
        call()
        samples = []
        while sum(samples) < NUMPY_MIN_SECONDS or len(samples) < 5:
            started = time.perf_counter()
            call()
            samples.append(time.perf_counter() - started)
        return float(np.median(samples))

    results = []
    for dtype in map(np.dtype, DTYPES):
        for size in sizes:
            raw = np.frombuffer(np.random.default_rng(0).bytes(size), dtype=dtype)
            for op in ("encode", "decode"):
                x = raw[: int(np.prod(shape := _shape(raw.size, rows, copies if op == "decode" else 1)))].reshape(shape)
                moved = x.nbytes * (1 + copies) if op == "encode" else 2 * x.nbytes // copies
                t = seconds((lambda: encode(x, copies)) if op == "encode" else (lambda: decode(x, copies)))
                src = np.ones(moved // 2, np.uint8)
                dst = np.empty_like(src)
                copy = 2 * src.nbytes / seconds(lambda: np.copyto(dst, src)) / 1e9
                gb_s = moved / t / 1e9
                results.append({
                    "op": op, "dtype": dtype.name, "size_bytes": size, "shape": list(x.shape), "bytes_moved": moved,
                    "seconds": t, "gb_s": gb_s, "copy_gb_s": copy, "fraction_of_copy": gb_s / copy,
                })  # fmt: skip
    return results


def print_table(title: str, results: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for name in ("op", "dtype", "size", "GB/s", "copy GB/s", "fraction of copy"):
        table.add_column(name, justify="left" if name in ("op", "dtype") else "right")
    for r in results:
        table.add_row(
            r["op"], r["dtype"], _human(r["size_bytes"]),
            f"{r['gb_s']:.1f}", f"{r['copy_gb_s']:.1f}", f"{r['fraction_of_copy']:.2f}",
        )  # fmt: skip
    Console(width=160).print(table)


def _device_description() -> str:
    import cupy

    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    description = f"{name}, CuPy {cupy.__version__}"
    try:  # theoretical DRAM bandwidth: 2 (DDR) x memory clock x bus width
        clock_khz = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMemoryClockRate, device.id)
        bus_bits = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrGlobalMemoryBusWidth, device.id)
        description += f", DRAM peak {2 * clock_khz * 1e3 * bus_bits / 8 / 1e9:.0f} GB/s"
    except Exception:
        pass
    return description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-size", type=int, default=1 << 30, help="largest input, bytes (default 1 GiB)")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="rows of the input (1: 1-D); >1 exercises the row path")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--numpy", action="store_true", help="also time the NumPy path")
    parser.add_argument("--numpy-max-size", type=int, default=64 << 20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.copies < 1 or args.rows < 1:
        parser.error("--copies and --rows must be >= 1")

    report: dict[str, Any] = {"copies": args.copies, "rows": args.rows, "gpu": None, "numpy": None}
    if gpu_available():
        check_gpu_kernels(args.copies)
        report["device"] = _device_description()
        report["gpu"] = measure_gpu(_sizes(args.max_size), args.copies, args.rows, args.repeats)
        print_table(
            f"hello_world kernels on {report['device']}: GB/s (read + written), copies={args.copies}, "
            f"rows={args.rows}, median of {args.repeats}",
            report["gpu"],
        )
    else:
        print("no CUDA device found by CuPy: GPU kernel benchmark skipped")
    if args.numpy:
        report["numpy"] = measure_numpy(_sizes(args.numpy_max_size), args.copies, args.rows)
        print_table(f"NumPy path for reference: GB/s (read + written), copies={args.copies}", report["numpy"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
