"""The ``runner`` command as a user runs it: real subprocesses, real deployments."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from pipeline_runner.schema import SCHEMA_PATH
from pipeline_runner.state import DeploymentState, is_running, state_file

from .conftest import REPO_ROOT, interrupt

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
HELLO_WORLD = REPO_ROOT / "deployments" / "hello_world.yaml"  # Triton encoder and decoder
HELLO_WORLD_PYTHON = REPO_ROOT / "deployments" / "hello_world_python.yaml"


def runner(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUNNER, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kwargs
    )


def _wait_for_state(name: str, proc: subprocess.Popen[str], timeout_s: float = 60) -> DeploymentState:
    deadline = time.monotonic() + timeout_s
    path = state_file(name)
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"runner deploy exited early:\n{proc.communicate()[1]}"
        if path.exists():
            return DeploymentState.model_validate_json(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


@contextmanager
def deployed(file: Path = HELLO_WORLD, name: str = "hello_world") -> Iterator[tuple[subprocess.Popen[str], DeploymentState]]:
    """``runner deploy FILE`` in the background, stopped with Ctrl-C (SIGINT) afterwards."""
    proc = subprocess.Popen(
        [*RUNNER, "deploy", str(file)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, _wait_for_state(name, proc)
    finally:
        if proc.poll() is None:
            interrupt(proc)


def test_deploy_then_client_gets_every_response_right() -> None:
    with deployed() as (proc, state):
        result = runner("client", "--requests", "100", "--concurrency", "8", "--json", "/dev/stdout")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "100/100" in result.stdout
        for metric in ("throughput", "latency p50", "latency p90", "latency p99", "latency max"):
            assert metric in result.stdout
        summary = json.loads(result.stdout[result.stdout.index("{") :])
        assert summary["ok"] == 100 and summary["failed"] == 0 and summary["timed_out"] == 0
        assert summary["latency_ms"]["p50"] > 0
        assert state.nats_url.startswith("nats://127.0.0.1:")


def test_client_can_be_pointed_at_the_nats_url_explicitly() -> None:
    with deployed(HELLO_WORLD_PYTHON, "hello_world_python") as (proc, state):
        result = runner(
            "client", "--nats", state.nats_url, "--deployment", "hello_world_python",
            "--requests", "20", "--size", "10", "--dtype", "float64", "--param", "input_copies=5",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + result.stdout
        assert "20/20" in result.stdout


def _one_operator_file(tmp_path: Path, name: str, operator: str, implementation: str) -> Path:
    """A deployment file with one operator from tests/fixture_operators."""
    file = tmp_path / f"{name}.yaml"
    file.write_text(
        f"name: {name}\n"
        f"working_dir: {REPO_ROOT / 'tests'}\n"
        "operators:\n"
        f"  - name: {operator}\n"
        f"    implementation: fixture_operators.{implementation}\n"
    )
    return file


def test_client_reports_wrong_answers_and_exits_non_zero(tmp_path: Path) -> None:
    file = _one_operator_file(tmp_path, "wrong", "encoder_decoder", "echo:WrongAnswer")
    with deployed(file, "wrong"):
        result = runner("client", "--requests", "10")
    assert result.returncode == 1
    assert "0/10" in result.stdout
    assert "output differs from the input" in result.stdout


def test_client_names_the_operators_when_asked_for_one_the_deployment_lacks() -> None:
    with deployed():
        result = runner("client", "--operator", "encodr", "--requests", "1", timeout=30)
    assert result.returncode == 1
    assert "has no operator 'encodr'" in result.stderr
    assert "decoder, encoder, encoder_decoder" in result.stderr


def test_client_without_a_running_deployment_says_how_to_start_one() -> None:
    result = runner("client", "--requests", "1")
    assert result.returncode == 1
    assert "no running deployment found" in result.stderr
    assert "runner deploy" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_every_process_the_deployment_started() -> None:
    with deployed() as (proc, state):
        children = psutil.Process(proc.pid).children(recursive=True)
        worker_pids = {w.pid for w in state.workers}
        assert len(worker_pids) == 6 and None not in worker_pids
        assert worker_pids | {state.nats_pid} <= {c.pid for c in children}
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.returncode == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert not state_file("hello_world").exists()


def test_killing_the_deploy_process_takes_its_workers_down_too() -> None:
    with deployed() as (proc, state):
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        assert not any(is_running(w.pid) for w in state.workers if w.pid)


def test_deploy_reports_a_worker_that_cannot_start_and_exits(tmp_path: Path) -> None:
    file = _one_operator_file(tmp_path, "broken", "bad", "bad_setup:BadSetup")
    result = runner("deploy", str(file), timeout=60)
    assert result.returncode == 1
    assert "worker bad.0 failed to start: RuntimeError: model weights not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_accepts_hello_world() -> None:
    result = runner("validate", str(HELLO_WORLD))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "hello_world" in result.stdout


def test_validate_rejects_a_bad_file_with_exit_code_2(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("name: x\noperators:\n  - name: a\n    implementation: m:C\n    workers: two\n")
    result = runner("validate", str(file))
    assert result.returncode == 2
    assert "bad.yaml:5: operators[0].workers: must be an integer >= 1, got \"two\"" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_prints_the_published_schema() -> None:
    result = runner("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == json.loads(SCHEMA_PATH.read_text())


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "runner"
    assert script.exists(), "pip install -e . must install the 'runner' command"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("deploy", "client", "validate", "schema"):
        assert command in result.stdout


def test_client_with_tensors_above_the_inline_threshold_gets_every_response_right() -> None:
    with deployed():
        # 200 000 int32 = 800 KB per input, 2.4 MB after the encoder: all over the data plane.
        result = runner("client", "--requests", "100", "--size", "200000", "--concurrency", "4")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "100/100" in result.stdout


def test_status_lists_the_running_deployment_and_its_workers_counters() -> None:
    with deployed():
        assert runner("client", "--requests", "20").returncode == 0
        result = runner("status", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "hello_world: pid" in result.stdout and "6/6 workers" in result.stdout
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    for worker in ("encoder.0", "encoder.1", "decoder.0", "decoder.1", "encoder_decoder.0", "encoder_decoder.1"):
        cells = [cell.strip() for cell in rows[worker].split("│")[1:-1]]
        assert cells[1] == socket.gethostname()  # host
        assert cells[2].isdigit()  # pid
        assert cells[4] == "0"  # restarts: known for this host's workers
