"""Crafted deployment files and oversized declarations: a clear answer at once, never a hang.

`runner validate` and `runner deploy` as a user runs them (real subprocesses), and the host
capacity bound with the host's resources given.
"""

from __future__ import annotations

import json
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_runner.capacity import (
    MIN_WORKER_BOUND,
    TRITON_SERVER_MEMORY_BYTES,
    WORKER_MEMORY_BYTES,
    HostResources,
    HostShare,
    capacity_problems,
    default_max_request_bytes,
)
from pipeline_runner.config import DeploymentConfig
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.errors import OperatorError, ProtocolError, RequestTooLargeError
from pipeline_runner.protocol import (
    MAGIC,
    RemoteTensor,
    RequestHeader,
    ResponseHeader,
    decode_response,
    encode_message,
)
from pipeline_runner.request_plane import operator_subject
from pipeline_runner.state import state_file
from pipeline_runner.tensor import check_request_size

from .conftest import REPO_ROOT, connected, make_config, op, running

RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]
HELLO_WORLD_PYTHON = REPO_ROOT / "deployments" / "hello_world_python.yaml"
# Only against a hang: these commands answer in about a second (most of it imports).
HANG_GUARD_S = 60


def runner(*args: str, timeout: float = HANG_GUARD_S, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([*RUNNER, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kwargs)


def write(tmp_path: Path, text: str, name: str = "crafted.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"name: crafted\nworking_dir: {REPO_ROOT}\n{text}")
    return path


ENCODER = "operators.hello_world.encoder:Encoder"

# --- billion laughs ----------------------------------------------------------------------------

LAUGHS = (
    "operators:\n"
    f"  - name: encoder\n    implementation: {ENCODER}\n    parameters:\n"
    '      l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    + "".join(f"      l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]\n" for n in range(1, 9))
)


@pytest.mark.parametrize("command", ["validate", "deploy"])
def test_a_billion_laughs_file_is_refused_at_once_naming_the_line(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, LAUGHS)
    result = runner(command, str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{path}:12:"), result.stderr  # the line of level 5
    assert "aliases expand to more than 100000 nodes" in result.stderr
    assert "Traceback" not in result.stderr


def test_merge_keys_sharing_an_operators_settings_still_validate(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
operators:
  - &defaults
    name: encoder
    implementation: {ENCODER}
    max_inflight_requests: 8
    parameters: {{input_copies: 3}}
  - <<: *defaults
    name: encoder_b
""")
    result = runner("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "encoder×1, encoder_b×1" in result.stdout


# --- validate says what deploy says ------------------------------------------------------------

NOT_DEPLOYABLE = {
    "a non-Python file": (
        "operators:\n  - name: encoder\n    implementation: /etc/passwd:X\n",
        "crafted.yaml:5: operators[0].implementation: must name a Python file (.py): /etc/passwd is not one",
    ),
    "a missing module": (
        "operators:\n  - name: encoder\n    implementation: operators.nope:X\n",
        f"crafted.yaml:5: operators[0].implementation: cannot find module 'operators.nope' under {REPO_ROOT}",
    ),
    "a missing class": (
        "operators:\n  - name: encoder\n    implementation: operators.hello_world.encoder:Nope\n",
        "crafted.yaml:5: operators[0].implementation: module 'operators.hello_world.encoder' defines no 'Nope'",
    ),
    "an inline threshold above the NATS max payload": (
        f"data_plane: {{inline_threshold_bytes: 2097152}}\noperators:\n  - name: encoder\n    implementation: {ENCODER}\n",
        "crafted.yaml:3: data_plane.inline_threshold_bytes: must be at most 983040",
    ),
    "a missing Triton repository": (
        "operators:\n  - name: encoder\n    kind: triton\n    repository: no/such/models\n",
        f"crafted.yaml:6: operators[0].repository: cannot find Triton model repository {REPO_ROOT / 'no/such/models'}",
    ),
}


@pytest.mark.parametrize("case", list(NOT_DEPLOYABLE))
def test_validate_reports_what_deploy_would_reject_the_same_way(tmp_path: Path, case: str) -> None:
    text, expected = NOT_DEPLOYABLE[case]
    path = write(tmp_path, text)
    validated, deployed = runner("validate", str(path)), runner("deploy", str(path))
    assert validated.returncode == deployed.returncode == 2
    assert validated.stderr == deployed.stderr
    assert validated.stderr.startswith(f"{tmp_path}/{expected}"), validated.stderr
    assert not state_file("crafted").exists()  # deploy started nothing


# --- worker counts against the host --------------------------------------------------------------


def test_a_hundred_thousand_workers_validate_with_a_warning_and_are_not_deployed(tmp_path: Path) -> None:
    path = write(tmp_path, f"operators:\n  - name: encoder\n    implementation: {ENCODER}\n    workers: 100000\n")
    validated = runner("validate", str(path))
    assert validated.returncode == 0, validated.stderr
    assert "OK" in validated.stdout
    assert validated.stderr.startswith(
        f"warning: {path}:6: operators[0].workers: 100000 workers on this host (encoder×100000) exceed its bound of"
    ), validated.stderr
    deployed = runner("deploy", str(path))
    assert deployed.returncode == 2
    assert f"{path}:6: operators[0].workers: 100000 workers on this host" in deployed.stderr
    assert "--allow-oversubscribe" in deployed.stderr.splitlines()[-1]
    assert not state_file("crafted").exists()


def _open_files_limit(limit: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    return apply


def test_deploy_goes_beyond_the_hosts_limits_only_when_told_to(tmp_path: Path) -> None:
    # Six workers want 64 + 2 x 6 = 76 open files in the embedded nats-server; allow 70.
    limit = _open_files_limit(70)
    refused = runner("validate", str(HELLO_WORLD_PYTHON), preexec_fn=limit)
    assert "need about 76 open files in the embedded nats-server, more than the open-file limit of 70" in refused.stderr
    assert runner("deploy", str(HELLO_WORLD_PYTHON), preexec_fn=limit).returncode == 2
    proc = subprocess.Popen(
        [*RUNNER, "deploy", str(HELLO_WORLD_PYTHON), "--allow-oversubscribe"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # printed once every worker is ready
        assert banner.startswith("Deployment 'hello_world_python' is running: 6 workers"), proc.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "open-file limit of 70 (ulimit -n) (--allow-oversubscribe)" in err


HOST = HostResources(cpus=2, available_memory_bytes=8 << 30, open_files_limit=1024, threads_limit=4096)


def _config(*operators: dict, **fields) -> DeploymentConfig:  # type: ignore[no-untyped-def]
    ops = [{"implementation": ENCODER, **op} for op in operators]
    return DeploymentConfig.model_validate({"name": "d", "operators": ops, **fields})


def test_the_deployments_in_the_repository_fit_a_two_cpu_host() -> None:
    for path in (REPO_ROOT / "deployments").glob("*.yaml"):
        assert capacity_problems(load_deployment(path), host=HOST) == [], path


def test_up_to_64_workers_fit_on_two_cpus_and_16_per_cpu_on_more() -> None:
    roomy = HostResources(cpus=2, available_memory_bytes=None, open_files_limit=None, threads_limit=None)
    assert capacity_problems(_config({"name": "a", "workers": MIN_WORKER_BOUND}), host=roomy) == []
    [problem] = capacity_problems(_config({"name": "a", "workers": 60}, {"name": "b", "workers": 5}), host=roomy)
    assert problem.loc == ("operators", 0, "workers")
    assert problem.message == (
        "65 workers on this host (a×60, b×5) exceed its bound of 64 (the larger of 64 and 16 per CPU, 2 CPUs)"
    )
    sixteen = HostResources(cpus=16, available_memory_bytes=None, open_files_limit=None, threads_limit=None)
    assert capacity_problems(_config({"name": "a", "workers": 256}), host=sixteen) == []
    assert len(capacity_problems(_config({"name": "a", "workers": 257}), host=sixteen)) == 1


def test_memory_counts_a_triton_server_per_triton_worker(tmp_path: Path) -> None:
    host = HostResources(cpus=64, available_memory_bytes=4 << 30, open_files_limit=None, threads_limit=None)
    python_workers = 4 * (1 << 30) // WORKER_MEMORY_BYTES  # exactly fill the memory
    assert capacity_problems(_config({"name": "a", "workers": python_workers}), host=host) == []
    # As many Triton workers as Python workers filling the memory, less the Triton servers' share.
    fitting = 4 * (1 << 30) // (WORKER_MEMORY_BYTES + TRITON_SERVER_MEMORY_BYTES)
    triton = {"name": "t", "kind": "triton", "repository": "models", "implementation": None, "workers": fitting}
    assert capacity_problems(_config(triton), host=host) == []
    [problem] = capacity_problems(_config({**triton, "workers": fitting + 1}), host=host)
    memory = (fitting + 1) * (WORKER_MEMORY_BYTES + TRITON_SERVER_MEMORY_BYTES) >> 20
    assert problem.message.startswith(f"{fitting + 1} workers on this host (t×{fitting + 1}) need about {memory} MiB of memory")
    assert problem.message.endswith("more than the 4096 MiB available")


def test_open_files_count_only_for_the_embedded_server_and_threads_always() -> None:
    host = HostResources(cpus=64, available_memory_bytes=None, open_files_limit=100, threads_limit=100)
    embedded = capacity_problems(_config({"name": "a", "workers": 20}), host=host)
    assert [p.message.split(", more than ")[1] for p in embedded] == [
        "the open-file limit of 100 (ulimit -n)",
        "the process limit of 100 (ulimit -u)",
    ]
    external = _config({"name": "a", "workers": 20}, request_plane={"nats_url": "nats://nats:4222"})
    assert [p.message.split(", more than ")[1] for p in capacity_problems(external, host=host)] == [
        "the process limit of 100 (ulimit -u)",
    ]


def test_only_the_workers_this_host_runs_count() -> None:
    config = _config({"name": "a", "workers": 100}, {"name": "b", "workers": 2})
    host = HostResources(cpus=2, available_memory_bytes=None, open_files_limit=None, threads_limit=None)
    assert len(capacity_problems(config, host=host)) == 1
    assert capacity_problems(config, HostShare(only=["b"]), host) == []
    assert capacity_problems(config, HostShare(workers=32), host) == []
    [problem] = capacity_problems(config, HostShare(only=["b"], workers=65), host)
    assert problem.loc == ("operators", 1, "workers")


# --- declared tensor sizes -------------------------------------------------------------------------

GIB = 1 << 30


def _remote(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> RemoteTensor:
    # An address nothing listens on: a worker that tried to fetch would allocate first, then fail.
    return RemoteTensor(
        name=name, dtype=dtype, shape=shape, nbytes=nbytes, address="ucx://127.0.0.1:9/0", tensor_id="t"
    )


def test_nbytes_must_match_dtype_and_shape() -> None:
    assert _remote("x", "<f4", (3, 4), 48).nbytes == 48
    assert _remote("x", "bytes", (3,), 12).nbytes == 12  # three empty elements: their length prefixes
    with pytest.raises(ProtocolError, match=r"nbytes 16 does not match dtype <f4 and shape \[3, 4\] \(48 bytes\)"):
        _remote("x", "<f4", (3, 4), 16)
    with pytest.raises(ProtocolError, match="8 bytes cannot hold 1000000000 string elements"):
        _remote("x", "string", (10**9,), 8)
    with pytest.raises(ProtocolError, match="dtype '|O' is not allowed"):
        _remote("x", "|O", (1,), 8)


def test_a_request_declaring_more_than_the_limit_is_refused_naming_its_largest_tensor() -> None:
    small, huge = _remote("small", "|u1", (10,), 10), _remote("huge", "|u1", (100 * GIB,), 100 * GIB)
    check_request_size([small], limit=10)
    with pytest.raises(RequestTooLargeError) as caught:
        check_request_size([small, huge], limit=GIB)
    assert caught.value.code == "too_large"
    assert f"declare {100 * GIB + 10} bytes, more than the operator's max_request_bytes of {GIB}" in str(caught.value)
    assert "'huge'" in str(caught.value)


def test_the_default_limit_is_a_gib_or_an_eighth_of_the_memory() -> None:
    total = int(next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < default_max_request_bytes() <= min(GIB, total // 8)


async def _answer(nc, payload: bytes) -> ResponseHeader:  # type: ignore[no-untyped-def]
    reply = await nc.request(operator_subject("test", "echo", 1), payload, timeout=10)
    header, _ = decode_response(reply.data)
    assert header.final and header.error is not None
    return header


async def test_a_crafted_request_declaring_100_gib_gets_too_large_and_the_worker_keeps_serving(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", delivery={"mode": "at_most_once"}))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        nc = conn.plane.nats
        claim = _remote("x", "|u1", (100 * GIB,), 100 * GIB)
        header = RequestHeader(id="r1", reply_to=nc.new_inbox(), timeout_s=5, tensors=[claim])
        answer = await _answer(nc, encode_message(header, []))  # refused before any fetch: no bytes
        assert answer.error is not None and answer.error.code == "too_large"
        assert "'x'" in answer.error.message and str(100 * GIB) in answer.error.message
        # Declared sizes that do not add up are malformed.
        lying = json.loads(encode_message(header, [])[8:])
        lying["tensors"][0]["nbytes"] = 16
        body = json.dumps(lying).encode()
        answer = await _answer(nc, struct.pack("<4sI", MAGIC, len(body)) + body)
        assert answer.error is not None and answer.error.code == "bad_request"
        assert "nbytes 16 does not match" in answer.error.message
        response = await conn.operator("echo").infer({"x": np.arange(5)})
        assert list(await response.array("x")) == [0, 1, 2, 3, 4]
        assert deployment.workers[0].restarts == 0


async def test_max_request_bytes_bounds_what_a_caller_may_send(nats_url: str) -> None:
    config = make_config(op("echo", "echo:Echo", max_request_bytes=4096))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        echo = conn.operator("echo")
        with pytest.raises(OperatorError) as caught:
            await echo.infer({"x": np.zeros(1024, np.int32), "y": np.zeros(1, np.int32)})
        assert caught.value.code == "too_large"
        assert "declare 4100 bytes, more than the operator's max_request_bytes of 4096" in caught.value.message
        response = await echo.infer({"x": np.zeros(1024, np.int32)})  # exactly the limit
        assert (await response.array("x")).shape == (1024,)
        assert deployment.workers[0].restarts == 0
