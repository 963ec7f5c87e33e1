"""Deployment: start the request plane and every worker process, keep them alive, stop them.

Workers of each operator are spawned as ``python -m pipeline_runner.worker`` in their own process
group (so Ctrl-C reaches only the deployment, which then stops them in order), with the
deployment as parent-death signal sender (so none outlives a killed deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DeploymentConfig, OperatorConfig
from .errors import RunnerError, WorkerStartError
from .http.spec import IngressSpec
from .metrics import MULTIPROC_DIR_ENV
from .nats_security import NatsClientOptions, embedded_server_config
from .nats_server import NatsServer, embedded_max_procs
from .placement import Placer, WorkerPlacement, worker_environment
from .process import STATUS_FD_ENV
from .state import DeploymentState, WorkerState, state_dir
from .worker import WorkerSpec

if TYPE_CHECKING:
    from .metrics.server import MetricsServer, SupervisedProcess

log = logging.getLogger("pipeline_runner.deployment")

_RESTART_FIRST_S = 0.1
_RESTART_MAX_S = 5.0
# A worker that served this long after reporting ready is restarted at once when it dies (it
# was killed, or a request crashed it); one dying sooner backs off, so a crash loop cannot spin.
_STABLE_S = 1.0
#: ``log_dir`` that sends every worker's log to the deployment's own output instead of files.
LOG_TO_OUTPUT = "-"


class WorkerProcess:
    """One worker: its spec, its current process and how often it was restarted."""

    module = "pipeline_runner.worker"

    def __init__(self, spec: WorkerSpec, log_file: Path | None, cwd: Path):
        self.spec = spec
        self.log_file = log_file
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        #: True from its "ready" report until its process exits.
        self.ready = False
        self.ready_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def name(self) -> str:
        return self.spec.worker_id

    async def start(self, timeout_s: float) -> None:
        """Spawn the process and return once it reports ready; raise WorkerStartError if not."""
        self.ready, self.ready_at = False, None
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **self._environment(), **{STATUS_FD_ENV: str(write_fd)})
        if self.spec.metrics_dir is not None:
            env[MULTIPROC_DIR_ENV] = self.spec.metrics_dir
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # No log file: the worker writes to the deployment's own output (e.g. for kubectl logs).
        with open(self.log_file, "ab") if self.log_file is not None else contextlib.nullcontext() as log_out:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", self.module,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=log_out,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(write_fd, *self._pass_fds()),
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,
                )  # fmt: skip
            finally:
                os.close(write_fd)
        self.started_at = time.monotonic()
        assert self.proc.stdin is not None
        self.proc.stdin.write(self._payload())
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        status = await self._read_status(read_fd, timeout_s)
        if status.get("event") != "ready":
            error = status.get("error") or self._log_tail()
            await self.kill()
            raise WorkerStartError(f"worker {self.name} failed to start: {error} (log: {self.log_file})")
        self.ready = True
        self.ready_at = time.monotonic()

    def _environment(self) -> dict[str, str]:
        # The device pin goes into the environment, so it holds before the worker imports anything.
        return worker_environment(WorkerPlacement(self.spec.device, self.spec.gpu))

    def _pass_fds(self) -> tuple[int, ...]:
        return ()

    def _payload(self) -> bytes:
        return self.spec.model_dump_json().encode()

    async def _read_status(self, read_fd: int, timeout_s: float) -> dict:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=timeout_s)
        except TimeoutError:
            return {"error": f"not ready after {timeout_s:g} s"}
        finally:
            transport.close()
        if not line:
            await self._wait(timeout_s=2.0)
            code = self.proc.returncode if self.proc else None
            return {"error": f"exited with code {code} before it was ready: {self._log_tail()}"}
        with contextlib.suppress(ValueError):
            return json.loads(line)
        return {"error": f"unexpected status {line!r}"}

    async def _wait(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
            return True
        return False

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM (the worker drains its in-flight requests), SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        if not await self._wait(grace_s):
            log.warning("worker %s did not stop within %g s; killing it", self.name, grace_s)
            await self.kill()

    async def kill(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self._wait(5.0)

    def _log_tail(self, lines: int = 3) -> str:
        if self.log_file is None:
            return "(its output is in the deployment's output above)"
        with contextlib.suppress(OSError):
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-lines:]
            return " | ".join(tail) or "(log is empty)"
        return "(no log)"

    def state(self) -> WorkerState:
        return WorkerState(
            operator=self.spec.operator.name,
            index=self.spec.index,
            pid=self.pid,
            log_file=str(self.log_file) if self.log_file is not None else "-",
            restarts=self.restarts,
        )


class IngressProcess(WorkerProcess):
    """One HTTP ingress process, supervised like a worker; it serves on the deployment's socket."""

    module = "pipeline_runner.http.process"

    def __init__(self, spec: IngressSpec, log_file: Path | None, cwd: Path):
        super().__init__(spec, log_file, cwd)  # type: ignore[arg-type]
        self.spec: IngressSpec = spec  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return self.spec.ingress_id

    def _environment(self) -> dict[str, str]:
        return {}

    def _pass_fds(self) -> tuple[int, ...]:
        return (self.spec.listen_fd,)


class Deployment:
    """Runs a :class:`DeploymentConfig`: request plane, workers, restarts and shutdown.

    On one host of several, ``only`` names the operators this host runs (all by default) and
    ``workers`` overrides how many workers of each run here; the operators' queues are still
    sized by the file's worker counts, which count every host's workers.
    """

    def __init__(
        self,
        config: DeploymentConfig,
        *,
        nats_url: str | None = None,
        log_dir: Path | None = None,
        start_timeout_s: float = 120.0,
        drain_timeout_s: float = 30.0,
        on_change: Callable[[Deployment], None] | None = None,
        only: Sequence[str] | None = None,
        workers: int | None = None,
        data_plane_host: str | None = None,
        http_only: bool = False,
        http_host: str | None = None,
        http_port: int | None = None,
        metrics_host: str | None = None,
        metrics_port: int | None = None,
    ):
        if (http_only or http_host is not None or http_port is not None) and config.http is None:
            raise RunnerError(f"deployment {config.name!r} has no http section to serve")
        if config.http is not None and (http_host is not None or http_port is not None):
            changes = {k: v for k, v in (("host", http_host), ("port", http_port)) if v is not None}
            config = config.model_copy(update={"http": config.http.model_copy(update=changes)})
        if http_only and workers is not None and config.http is not None:
            # On its own (a pod of Kubernetes), --workers counts ingress processes.
            config = config.model_copy(update={"http": config.http.model_copy(update={"workers": workers})})
            workers = None
        if metrics_host is not None or metrics_port is not None:
            changes = {k: v for k, v in (("host", metrics_host), ("port", metrics_port)) if v is not None}
            config = config.model_copy(update={"metrics": config.metrics.model_copy(update=changes)})
        if data_plane_host is not None:
            data_plane = config.data_plane.model_copy(update={"host": data_plane_host})
            config = config.model_copy(update={"data_plane": data_plane})
        self.config = config
        self.http_only = http_only
        self.operators = [] if http_only else select_operators(config, only)
        if workers is not None and workers < 1:
            raise RunnerError(f"workers must be at least 1, got {workers}")
        self.local_workers = workers
        self.nats_url = nats_url or config.request_plane.nats_url
        self.nats_options = NatsClientOptions.resolve(config.request_plane, config.root)
        self.run_dir = state_dir() / config.name
        if log_dir is None:
            log_dir = config.root / config.log_dir if config.log_dir else self.run_dir / "logs"
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.started_at = time.time()
        self._on_change = on_change or (lambda _: None)
        self._placer = Placer(source=config.source)
        self._nats: NatsServer | None = None
        self._workers: list[WorkerProcess] = []
        self._ingress: list[IngressProcess] = []
        self._http_socket: socket.socket | None = None
        self._http_url: str | None = None
        self._monitors: list[asyncio.Task[None]] = []
        self._stopping = False
        self._metrics: MetricsServer | None = None
        if config.metrics.enabled:
            from .metrics.server import MetricsServer

            self._metrics = MetricsServer(
                # Unique: one process may run several deployments of one name (tests, --only hosts).
                self.run_dir / f"metrics.{os.getpid()}.{uuid.uuid4().hex[:8]}", config.metrics.host, config.metrics.port, self._supervised
            )
        self._trace_file_path: str | None = None  # the span file, when tracing exports to one

    @property
    def workers(self) -> list[WorkerProcess]:
        return list(self._workers)

    @property
    def ingress(self) -> list[IngressProcess]:
        """The HTTP ingress processes (none without an ``http`` section, or with ``only``)."""
        return list(self._ingress)

    @property
    def metrics_url(self) -> str | None:
        """``http://HOST:PORT/metrics`` of the deployment's Prometheus metrics, once served."""
        return self._metrics.url if self._metrics is not None and self._metrics.started else None

    def _supervised(self) -> list[SupervisedProcess]:
        from .metrics.server import SupervisedProcess

        return [
            SupervisedProcess(self.config.name, self._operator_label(p), p.name, p.restarts, p.ready)
            for p in [*self._workers, *self._ingress]
        ]

    @staticmethod
    def _operator_label(process: WorkerProcess) -> str:
        return "http" if isinstance(process, IngressProcess) else process.spec.operator.name

    @property
    def http_url(self) -> str | None:
        """``http://HOST:PORT`` of the HTTP front door, once it listens."""
        return self._http_url

    def _serves_http(self) -> bool:
        # The front door runs where the whole deployment runs, or alone (http_only); a host
        # running some operators (--only) leaves it to another.
        if self.http_only:
            return True
        return self.config.http is not None and len(self.operators) == len(self.config.operators)

    async def start(self) -> None:
        """Start NATS (unless given) and every worker; return when all are ready."""
        try:
            # Before anything starts: a device that cannot be had fails the deploy at once.
            await self._placer.acheck(self.operators)
            self._trace_file_path = self._trace_file()  # bad OTEL_* settings fail it too
            if self._serves_http():
                self._bind_http()
            if self._metrics is not None:  # a port in use fails the deploy before any worker starts
                self._metrics.prepare()
                self._metrics.start()
            if self.nats_url is None:
                embedded = self.config.request_plane.embedded
                cert, key = (
                    str(self.config.root / f) if f else None
                    for f in (embedded.tls_cert_file, embedded.tls_key_file)
                )
                self._nats = NatsServer(
                    self.run_dir / "nats",
                    embedded.host,
                    embedded.port,
                    embedded.jetstream,
                    config_text=embedded_server_config(self.nats_options, cert, key),
                    max_procs=embedded_max_procs(embedded.max_procs),
                )
                self.nats_url = await self._nats.start()
                log.info("embedded nats-server listening on %s", self.nats_url)
            if any(op.kind == "triton" for op in self.operators):
                # Once, here, with progress on the console, rather than inside a worker's start
                # timeout; the workers then find it ready.
                from .triton.environment import setup_triton

                installation = await asyncio.to_thread(setup_triton, progress=log.info)
                log.info("Triton: %s", installation.source)
            self._workers = [
                self._make_worker(op, index)
                for op in self.operators
                for index in range(self.local_workers or op.workers)
            ]
            results = await asyncio.gather(
                *(w.start(self.start_timeout_s) for w in self._workers), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                if len(errors) > 1 and isinstance(errors[0], WorkerStartError):
                    raise WorkerStartError(f"{errors[0]} (and {len(errors) - 1} more workers failed)")
                raise errors[0]
            if self._http_socket is not None:
                # After the workers, so the front door's first requests find them serving.
                assert self.config.http is not None
                self._ingress = [self._make_ingress(index) for index in range(self.config.http.workers)]
                for result in await asyncio.gather(
                    *(p.start(self.start_timeout_s) for p in self._ingress), return_exceptions=True
                ):
                    if isinstance(result, BaseException):
                        raise result
                log.info("HTTP front door on %s (%d processes)", self.http_url, len(self._ingress))
        except BaseException:
            await self.stop(grace_s=2.0)
            raise
        self._monitors = [asyncio.create_task(self._supervise(w)) for w in [*self._workers, *self._ingress]]
        self._on_change(self)

    def _bind_http(self) -> None:
        """Bind the front door's socket here, once, and hand it to every ingress process.

        Binding in the deployment (rather than SO_REUSEPORT in each process) means port 0 gives
        one port all processes share and the banner can print, a port in use fails the deploy
        before anything starts, and no other process can join the port.
        """
        from .http.server import listening_socket
        from .http.spec import resolve_token

        assert self.config.http is not None
        resolve_token(self.config.http.auth, self.config.root)  # a missing token fails now
        self._http_socket = listening_socket(self.config.http.host, self.config.http.port)
        host, port = self._http_socket.getsockname()[:2]
        self._http_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _make_ingress(self, index: int) -> IngressProcess:
        assert self.nats_url is not None and self._http_socket is not None
        spec = IngressSpec(
            deployment=self.config,
            root=str(self.config.root),
            index=index,
            nats_url=self.nats_url,
            nats=self.nats_options,
            listen_fd=self._http_socket.fileno(),
            drain_timeout_s=self.drain_timeout_s,
            parent_pid=os.getpid(),
            metrics_dir=self._metrics_dir(),
        )
        log_file = None if str(self.log_dir) == LOG_TO_OUTPUT else self.log_dir / f"http.{index}.log"
        return IngressProcess(spec, log_file, self.config.root)

    def _make_worker(self, op: OperatorConfig, index: int) -> WorkerProcess:
        assert self.nats_url is not None
        placement = self._placer.place(op, index)
        spec = WorkerSpec(
            deployment=self.config.name,
            operator=op,
            data_plane=self.config.data_plane,
            index=index,
            nats_url=self.nats_url,
            nats=self.nats_options,
            root=str(self.config.root),
            log_level=self.config.log_level,
            request_timeout_s=self.config.request_plane.request_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            parent_pid=os.getpid(),
            device=placement.device,
            gpu=placement.gpu,
            metrics_dir=self._metrics_dir(),
            tracing=self.config.tracing.with_file_under(self.config.root),
        )
        log_file = None if str(self.log_dir) == LOG_TO_OUTPUT else self.log_dir / f"{op.name}.{index}.log"
        return WorkerProcess(spec, log_file, self.config.root)

    def _metrics_dir(self) -> str | None:
        return str(self._metrics.directory) if self._metrics is not None else None

    async def _supervise(self, worker: WorkerProcess) -> None:
        """Restart ``worker`` whenever it exits while the deployment is running."""
        backoff = _RESTART_FIRST_S
        while not self._stopping:
            assert worker.proc is not None
            code = await worker.proc.wait()
            worker.ready = False
            if self._metrics is not None:
                self._metrics.process_exited(worker.proc.pid)
            if self._stopping:
                return
            if worker.ready_at is not None and time.monotonic() - worker.ready_at > _STABLE_S:
                backoff = _RESTART_FIRST_S
            worker.restarts += 1
            log.warning(
                "worker %s exited (%s); restarting in %.1f s (restart #%d)",
                worker.name, _describe_exit(code), backoff, worker.restarts,
            )  # fmt: skip
            self._on_change(self)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_MAX_S)
            while not self._stopping:
                try:
                    await worker.start(self.start_timeout_s)
                    log.info("worker %s is serving again (pid %s)", worker.name, worker.pid)
                    self._on_change(self)
                    break
                except WorkerStartError as exc:
                    log.error("%s; retrying in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _RESTART_MAX_S)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop workers (callers before callees: reverse file order), then the embedded NATS."""
        self._stopping = True
        for task in self._monitors:
            task.cancel()
        grace = self.drain_timeout_s + 5.0 if grace_s is None else grace_s
        # The front door first: its requests in flight finish while every operator still serves.
        await asyncio.gather(*(p.terminate(grace) for p in self._ingress))
        for p in self._ingress:
            await p.kill()
        if self._http_socket is not None:
            self._http_socket.close()
        for op in reversed(self.operators):
            await asyncio.gather(
                *(w.terminate(grace) for w in self._workers if w.spec.operator.name == op.name)
            )
        for w in self._workers:  # workers still starting when a start failed
            await w.kill()
        if self._nats is not None:
            await self._nats.stop()
        if self._metrics is not None:
            self._metrics.stop()

    async def kill(self) -> None:
        """Stop everything at once, without draining (a second Ctrl-C)."""
        self._stopping = True
        await asyncio.gather(*(w.kill() for w in [*self._ingress, *self._workers]))
        if self._nats is not None:
            await self._nats.stop(timeout_s=1.0)
        if self._metrics is not None:
            self._metrics.stop()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every worker this host runs is ready, with each worker's readiness."""
        workers = {w.name: w.ready for w in self._workers}
        ready = bool(workers) and all(workers.values()) and not self._stopping
        return ready, {"workers": workers}

    @property
    def trace_file(self) -> str | None:
        """The JSON-lines file the workers append their spans to, when tracing exports to one."""
        return self._trace_file_path

    def _trace_file(self) -> str | None:
        from .tracing.settings import resolve_tracing

        settings = resolve_tracing(self.config.tracing.with_file_under(self.config.root))
        return str(settings.file) if settings is not None and settings.file is not None else None

    def state(self) -> DeploymentState:
        if self.nats_url is None:
            raise RunnerError("deployment is not started")
        return DeploymentState(
            name=self.config.name,
            file=str(self.config.source or ""),
            pid=os.getpid(),
            nats_url=self.nats_url,
            nats_pid=self._nats.pid if self._nats else None,
            metrics_url=self.metrics_url,
            log_dir=str(self.log_dir),
            data_plane=self.config.data_plane,
            started_at=self.started_at,
            workers=[w.state() for w in self._workers],
            trace_file=self._trace_file_path,
        )


def select_operators(config: DeploymentConfig, only: Sequence[str] | None) -> list[OperatorConfig]:
    """The operators named in ``only`` (all when None), in file order; unknown names are an error."""
    if only is None:
        return list(config.operators)
    names = {op.name for op in config.operators}
    unknown = [name for name in only if name not in names]
    if unknown or not only:
        raise RunnerError(
            f"deployment {config.name!r} has no operator {', '.join(map(repr, unknown)) or '(none named)'}; "
            f"its operators: {', '.join(op.name for op in config.operators)}"
        )
    return [op for op in config.operators if op.name in only]


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
