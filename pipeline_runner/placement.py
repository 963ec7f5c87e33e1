"""Device placement: which device each worker of a deployment uses, decided at deploy time.

- **Resolving** (deployment process): an operator's ``device`` is ``cpu``, ``gpu`` or ``auto``.
  For ``gpu`` and ``auto`` the deployment counts the GPUs CuPy can use, once, in a short
  subprocess (:func:`probe_gpus`): importing CuPy costs a fraction of a second and CUDA's
  initialisation loads the driver into the process, neither of which the deployment process
  itself needs. ``gpu`` without a usable GPU is a :class:`PlacementError` before anything
  starts; ``auto`` falls back to the CPU, logged once per operator.
- **Assigning**: worker ``i`` of an operator takes ``gpus[i % len(gpus)]``, where ``gpus`` is the
  operator's list or else every visible GPU; the numbers are the CUDA device numbers the
  deployment process sees (after its own ``CUDA_VISIBLE_DEVICES``, if set).
- **Pinning**: the deployment starts a GPU worker with ``CUDA_VISIBLE_DEVICES`` naming its one GPU
  (:func:`worker_environment`), so everything in the worker, its operator's imports and any
  child process such as a Triton server, sees exactly that GPU, as device 0. The worker then
  creates its CUDA context there before starting UCX (:func:`activate_gpu`), which UCX needs to
  move device memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import OperatorConfig
from .errors import RunnerError

Device = Literal["cpu", "gpu"]
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
PROBE_TIMEOUT_S = 60.0
INSTALL_HINT = "pip install -e '.[gpu]'"

log = logging.getLogger("pipeline_runner.placement")


class PlacementError(RunnerError):
    """An operator cannot run where its ``device``/``gpus`` say (raised before any worker starts)."""


class _NoGpu(PlacementError):
    """``device: gpu`` where no GPU is usable (grouped into one message by :meth:`Placer.check`)."""


@dataclass(frozen=True)
class GpuInventory:
    """What the deployment process's CUDA can use, as CuPy sees it."""

    #: GPUs CUDA reports (0 when CuPy is missing or CUDA fails).
    count: int
    #: CuPy's version, or None when CuPy cannot be imported.
    cupy_version: str | None = None
    #: Why ``count`` is 0 (or the probe failed), in CuPy's or Python's own words.
    problem: str | None = None
    #: The deployment process's ``CUDA_VISIBLE_DEVICES``; None when unset.
    visible_devices: str | None = None
    #: How long the probe took.
    seconds: float = 0.0
    #: True when the probe itself failed (hung, crashed): ``problem`` says how.
    probe_failed: bool = False
    #: Why NVRTC, which CuPy compiles its kernels with, cannot be loaded; None when it can (or
    #: CuPy is missing). Without it GPU arrays work but kernels fail at their first launch.
    nvrtc_problem: str | None = None

    @property
    def summary(self) -> str:
        """One phrase saying what was found, e.g. ``"2 GPUs (CuPy 14.2.0)"`` or why there are none."""
        restricted = (
            f" (CUDA_VISIBLE_DEVICES={self.visible_devices!r})" if self.visible_devices is not None else ""
        )
        if self.probe_failed:
            return f"GPU detection failed: {self.problem}"
        if self.cupy_version is None:
            if self.problem and "No module named 'cupy'" not in self.problem:
                return f"CuPy cannot be imported ({self.problem}); reinstall it: {INSTALL_HINT}"
            return f"CuPy is not installed: {INSTALL_HINT}"
        if self.count == 0:
            why = f": {self.problem}" if self.problem else ""
            return f"CuPy {self.cupy_version} found no CUDA device{restricted}{why}"
        plural = "GPU" if self.count == 1 else "GPUs"
        return f"{self.count} {plural}{restricted} (CuPy {self.cupy_version})"


# Runs in a fresh interpreter: reports CuPy's version and CUDA's device count as one JSON line.
_PROBE = r"""
import json
try:
    import cupy
except BaseException as exc:
    print(json.dumps({"cupy": None, "count": 0, "problem": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
try:
    count, problem = int(cupy.cuda.runtime.getDeviceCount()), None
except BaseException as exc:
    count, problem = 0, f"{type(exc).__name__}: {exc}"
try:
    from cupy_backends.cuda.libs import nvrtc
    nvrtc.getVersion()
    nvrtc_problem = None
except BaseException as exc:
    nvrtc_problem = f"{type(exc).__name__}: {str(exc).strip()}"
print(json.dumps({"cupy": cupy.__version__, "count": count, "problem": problem, "nvrtc_problem": nvrtc_problem}))
"""


def probe_gpus(
    python: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> GpuInventory:
    """Count the GPUs CuPy can use, in a subprocess so this process creates no CUDA state.

    ``python`` is the interpreter command (default: this one); ``env`` its environment (default:
    this process's, so ``CUDA_VISIBLE_DEVICES`` is honoured). Never raises: a probe that fails
    or hangs is reported as zero GPUs with the reason in ``problem``.
    """
    command = [*(python or [sys.executable]), "-c", _PROBE]
    environ = dict(os.environ if env is None else env)
    visible = environ.get(CUDA_VISIBLE_DEVICES)
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environ)
    except subprocess.TimeoutExpired:
        return GpuInventory(
            0, None, f"it did not finish within {timeout_s:g} s", visible, time.monotonic() - started, True
        )
    except OSError as exc:
        return GpuInventory(0, None, f"it could not run: {exc}", visible, time.monotonic() - started, True)
    seconds = time.monotonic() - started
    lines = done.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1])
        return GpuInventory(
            int(found["count"]), found["cupy"], found["problem"], visible, seconds,
            nvrtc_problem=found.get("nvrtc_problem"),
        )  # fmt: skip
    except (IndexError, ValueError, KeyError, TypeError):
        # The interpreter died before answering (e.g. a crash inside CUDA): quote what it said.
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return GpuInventory(0, None, f"it exited with code {done.returncode}: {said}", visible, seconds, True)


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker runs: ``device``, and for a GPU worker the CUDA device number ``gpu``."""

    device: Device
    gpu: int | None = None


class Placer:
    """Resolves operators' devices and assigns each worker its GPU, probing GPUs at most once.

    ``probe`` counts the GPUs (default :func:`probe_gpus`; tests pass a fake). ``source`` is the
    deployment file, named in errors.
    """

    def __init__(self, probe: Callable[[], GpuInventory] = probe_gpus, source: Path | str | None = None):
        self._probe = probe
        self._source = source
        self._inventory: GpuInventory | None = None
        self._devices: dict[str, Device] = {}

    @property
    def inventory(self) -> GpuInventory:
        """The GPUs found (probed on first use)."""
        if self._inventory is None:
            self._inventory = self._probe()
            log.info("GPU detection: %s, in %.2f s", self._inventory.summary, self._inventory.seconds)
            # Probed only for gpu/auto operators, which take a GPU whenever one is found. A
            # warning, not an error: operators that only move arrays run fine without NVRTC.
            if self._inventory.count and self._inventory.nvrtc_problem:
                log.warning(
                    "NVRTC cannot be loaded (%s): GPU operators can hold CuPy arrays, but CuPy kernels "
                    "(hello_world's among them) will fail at their first launch. %s brings it.",
                    self._inventory.nvrtc_problem, INSTALL_HINT,
                )  # fmt: skip
        return self._inventory

    def check(self, operators: Sequence[OperatorConfig]) -> None:
        """Resolve every operator's device; raise one PlacementError naming every problem.

        Probes GPUs only when an operator asks for ``gpu`` or ``auto``.
        """
        problems, without_gpu = [], []
        for op in operators:
            try:
                self.device(op)
            except _NoGpu:
                without_gpu.append(op)  # one message for all of them: the reason is the same
            except PlacementError as exc:
                problems.append(str(exc))
        if without_gpu:
            problems.insert(0, self._no_gpu_message(without_gpu))
        if problems:
            raise PlacementError("\n".join(problems))

    async def acheck(self, operators: Sequence[OperatorConfig]) -> None:
        """:meth:`check` in a thread, so the probe's subprocess does not block the event loop."""
        await asyncio.to_thread(self.check, operators)

    def device(self, op: OperatorConfig) -> Device:
        """The device ``op``'s workers use; raises PlacementError when it cannot be honoured."""
        known = self._devices.get(op.name)
        if known is not None:
            return known
        resolved: Device = "cpu"
        if op.device != "cpu":
            inventory = self.inventory
            if inventory.count == 0:
                if op.device == "gpu":
                    raise _NoGpu(self._no_gpu_message([op]))
                log.info("operator %s: device auto -> cpu (%s)", op.name, inventory.summary)
            else:
                self._check_gpus(op, inventory)
                resolved = "gpu"
                gpus = op.gpus or list(range(inventory.count))
                log.info(
                    "operator %s: device %s -> gpu; its workers take GPUs %s round-robin",
                    op.name, op.device, ", ".join(map(str, gpus)),
                )  # fmt: skip
        self._devices[op.name] = resolved
        return resolved

    def place(self, op: OperatorConfig, index: int) -> WorkerPlacement:
        """Where worker ``index`` of ``op`` runs: GPUs are taken round-robin, one per worker."""
        if self.device(op) == "cpu":
            return WorkerPlacement("cpu")
        return WorkerPlacement("gpu", self._gpu(op, index, self.inventory))

    @staticmethod
    def _gpu(op: OperatorConfig, index: int, inventory: GpuInventory) -> int:
        gpus = op.gpus or list(range(inventory.count))
        return gpus[index % len(gpus)]

    def _check_gpus(self, op: OperatorConfig, inventory: GpuInventory) -> None:
        missing = [g for g in op.gpus or () if g >= inventory.count]
        if missing:
            numbers = "GPU 0" if inventory.count == 1 else f"GPUs 0-{inventory.count - 1}"
            raise PlacementError(
                f"{self._where(op)}: gpus lists {', '.join(map(str, missing))}, but only {numbers} "
                f"exist here ({inventory.summary}). gpus counts as CUDA does in the deploying "
                "process, after its CUDA_VISIBLE_DEVICES."
            )

    def _where(self, op: OperatorConfig) -> str:
        prefix = f"{self._source}: " if self._source else ""
        return f"{prefix}operator {op.name!r}"

    def _no_gpu_message(self, ops: Sequence[OperatorConfig]) -> str:
        prefix = f"{self._source}: " if self._source else ""
        names = ", ".join(repr(op.name) for op in ops)
        which = f"operator {names} has" if len(ops) == 1 else f"operators {names} have"
        return (
            f"{prefix}{which} device: gpu, but {self.inventory.summary}. "
            "Set device: cpu, or device: auto to use a GPU only where one is found."
        )


def worker_environment(placement: WorkerPlacement, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables pinning a worker to its device (to add to the inherited ones).

    A GPU worker gets ``CUDA_VISIBLE_DEVICES`` naming only its GPU. When the deployment itself runs
    under ``CUDA_VISIBLE_DEVICES`` (numbers or UUIDs), GPU ``n`` is its ``n``-th entry, as CUDA
    numbers them. CPU workers inherit the environment unchanged: an operator that drives a GPU on
    its own (a Triton model with a GPU instance group) keeps seeing it.
    """
    if placement.device != "gpu" or placement.gpu is None:
        return {}
    inherited = (os.environ if environ is None else environ).get(CUDA_VISIBLE_DEVICES)
    if inherited is None:
        return {CUDA_VISIBLE_DEVICES: str(placement.gpu)}
    entries = [entry.strip() for entry in inherited.split(",") if entry.strip()]
    if placement.gpu >= len(entries):
        raise PlacementError(
            f"GPU {placement.gpu} is not among CUDA_VISIBLE_DEVICES={inherited!r} of the deploying process"
        )
    return {CUDA_VISIBLE_DEVICES: entries[placement.gpu]}


def activate_gpu() -> str:
    """In a GPU worker: make its one visible GPU current and create its CUDA context there.

    Called before the operator is imported and before UCX starts: UCX moves device memory only
    when the CUDA context exists before its own. Returns the GPU's name; raises RunnerError when
    CuPy finds no device in this process (e.g. a CUDA_VISIBLE_DEVICES naming a missing GPU).
    """
    from .kernels.xp import gpu_available

    visible = os.environ.get(CUDA_VISIBLE_DEVICES)
    if not gpu_available():
        raise RunnerError(
            f"this worker was placed on a GPU (CUDA_VISIBLE_DEVICES={visible!r}), but CuPy finds no "
            "CUDA device in it"
        )
    import cupy

    device = cupy.cuda.Device(0)
    device.use()
    cupy.cuda.runtime.free(0)  # cudaFree(0): creates the context now rather than at the first request
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
