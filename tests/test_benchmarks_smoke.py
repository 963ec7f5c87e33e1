"""The benchmarks run end to end: a short run of each writes every row it promises."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_hop_quick_run_measures_every_row_and_leaves_no_process_behind(tmp_path: Path) -> None:
    out = tmp_path / "hop.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "hop.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())

    expected = {
        "raw_rr", "raw_js_rr", "raw_chain", "raw_js_chain", "echo",
        "hello_world", "hello_world_amo", "hello_world_asyncio", "hello_world_no_metrics", "runner_client",
    }  # fmt: skip
    if importlib.util.find_spec("uvloop") is not None:
        expected |= {"raw_rr_uvloop", "raw_chain_uvloop", "hello_world_uvloop"}
    assert set(report["rows"]) == expected
    for key, by_concurrency in report["rows"].items():
        assert set(by_concurrency) == {"1", "8"}, key
        for concurrency, row in by_concurrency.items():
            where = f"{key} at {concurrency} in flight"
            assert min(row["requests"]) > 0, where
            assert row["req_per_s"] > 0, where
            assert 0 < row["p50_ms"] <= row["p99_ms"], where
            assert row["cpu_us_per_request"] > 0, where
            assert row["cpu_us_by_process"]["caller"] >= 0, where
            assert "nats-server" in row["cpu_us_by_process"], where
    assert {r["what"] for r in report["ratios"]} >= {
        "echo req/s / raw request/reply req/s",
        "hello_world req/s / raw 3-hop chain req/s",
    }
    assert "one hop" in run.stdout  # the table was printed
    assert len(report["pids"]) > 20  # nats-server, raw responders, workers, callers
    assert not [pid for pid in report["pids"] if _alive(pid)]


@pytest.mark.slow
def test_hop_large_short_run_measures_every_row_and_leaves_no_process_behind(tmp_path: Path) -> None:
    out = tmp_path / "hop_large.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "hop_large.py"), "--concurrency", "1", "4", "--size", "262144",
         "--requests", "8", "--max-seconds", "1", "--warmup", "1", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"raw_floor", "hello_world", "hello_world_ungated"}
    for key, by_concurrency in report["rows"].items():
        assert set(by_concurrency) == {"1", "4"}, key
        for concurrency, row in by_concurrency.items():
            where = f"{key} at {concurrency} in flight"
            assert min(row["requests"]) > 0, where
            assert 0 < row["p50_ms"] <= row["p99_ms"], where
            assert row["cpu_us_per_request"] > 0, where
            # /proc counts CPU in 10 ms ticks: a caller of 8 requests may not reach one.
            assert row["cpu_us_by_process"]["caller"] >= 0, where
    assert "hello_world req/s / floor req/s" in {r["what"] for r in report["ratios"]}
    assert "large tensors" in run.stdout  # the table was printed
    assert len(report["pids"]) > 10  # nats-server, raw stages, workers, callers
    assert not [pid for pid in report["pids"] if _alive(pid)]

def test_batching_quick_run_measures_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "batching.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"off", "wait_1", "wait_5", "wait_10"}
    for key, by_concurrency in report["rows"].items():
        assert set(by_concurrency) == {"1", "8"}, key
        for row in by_concurrency.values():
            assert row["req_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], key
            assert row["cpu_us_per_request"] > 0, key
    assert report["rows"]["off"]["8"]["mean_batch"] == 1.0  # batching off never batches
    assert report["rows"]["wait_10"]["8"]["mean_batch"] > 1.0  # 8 in flight within 10 ms do
    assert "dynamic batching" in run.stdout


def test_tensor_codec_compares_two_checkouts_step_by_step(tmp_path: Path) -> None:
    out = tmp_path / "codec.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tensor_codec.py"), "--compare", str(REPO_ROOT),
         "--repeat", "2000", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    medians = json.loads(out.read_text())["medians_us"]
    for checkout in ("this", "compare"):
        assert set(medians[checkout]) == {"encode_inline_tensors", "tensor_bytes", "inline_array"}
        assert all(0 < us < 1000 for us in medians[checkout].values())
