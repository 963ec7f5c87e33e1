"""One Triton Inference Server process, owned by one worker.

Started with explicit model control on loopback ports chosen free, so the worker decides which
model is loaded (with which config) and learns Triton's own error when loading fails. The
server dies with its worker (PR_SET_PDEATHSIG), so a killed worker leaves no Triton behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections import deque
from pathlib import Path

import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from ..errors import RunnerError
from ..process import die_with_parent
from .environment import TritonInstallation

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """A ``tritonserver`` serving ``repository``, reachable over gRPC at :attr:`url`."""

    def __init__(self, installation: TritonInstallation, repository: Path, host: str = "127.0.0.1"):
        self.installation = installation
        self.repository = repository
        self.host = host
        self.grpc_port = 0
        self.http_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self.client: grpcclient.InferenceServerClient | None = None
        # Triton's recent log lines: its load API answers some failures (a config.pbtxt it
        # cannot parse) with a generic message, and the cause is only in its log.
        self._log: deque[str] = deque(maxlen=200)
        self._log_reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    async def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and return once it reports ready; RunnerError if it does not."""
        self.grpc_port, self.http_port = _free_port(self.host), _free_port(self.host)
        args = [
            str(self.installation.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.installation.backend_dir}",
            "--model-control-mode=explicit",
            "--strict-readiness=false",  # ready before any model is loaded
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",  # not 30 s when a client connection lingers at shutdown
        ]  # fmt: skip
        started = time.monotonic()
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            env=self.installation.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self._log_reader = asyncio.create_task(self._relay_log(self._proc.stdout))
        self.client = grpcclient.InferenceServerClient(self.url)
        while True:
            if self._proc.returncode is not None:
                raise RunnerError(
                    f"tritonserver exited with code {self._proc.returncode} while starting "
                    f"(its log is in the worker's log)"
                )
            with contextlib.suppress(InferenceServerException, OSError):
                if await self.client.is_server_ready(client_timeout=1.0):
                    break
            if time.monotonic() - started > timeout_s:
                await self.stop()
                raise RunnerError(f"tritonserver was not ready after {timeout_s:g} s")
            await asyncio.sleep(0.1)
        log.info("tritonserver ready at %s in %.1f s (%s)", self.url, time.monotonic() - started,
                 self.installation.source)

    async def load_model(self, name: str, config_json: str | None = None) -> None:
        """Load ``name`` (with ``config_json`` replacing its config.pbtxt, if given).

        A model Triton cannot load raises RunnerError quoting Triton's message, and the error
        lines Triton logged meanwhile.
        """
        assert self.client is not None
        self._log.clear()
        try:
            await self.client.load_model(name, config=config_json)
        except InferenceServerException as exc:
            await asyncio.sleep(0.1)  # let the log reader catch up
            logged = [line for line in self._log if line.startswith("E") or " ERROR " in line]
            detail = f" (Triton's log: {' | '.join(logged)})" if logged else ""
            raise RunnerError(f"Triton could not load model {name!r}: {exc.message().strip()}{detail}") from None

    async def _relay_log(self, stream: asyncio.StreamReader | None) -> None:
        """Copy Triton's output into the worker's log, keeping the recent lines."""
        if stream is None:
            return
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            self._log.append(text)
            print(f"[tritonserver] {text}", file=sys.stderr, flush=True)

    async def stop(self, grace_s: float = 10.0) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._log_reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._log_reader, timeout=2.0)
            self._log_reader = None
