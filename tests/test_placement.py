"""Device placement from the deployment file: ``device: cpu | gpu | auto`` and ``gpus``.

The assignment tests fake the GPU count; the probe and deploy tests run the real thing on this
machine. Tests marked ``gpu`` need a CUDA device through CuPy and are skipped cleanly elsewhere;
the CPU-only deploy tests are skipped where a GPU makes their premise false.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline_runner import ConfigError, Connection, DeploymentConfig, OperatorConfig, WorkerStartError
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.deployment import WorkerProcess
from pipeline_runner.kernels import gpu_available
from pipeline_runner.operator import OperatorContext, Request
from pipeline_runner.placement import (
    GpuInventory,
    Placer,
    PlacementError,
    WorkerPlacement,
    probe_gpus,
    worker_environment,
)
from pipeline_runner.protocol import encode_inline_tensors
from pipeline_runner.reply import Responder
from pipeline_runner.tensor import decode_tensors
from pipeline_runner.worker import WorkerSpec

from .conftest import REPO_ROOT, connected, make_config, op, running
from .test_cli import HELLO_WORLD_PYTHON, deployed, runner

HAS_GPU = gpu_available()
HELLO_WORLD_GPU = REPO_ROOT / "deployments" / "hello_world_gpu.yaml"
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device found by CuPy")
needs_no_gpu = pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the test is about one without")

ONE_GPU = GpuInventory(count=1, cupy_version="14.2.0")
NO_CUPY = GpuInventory(count=0, problem="ModuleNotFoundError: No module named 'cupy'")
NO_DEVICE = GpuInventory(
    count=0, cupy_version="14.2.0", problem="CUDARuntimeError: cudaErrorNoDevice: no CUDA-capable device is detected"
)


def gpus(count: int) -> GpuInventory:
    return GpuInventory(count=count, cupy_version="14.2.0")


def operator(name: str = "enc", **fields: object) -> OperatorConfig:
    return OperatorConfig.model_validate({"name": name, "implementation": "m:C", **fields})


def never_probed() -> GpuInventory:
    raise AssertionError("GPUs were probed for a deployment that asks for none")


def counting(inventory: GpuInventory) -> tuple[Callable[[], GpuInventory], list[int]]:
    calls: list[int] = []

    def probe() -> GpuInventory:
        calls.append(1)
        return inventory

    return probe, calls


# --- assigning GPUs ------------------------------------------------------------------------


def test_worker_i_takes_entry_i_modulo_len_of_the_operators_gpus() -> None:
    placer = Placer(lambda: gpus(4))
    op = operator(device="gpu", gpus=[2, 0], workers=5)
    assert [placer.place(op, i) for i in range(5)] == [
        WorkerPlacement("gpu", g) for g in (2, 0, 2, 0, 2)
    ]


def test_without_gpus_the_workers_take_every_visible_gpu_in_turn() -> None:
    placer = Placer(lambda: gpus(3))
    op = operator(device="gpu", workers=7)
    assert [placer.place(op, i).gpu for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_two_workers_on_a_one_gpu_machine_both_take_gpu_0() -> None:
    placer = Placer(lambda: ONE_GPU)
    op = operator(device="gpu", workers=2)
    assert [placer.place(op, i) for i in range(2)] == [WorkerPlacement("gpu", 0)] * 2


def test_a_gpus_entry_beyond_the_visible_gpus_is_refused_naming_the_operator() -> None:
    placer = Placer(lambda: gpus(2), source="deployments/x.yaml")
    with pytest.raises(PlacementError) as excinfo:
        placer.check([operator("dec", device="gpu", gpus=[1, 3, 5])])
    message = str(excinfo.value)
    assert message.startswith("deployments/x.yaml: operator 'dec': gpus lists 3, 5, but only GPUs 0-1 exist here")
    assert "2 GPUs (CuPy 14.2.0)" in message


def test_device_auto_with_gpus_takes_them_round_robin() -> None:
    placer = Placer(lambda: gpus(2))
    op = operator(device="auto", workers=3)
    assert [placer.place(op, i) for i in range(3)] == [
        WorkerPlacement("gpu", 0), WorkerPlacement("gpu", 1), WorkerPlacement("gpu", 0)
    ]


# --- no GPU -----------------------------------------------------------------------------------


def test_device_gpu_without_cupy_says_how_to_install_it_and_how_to_do_without() -> None:
    with pytest.raises(PlacementError) as excinfo:
        Placer(lambda: NO_CUPY, source="d.yaml").check([operator("dec", device="gpu")])
    assert str(excinfo.value) == (
        "d.yaml: operator 'dec' has device: gpu, but CuPy is not installed: pip install -e '.[gpu]'. "
        "Set device: cpu, or device: auto to use a GPU only where one is found."
    )


def test_device_gpu_where_cupy_finds_no_device_quotes_cuda() -> None:
    with pytest.raises(PlacementError) as excinfo:
        Placer(lambda: NO_DEVICE).check([operator("dec", device="gpu")])
    assert "operator 'dec' has device: gpu, but CuPy 14.2.0 found no CUDA device: " in str(excinfo.value)
    assert "cudaErrorNoDevice" in str(excinfo.value)


def test_a_cupy_that_fails_to_import_is_not_called_missing() -> None:
    broken = GpuInventory(count=0, problem="ImportError: libcudart.so.12: cannot open shared object file")
    assert broken.summary.startswith("CuPy cannot be imported (ImportError: libcudart.so.12")


def test_every_operator_lacking_its_gpu_is_named_in_one_error() -> None:
    ops = [operator("enc", device="gpu"), operator("mid"), operator("dec", device="gpu")]
    with pytest.raises(PlacementError) as excinfo:
        Placer(lambda: NO_DEVICE).check(ops)
    message = str(excinfo.value)
    assert message.count("\n") == 0 and "operators 'enc', 'dec' have device: gpu" in message


def test_device_auto_falls_back_to_the_cpu_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    placer = Placer(lambda: NO_DEVICE)
    op = operator(device="auto", workers=3, gpus=[0])
    with caplog.at_level(logging.INFO, logger="pipeline_runner.placement"):
        placer.check([op])
        placements = [placer.place(op, i) for i in range(3)]
    assert placements == [WorkerPlacement("cpu")] * 3
    decisions = [r.getMessage() for r in caplog.records if "device auto" in r.getMessage()]
    assert decisions == [f"operator enc: device auto -> cpu ({NO_DEVICE.summary})"]


def test_cpu_operators_never_probe_for_gpus() -> None:
    placer = Placer(never_probed)
    placer.check([operator("a"), operator("b", device="cpu")])
    assert placer.place(operator("a"), 0) == WorkerPlacement("cpu")


def test_gpus_are_probed_once_per_deployment() -> None:
    probe, calls = counting(gpus(2))
    placer = Placer(probe)
    ops = [operator("a", device="gpu", workers=2), operator("b", device="auto")]
    placer.check(ops)
    for op in ops:
        for i in range(op.workers):
            placer.place(op, i)
    assert len(calls) == 1


# --- pinning: the worker's environment -------------------------------------------------------


def test_a_cpu_worker_inherits_the_environment_unchanged() -> None:
    assert worker_environment(WorkerPlacement("cpu"), {"CUDA_VISIBLE_DEVICES": "0,1"}) == {}


def test_a_gpu_worker_sees_only_its_gpu() -> None:
    assert worker_environment(WorkerPlacement("gpu", 1), {}) == {"CUDA_VISIBLE_DEVICES": "1"}


def test_under_cuda_visible_devices_gpu_n_is_its_nth_entry() -> None:
    assert worker_environment(WorkerPlacement("gpu", 1), {"CUDA_VISIBLE_DEVICES": "4, 6"}) == {
        "CUDA_VISIBLE_DEVICES": "6"
    }
    uuids = "GPU-8a3b0f0e-1111-2222-3333-444444444444,GPU-9c4d1e1f-5555-6666-7777-888888888888"
    assert worker_environment(WorkerPlacement("gpu", 0), {"CUDA_VISIBLE_DEVICES": uuids}) == {
        "CUDA_VISIBLE_DEVICES": uuids.split(",")[0]
    }
    with pytest.raises(PlacementError, match="GPU 2 is not among CUDA_VISIBLE_DEVICES='4,6'"):
        worker_environment(WorkerPlacement("gpu", 2), {"CUDA_VISIBLE_DEVICES": "4,6"})


# --- the probe, for real -----------------------------------------------------------------------


def test_the_probe_reports_what_cupy_finds_here_without_importing_cupy_in_this_process() -> None:
    inventory = probe_gpus()
    assert inventory.cupy_version is not None, inventory.problem  # the dev extra installs CuPy
    if HAS_GPU:
        assert inventory.count >= 1 and inventory.problem is None
    else:
        assert inventory.count == 0 and "found no CUDA device" in inventory.summary and inventory.problem
    assert inventory.seconds < 30
    assert inventory.nvrtc_problem is None  # the dev extra installs NVRTC, as the gpu extra does


def test_the_probe_reports_a_missing_nvrtc(tmp_path: Path) -> None:
    # As if NVRTC were not installed: CuPy's library finder (cuda-pathfinder) says it is not found.
    (tmp_path / "sitecustomize.py").write_text(
        "from cuda import pathfinder\n"
        "_load = pathfinder.load_nvidia_dynamic_lib\n"
        "def _without_nvrtc(name):\n"
        "    if name == 'nvrtc':\n"
        "        raise pathfinder.DynamicLibNotFoundError('libnvrtc.so: not found (test)')\n"
        "    return _load(name)\n"
        "pathfinder.load_nvidia_dynamic_lib = _without_nvrtc\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    inventory = probe_gpus(env=env)
    assert inventory.cupy_version is not None
    assert inventory.nvrtc_problem is not None and "libnvrtc.so: not found (test)" in inventory.nvrtc_problem


def test_gpu_operators_without_nvrtc_get_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    without_nvrtc = GpuInventory(count=1, cupy_version="14.2.0", nvrtc_problem="DynamicLibNotFoundError: libnvrtc")
    with caplog.at_level(logging.WARNING, logger="pipeline_runner.placement"):
        Placer(lambda: without_nvrtc).check([operator("enc", device="gpu"), operator("dec", device="auto")])
        Placer(lambda: ONE_GPU).check([operator("enc", device="gpu")])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "NVRTC cannot be loaded (DynamicLibNotFoundError: libnvrtc)" in warnings[0]
    assert "pip install -e '.[gpu]'" in warnings[0]


def test_the_probe_honours_cuda_visible_devices() -> None:
    inventory = probe_gpus(env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert inventory.count == 0
    assert inventory.visible_devices == ""
    assert "found no CUDA device (CUDA_VISIBLE_DEVICES='')" in inventory.summary


def test_the_probe_tells_a_missing_cupy_apart() -> None:
    inventory = probe_gpus(python=[sys.executable, "-S"])  # -S: no site-packages, so no CuPy
    assert inventory.count == 0 and inventory.cupy_version is None
    assert inventory.summary == "CuPy is not installed: pip install -e '.[gpu]'"


def test_a_probe_that_crashes_or_hangs_is_zero_gpus_with_the_reason() -> None:
    crashed = probe_gpus(python=[sys.executable, "-c", "import sys; sys.exit('cuInit exploded')"])
    assert crashed.count == 0 and crashed.summary == "GPU detection failed: it exited with code 1: cuInit exploded"
    started = time.monotonic()
    hung = probe_gpus(python=[sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert hung.count == 0 and hung.summary == "GPU detection failed: it did not finish within 0.5 s"
    assert time.monotonic() - started < 10


# --- the deployment file ----------------------------------------------------------------------


def test_gpus_on_a_cpu_operator_is_a_validation_error_at_its_key_path(tmp_path: Path) -> None:
    file = tmp_path / "d.yaml"
    file.write_text(
        "name: d\noperators:\n"
        "  - name: a\n    implementation: m:C\n    gpus: [0]\n"
        "  - name: b\n    implementation: m:C\n    device: cpu\n    gpus: [1]\n"
        "  - name: c\n    implementation: m:C\n    device: auto\n    gpus: [1]\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_deployment(file)
    assert excinfo.value.problems == [
        f"{file}:5: operators[0].gpus: must not be set for device 'cpu' (set device: gpu or auto to use GPUs), got a list",
        f"{file}:9: operators[1].gpus: must not be set for device 'cpu' (set device: gpu or auto to use GPUs), got a list",
    ]


def test_runner_validate_reports_gpus_on_a_cpu_operator_with_exit_code_2(tmp_path: Path) -> None:
    file = tmp_path / "d.yaml"
    file.write_text("name: d\noperators:\n  - name: a\n    implementation: m:C\n    gpus: [0, 1]\n")
    result = runner("validate", str(file))
    assert result.returncode == 2
    assert "d.yaml:5: operators[0].gpus: must not be set for device 'cpu'" in result.stderr
    assert "Traceback" not in result.stderr


# --- what an operator sees -------------------------------------------------------------------


def test_a_cpu_context_gives_numpy_and_leaves_numpy_arrays_alone() -> None:
    context = OperatorContext("d", "op", 1, "op.0")
    assert context.device == "cpu" and context.gpu is None
    assert context.xp is np
    x = np.arange(3)
    assert context.to_device(x) is x


async def _request(inputs: dict[str, np.ndarray], device: str) -> Request:
    descriptors, buffers = encode_inline_tensors(inputs)
    body = memoryview(b"".join(bytes(b) for b in buffers))
    deadline = time.monotonic() + 5
    reply = Responder(_NoSink(), None, "op.0").reply("reply.subject", "r", 1, deadline)
    return Request("r", {}, decode_tensors(descriptors, body), deadline, reply, device=device)


class _NoSink:
    max_payload = 1 << 20

    async def publish_response(self, subject: str, payload: bytes, final: bool) -> None:
        raise AssertionError("these tests send no responses")


async def test_request_array_gives_numpy_on_a_cpu_worker() -> None:
    request = await _request({"x": np.arange(4, dtype=np.float32)}, "cpu")
    x = await request.array("x")
    assert type(x) is np.ndarray
    np.testing.assert_array_equal(x, np.arange(4, dtype=np.float32))


async def test_text_and_byte_inputs_stay_numpy_even_on_a_gpu_worker() -> None:
    # CuPy has no such dtypes, so these never go to the device (no GPU is needed to check that).
    request = await _request({"s": np.array(["a", "bc"], dtype=object), "u": np.array(["x", "yz"])}, "gpu")
    assert list(await request.array("s")) == ["a", "bc"]
    assert list(await request.array("u")) == ["x", "yz"]


# --- deploying, for real ----------------------------------------------------------------------


@needs_no_gpu
def test_deploying_device_gpu_without_a_gpu_fails_at_once_before_any_worker_starts(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    started = time.monotonic()
    result = runner("deploy", str(HELLO_WORLD_GPU), "--log-dir", str(logs), timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "hello_world_gpu.yaml: operators 'encoder', 'decoder' have device: gpu, but CuPy" in error
    assert re.search(r"CuPy (is not installed|[\d.]+ found no CUDA device)", error)
    assert "Set device: cpu, or device: auto" in error
    # No worker was started: none has a log, and the failure took only the GPU probe.
    assert not logs.exists() or list(logs.iterdir()) == []
    assert time.monotonic() - started < 30


def _hello_world_python_with_device(tmp_path: Path, name: str, device: str) -> Path:
    text = HELLO_WORLD_PYTHON.read_text()
    text = text.replace("name: hello_world_python", f"name: {name}")
    text = text.replace("working_dir: ..", f"working_dir: {REPO_ROOT}")
    text, count = re.subn(r"(\n    implementation: .*\n)", rf"\1    device: {device}\n", text)
    assert count == 3
    file = tmp_path / f"{name}.yaml"
    file.write_text(text)
    return file


@needs_no_gpu
def test_device_auto_without_a_gpu_serves_100_requests_on_the_cpu(tmp_path: Path) -> None:
    file = _hello_world_python_with_device(tmp_path, "hello_auto", "auto")
    with deployed(file, "hello_auto") as (proc, state):
        client = runner("client", "--requests", "100", "--concurrency", "4")
        assert client.returncode == 0, client.stderr + client.stdout
        assert "100/100" in client.stdout
        status = runner("status", timeout=30)
        assert status.returncode == 0, status.stderr
        stats = asyncio.run(_worker_stats(state.nats_url, "hello_auto", 6))
    _, stderr = proc.communicate(timeout=30)
    rows = [line for line in status.stdout.splitlines() if re.search(r"\b(encoder|decoder|encoder_decoder)\.\d", line)]
    assert len(rows) == 6 and all(re.search(r"│\s*cpu\s*│", row) for row in rows), status.stdout
    assert sorted((s["worker"], s["device"], s["gpu"]) for s in stats) == sorted(
        (f"{name}.{i}", "cpu", None) for name in ("encoder", "decoder", "encoder_decoder") for i in (0, 1)
    )
    # The fallback is said once per operator, however many workers it has.
    for name in ("encoder", "decoder", "encoder_decoder"):
        assert stderr.count(f"operator {name}: device auto -> cpu") == 1, stderr


async def _worker_stats(nats_url: str, deployment: str, expected: int) -> list[dict]:
    async with await Connection.connect(nats_url, deployment) as conn:
        return await conn.worker_stats(expected=expected, timeout_s=5.0)


async def test_an_operator_on_the_cpu_gets_numpy_through_request_array_and_its_context(nats_url: str) -> None:
    device = "auto" if not HAS_GPU else "cpu"  # auto means the CPU only where there is no GPU
    config = make_config(op("where", "device:WhereAmI", device=device))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        response = await conn.operator("where").infer({"x": np.arange(5, dtype=np.int32)})
        np.testing.assert_array_equal(await response.array("y"), np.arange(5) * 2)
        facts = response.parameters
        assert facts["device"] == "cpu" and facts["gpu"] is None and facts["xp"] == "numpy"
        assert facts["input_module"] == "numpy" and not facts["input_on_gpu"] and not facts["output_on_gpu"]
        assert facts["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")


async def test_a_gpu_worker_whose_gpu_cannot_be_found_fails_to_start_saying_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The deployment's check prevents this; the worker still refuses to run on the CPU when it
    # was placed on a GPU it cannot see (here: CUDA_VISIBLE_DEVICES names no real GPU).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "99")
    config: DeploymentConfig = make_config(op("where", "device:WhereAmI", device="gpu"))
    spec = WorkerSpec(
        deployment="d", operator=config.operators[0], index=0, nats_url="nats://127.0.0.1:1",
        root=str(config.root), device="gpu", gpu=0,
    )  # fmt: skip
    worker = WorkerProcess(spec, tmp_path / "where.0.log", config.root)
    with pytest.raises(WorkerStartError) as excinfo:
        await worker.start(timeout_s=60)
    assert "worker where.0 failed to start: this worker was placed on a GPU (CUDA_VISIBLE_DEVICES='99'), " \
        "but CuPy finds no CUDA device in it" in str(excinfo.value)


# --- on a GPU -----------------------------------------------------------------------------------


def _visible_entry(gpu: int) -> str:
    """What a worker on the deployment's GPU ``gpu`` finds in CUDA_VISIBLE_DEVICES."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    return str(gpu) if inherited is None else [e.strip() for e in inherited.split(",") if e.strip()][gpu]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("device", ["gpu", "auto"])
async def test_gpu_workers_are_pinned_to_one_gpu_each_round_robin(nats_url: str, device: str) -> None:
    count = probe_gpus().count
    config = make_config(op("where", "device:WhereAmI", device=device, workers=2))
    async with running(config, nats_url) as deployment, connected(deployment) as conn:
        seen: dict[str, dict] = {}
        for i in range(200):  # until both workers have answered
            response = await conn.operator("where").infer({"x": np.arange(8, dtype=np.float32)})
            np.testing.assert_array_equal(await response.array("y"), np.arange(8, dtype=np.float32) * 2)
            assert response.outputs["y"].descriptor is not None
            assert response.outputs["y"].descriptor.memory_type == "gpu"  # the result stayed on the GPU
            response.release()
            seen[response.parameters["worker"]] = response.parameters
            if len(seen) == 2:
                break
        assert sorted(seen) == ["where.0", "where.1"]
        for index in (0, 1):
            facts = seen[f"where.{index}"]
            assert facts["device"] == "gpu" and facts["xp"] == "cupy"
            assert facts["gpu"] == index % count  # two workers on a one-GPU machine: both GPU 0
            assert facts["cuda_visible_devices"] == _visible_entry(index % count)
            assert facts["cuda_device_count"] == 1  # pinned: the worker sees only its GPU
            assert facts["input_on_gpu"] and facts["output_on_gpu"]
        if count >= 2:
            assert seen["where.0"]["pci_bus_id"] != seen["where.1"]["pci_bus_id"]


@pytest.mark.gpu
@needs_gpu
def test_hello_world_gpu_serves_100_of_100_with_tensors_staying_on_the_gpu() -> None:
    count = probe_gpus().count
    with deployed(HELLO_WORLD_GPU, "hello_world_gpu") as (proc, state):
        client = runner("client", "--requests", "100", "--concurrency", "4", timeout=300)
        assert client.returncode == 0, client.stderr + client.stdout
        assert "100/100" in client.stdout
        stats = asyncio.run(_worker_stats(state.nats_url, "hello_world_gpu", 6))
    by_operator: dict[str, list[dict]] = {}
    for s in stats:
        by_operator.setdefault(s["operator"], []).append(s)
    assert {name: len(workers) for name, workers in by_operator.items()} == {
        "encoder": 2, "decoder": 2, "encoder_decoder": 2
    }

    def total(name: str, counter: str, key: str) -> int:
        return sum(s["data_plane"][counter].get(key, 0) for s in by_operator[name])

    for s in by_operator["encoder"] + by_operator["decoder"]:
        index = int(s["worker"].rsplit(".", 1)[1])
        assert (s["device"], s["gpu"]) == ("gpu", index % count)  # both on GPU 0 on a one-GPU machine
        assert s["cuda_visible_devices"] == _visible_entry(s["gpu"])
    # Every encoder output was published from device memory...
    assert total("encoder", "published_memory", "gpu") == 100
    assert total("encoder", "published_memory", "cpu") == 0
    # ...and every decoder input fetched from device memory into device memory, never via NumPy.
    for s in by_operator["decoder"]:
        assert set(s["data_plane"]["fetched_memory"]) <= {"gpu->gpu"}, s["data_plane"]
    assert total("decoder", "fetched_memory", "gpu->gpu") == 100
    assert total("decoder", "published_memory", "gpu") == 100
    # encoder_decoder only forwarded descriptors: it never touched the bytes.
    for s in by_operator["encoder_decoder"]:
        assert s["device"] == "cpu" and s["data_plane"]["fetched_memory"] == {}
