"""Soak (issue 17): the leveling judgement of benchmarks/soak.py, and a short run of it.

The full 20-minute run is a benchmark (numbers in benchmarks/RESULTS.md, "Hostile conditions");
here a run of about 20 seconds must judge every series level, answer every request correctly
and drain every store and queue afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import REPO_ROOT

SOAK = REPO_ROOT / "benchmarks" / "soak.py"


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


soak = _soak_module()


def _series(values: list[float], every_s: float = 5.0) -> list[tuple[float, float]]:
    return [(i * every_s, v) for i, v in enumerate(values)]


def test_a_series_that_rises_then_stays_flat_levels_off() -> None:
    warm_then_flat = [60.0, 70.0, 78.0] + [80.0 + (i % 3) * 0.5 for i in range(40)]
    verdict = soak.judge("rss_mib:encoder.0", _series(warm_then_flat), warmup_s=15.0)
    assert not verdict.grows, verdict


def test_a_series_that_keeps_rising_is_judged_growing() -> None:
    # 1 MiB a minute: after 20 minutes, far past any allocator noise.
    leaking = [80.0 + i * 5.0 / 60.0 for i in range(240)]
    verdict = soak.judge("rss_mib:encoder.0", _series(leaking), warmup_s=60.0)
    assert verdict.grows, verdict
    assert verdict.slope_last_per_min == pytest.approx(1.0, rel=0.01)


def test_spikes_of_in_flight_work_do_not_count_as_growth() -> None:
    # A queue that empties between bursts: the maxima differ, the medians do not.
    bursts = [0.0, 1.0, 2.0, 60.0, 1.0, 0.0] * 10 + [0.0, 1.0, 300.0]
    verdict = soak.judge("stream_msgs:PR_x", _series(bursts), warmup_s=0.0)
    assert not verdict.grows, verdict


def test_a_queue_that_never_drains_is_judged_growing() -> None:
    stuck = [float(i * 3) for i in range(40)]  # 3 requests left behind per sample
    verdict = soak.judge("stream_msgs:PR_x", _series(stuck), warmup_s=0.0)
    assert verdict.grows, verdict


@pytest.mark.slow
def test_hello_world_for_20_seconds_levels_off_answers_everything_and_drains(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable, str(SOAK), "--minutes", "0.35", "--sample-s", "2", "--warmup-s", "6",
            "--rate", "50", "--json", str(report_path), "--csv", str(tmp_path / "soak.csv"), "--quiet",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert report["ok"] and report["levels_off"] and not report["growing"]
    load = report["load"]
    assert load["sent"] >= 700  # 50 req/s for 21 s, less what a busy machine delays
    assert (load["ok"], load["lost"], load["wrong"], load["failed"], load["timed_out"]) == (load["sent"], 0, 0, 0, 0)
    assert report["not_drained"] == {}
    series = {v["series"].split(":", 1)[0] for v in report["verdicts"]}
    assert series >= {"rss_mib", "fds", "tasks", "stored_tensors", "stream_msgs", "unfinished"}
    assert "levels off" in run.stdout
    assert (tmp_path / "soak.csv").read_text().startswith("t_s,")
