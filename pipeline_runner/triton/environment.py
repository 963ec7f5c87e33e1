"""Find a Triton Inference Server, or install one (from nvidia-pytriton) with its model environment.

The runner itself needs numpy >= 2 (cupy, ucxx), but Triton's Python backend returns empty outputs
when the model code runs with numpy 2. So the server and the Python that runs model code live in a
separate virtualenv (the *model environment*, numpy < 2), installed once under :func:`triton_home`.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunnerError
from ..process import die_with_parent

PYTRITON_VERSION = "0.7.0"
HOME_ENV = "PIPELINE_RUNNER_TRITON_HOME"
MARKER = "READY.json"  # written last: its presence means the home is complete
PIP_TIMEOUT_S = 1800.0
VENV_TIMEOUT_S = 300.0

_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
_LIBPYTHON = f"libpython{_PY}.so.1.0"


@dataclass(frozen=True)
class TritonInstallation:
    """A Triton server ready to start: ``server`` with ``--backend-directory=backend_dir`` and ``env``."""

    server: Path  # the tritonserver binary
    backend_dir: Path  # value for --backend-directory (holds python/ with the stub inside)
    env: dict[str, str]  # full environment to start tritonserver with
    model_python: Path | None  # python of the model environment (numpy < 2); None for a system server
    source: str  # human-readable origin, e.g. "nvidia-pytriton 0.7.0 in ~/.cache/..."


def triton_home() -> Path:
    """``$PIPELINE_RUNNER_TRITON_HOME``, else ``$XDG_CACHE_HOME/pipeline_runner/triton`` (~/.cache)."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipeline_runner" / "triton"


def find_triton(home: Path | None = None) -> TritonInstallation | None:
    """A ``tritonserver`` on PATH, else a completed setup under ``home``, else None. Changes nothing."""
    return _system_triton() or _installed_triton(triton_home() if home is None else home)


def setup_triton(home: Path | None = None, progress: Callable[[str], None] = print) -> TritonInstallation:
    """Return :func:`find_triton`'s answer, installing nvidia-pytriton under ``home`` first if needed.

    Safe to call from several processes at once: one installs while the others wait for it.
    Raises :class:`RunnerError` if the installation fails; nothing half-built is left behind.
    """
    home = triton_home() if home is None else home
    found = find_triton(home)
    if found is not None:
        return found
    try:
        home.mkdir(parents=True, exist_ok=True)
        with _locked(home / ".lock", progress):
            found = find_triton(home)  # another process may have finished while we waited
            if found is not None:
                return found
            try:
                _install(home, progress)
            except BaseException:
                _remove_partial(home)
                raise
    except OSError as exc:  # unwritable home, full disk...
        raise RunnerError(f"cannot set up Triton in {home}: {exc}") from exc
    installation = _installed_triton(home)
    if installation is None:  # pragma: no cover - _install checked every path it records
        raise RunnerError(f"Triton setup in {home} finished but left no usable installation")
    progress(f"Triton is ready: {installation.server}")
    return installation


# --- finding ---------------------------------------------------------------------------------


def _system_triton() -> TritonInstallation | None:
    """A tritonserver on PATH, e.g. in NVIDIA's Triton container (backends in /opt/tritonserver)."""
    found = shutil.which("tritonserver")
    if found is None:
        return None
    server = Path(found).resolve()
    for backends in (server.parent.parent / "backends", Path("/opt/tritonserver/backends")):
        if backends.is_dir():
            return TritonInstallation(
                server=server,
                backend_dir=backends,
                env=dict(os.environ),
                model_python=None,
                source=f"tritonserver on PATH ({server})",
            )
    return None  # a server without backends cannot run our models


def _installed_triton(home: Path) -> TritonInstallation | None:
    try:
        marker = json.loads((home / MARKER).read_text())
        if marker["pytriton"] != PYTRITON_VERSION or marker["python"] != _PY:
            return None  # made for another version: setup_triton rebuilds it
        server, backend_dir, model_python, lib_dir = (
            home / marker[key] for key in ("server", "backend_dir", "model_python", "lib_dir")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (
        os.access(server, os.X_OK)
        and (backend_dir / "python" / "triton_python_backend_stub").is_file()
        and model_python.exists()
        and lib_dir.is_dir()
    ):
        return None
    return TritonInstallation(
        server=server,
        backend_dir=backend_dir,
        env=_model_env(model_python, lib_dir),
        model_python=model_python,
        source=f"nvidia-pytriton {PYTRITON_VERSION} in {home}",
    )


def _model_env(model_python: Path, lib_dir: Path) -> dict[str, str]:
    """os.environ with the model environment first on PATH and the bundled libraries loadable."""
    env = dict(os.environ)
    # The Python backend stub embeds libpython and finds its packages through the first
    # python3 on PATH; PYTHONHOME/PYTHONPATH would let the runner's numpy 2 in.
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    bin_dir = model_python.parent
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    env["PATH"] = os.pathsep.join(filter(None, [str(bin_dir), env.get("PATH")]))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
    return env


# --- installing ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process to finish setting up Triton in {path.parent}...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_partial(home: Path) -> None:
    """Remove what a setup writes (no marker means none of it is in use); leave anything else."""
    (home / MARKER).unlink(missing_ok=True)
    for child in home.iterdir():
        if child.name in ("model-env", "backends") or child.name.startswith(("backends.", f"{MARKER}.")):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _install(home: Path, progress: Callable[[str], None]) -> None:
    _remove_partial(home)  # leftovers of an older version or of a crashed setup
    started = time.monotonic()
    venv = home / "model-env"
    # The venv is built at its final path: a moved venv keeps stale paths in its scripts.
    progress(f"creating the Triton model environment in {venv}")
    _run([sys.executable, "-m", "venv", str(venv)], "creating the model environment", VENV_TIMEOUT_S)
    python = venv / "bin" / "python"
    progress(f"installing nvidia-pytriton {PYTRITON_VERSION} (about 370 MB on disk, once)...")
    _run(
        [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
         f"nvidia-pytriton=={PYTRITON_VERSION}"],
        f"pip install nvidia-pytriton=={PYTRITON_VERSION}",
        PIP_TIMEOUT_S,
    )  # fmt: skip
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     "locating the model environment's site-packages", 60.0).strip())  # fmt: skip
    bundle = site / "pytriton" / "tritonserver"
    server, lib_dir = bundle / "bin" / "tritonserver", site / "nvidia_pytriton.libs"
    stub = bundle / "python_backend_stubs" / _PY / "triton_python_backend_stub"
    for needed in (server, lib_dir, bundle / "backends" / "python", stub):
        if not needed.exists():
            raise RunnerError(f"nvidia-pytriton {PYTRITON_VERSION} has no {needed}: cannot set up Triton")

    backends = home / "backends"
    progress(f"building the Python backend for Python {_PY} in {backends}")
    # Built next to its final place and renamed, so it is complete or absent.
    staging = Path(tempfile.mkdtemp(prefix="backends.", dir=home))
    shutil.copytree(bundle / "backends" / "python", staging / "python", symlinks=True)
    shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
    staging.chmod(0o755)  # mkdtemp makes it 0700
    staging.rename(backends)
    _check_libpython(backends / "python" / "triton_python_backend_stub", _model_env(python, lib_dir))

    marker = {
        "pytriton": PYTRITON_VERSION,
        "python": _PY,
        "server": str(server.relative_to(home)),
        "backend_dir": str(backends.relative_to(home)),
        "model_python": str(python.relative_to(home)),
        "lib_dir": str(lib_dir.relative_to(home)),
        "numpy": _run([str(python), "-c", "import numpy; print(numpy.__version__)"],
                      "importing numpy in the model environment", 60.0).strip(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setup_s": round(time.monotonic() - started, 1),
    }  # fmt: skip
    tmp = home / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(home / MARKER)


def _check_libpython(stub: Path, env: dict[str, str]) -> None:
    """The stub links the shared libpython, which Debian ships apart from the interpreter."""
    ldd = shutil.which("ldd")
    if ldd is not None:
        # ldd answers for the stub itself; ctypes.CDLL in this process would not, because a
        # python linked against libpython already has it loaded.
        out = _run([ldd, str(stub)], f"checking the libraries of {stub}", 60.0, env=env)
        missing = [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]
    else:
        missing = [] if ctypes.util.find_library(f"python{_PY}") else [_LIBPYTHON]
    if any(name.startswith("libpython") for name in missing):
        raise RunnerError(
            f"Triton's Python backend needs {_LIBPYTHON}, which is not installed: install it "
            f"(Debian/Ubuntu: apt-get install libpython{_PY}), then run 'runner triton setup' again"
        )
    if missing:
        raise RunnerError(f"Triton's Python backend stub {stub} cannot load: {', '.join(missing)} not found")


def _run(cmd: list[str], what: str, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; return its stdout, or raise RunnerError with the tail of its output."""
    try:
        # If this process is killed, pip must not go on writing into a home the next setup rebuilds.
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RunnerError(f"{what} took longer than {timeout_s:.0f} s{_tail(exc.stdout, exc.stderr)}") from None
    except OSError as exc:
        raise RunnerError(f"{what} failed: {exc}") from None
    if result.returncode != 0:
        raise RunnerError(f"{what} failed (exit code {result.returncode}){_tail(result.stdout, result.stderr)}")
    return result.stdout


def _tail(*outputs: str | bytes | None, lines: int = 20) -> str:
    text = "\n".join(o.decode(errors="replace") if isinstance(o, bytes) else o for o in outputs if o).strip()
    return ":\n" + "\n".join(text.splitlines()[-lines:]) if text else ""
