"""The ``runner`` command line: deploy, client, validate, schema, status, triton."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import tracing
from .errors import ConfigError, RunnerError
from .nats_security import redact_url
from .process import use_fast_event_loop

if TYPE_CHECKING:
    from .capacity import HostShare
    from .config import DeploymentConfig

EXIT_CONFIG = 2
# runner client redraws its progress bar this often (rich defaults to 10 a second).
_PROGRESS_REDRAWS_PER_S = 4
console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner", description="Run multi-step inference pipelines over NATS."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("deploy", help="start a deployment in the foreground (Ctrl-C stops it)")
    p.add_argument("file", metavar="FILE|package.module:Class", help="deployment YAML file, or a Python-first pipeline's entry class (compiled in memory)")
    p.add_argument("--name", help="deployment name of a package.module:Class (default: the module's last part)")
    p.add_argument("--nats", metavar="URL[,URL...]", help="use this NATS server (or these cluster members) instead of the file's or an embedded one")
    p.add_argument("--only", type=_names, metavar="OP[,OP...]", help="run only these operators on this host (the others run elsewhere on the same NATS)")
    p.add_argument("--workers", type=_positive_int, metavar="N", help="run N workers of each operator here instead of the file's count")
    p.add_argument("--data-plane-host", metavar="ADDR", help="interface the data plane listens on, reachable by the other hosts (overrides data_plane.host)")
    p.add_argument("--health-port", type=int, metavar="PORT", help="serve GET /healthz and /readyz on this port (0: any free port)")
    p.add_argument("--health-host", default="127.0.0.1", metavar="ADDR", help="interface of the health endpoints (default 127.0.0.1)")
    p.add_argument("--http-only", action="store_true", help="run only the HTTP front door here (the file's http section), no workers; --workers N: N ingress processes")
    p.add_argument("--http-host", metavar="ADDR", help="interface of the HTTP front door (overrides http.host)")
    p.add_argument("--http-port", type=int, metavar="PORT", help="port of the HTTP front door (overrides http.port; 0: any free port)")
    p.add_argument("--metrics-host", metavar="ADDR", help="interface of the Prometheus /metrics endpoint (overrides metrics.host)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="port of the Prometheus /metrics endpoint (overrides metrics.port; 0: any free port)")
    p.add_argument("--log-dir", type=Path, help="directory for per-worker logs; '-': the workers log to this command's output (containers, kubectl logs)")
    p.add_argument("--start-timeout", type=float, default=120.0, metavar="S", help="seconds a worker may take to become ready")
    p.add_argument("--allow-oversubscribe", action="store_true", help="start the workers even where they exceed this host's CPUs, memory or limits (see runner validate)")
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("client", help="load-test a deployment and check every response")
    p.add_argument("--requests", type=_positive_int, default=100, help="number of requests (default 100)")
    p.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight (default 8)")
    p.add_argument("--operator", default="encoder_decoder", help="operator to call (default encoder_decoder)")
    p.add_argument("--version", type=_positive_int, default=1, help="operator version (default 1)")
    p.add_argument("--nats", metavar="URL", help="NATS URL (default: the running deployment's)")
    p.add_argument("--deployment", metavar="NAME", help="deployment name (default: the one running here)")
    p.add_argument("--size", type=_positive_int, default=1024, metavar="ELEMENTS", help="elements per input tensor (default 1024)")
    p.add_argument("--dtype", default="int32", help="input dtype (default int32)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="deadline per request in seconds (default 30)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="request parameter (VALUE parsed as JSON if it can be); repeatable")
    p.add_argument("--no-check", action="store_true", help="do not compare outputs with inputs")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for the deployment to come up")
    p.add_argument("--data-plane-host", metavar="ADDR", help="interface this client's data plane listens on for large inputs (default: the deployment's setting)")
    p.add_argument("--trace", type=_positive_int, nargs="?", const=5, metavar="N", help="trace every request and show where the N slowest spent their time, hop by hop (default 5; needs a deployment that records traces, see README \"Traces\")")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("validate", help="check a deployment file and print it normalized")
    p.add_argument("file", metavar="FILE|package.module:Class")
    p.add_argument("--name", help="deployment name of a package.module:Class (default: the module's last part)")
    p.add_argument("--explain", action="store_true", help="show each operator field's value and where it came from (default, class, file or flag)")
    p.add_argument("--workers", type=_positive_int, metavar="N", help="with --explain: as `runner deploy --workers N` would run it")
    p.set_defaults(func=_cmd_validate)

    from .python_first.commands import add_compile_parser

    add_compile_parser(sub)

    p = sub.add_parser("schema", help="print the deployment file's JSON Schema")
    p.add_argument("--write", action="store_true", help="write it to schemas/deployment.schema.json")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("status", help="list deployments running on this machine")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("nats-server", help="run a nats-server in the foreground, e.g. one member of a NATS cluster")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="client interface (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=4222, help="client port (default 4222; 0 picks a free one)")
    p.add_argument("--name", metavar="NAME", help="server name, unique in the cluster (default: the host name)")
    p.add_argument("--cluster", metavar="NAME", default="pipeline_runner", help="cluster name (default pipeline_runner)")
    p.add_argument("--cluster-host", metavar="ADDR", help="interface for routes from the other members (default: --host)")
    p.add_argument("--cluster-port", type=int, default=6222, help="route port (default 6222; 0 disables clustering)")
    p.add_argument("--routes", type=_names, default=[], metavar="URL[,URL...]", help="the other members' route URLs, e.g. nats-route://10.0.0.2:6222")
    p.add_argument("--store-dir", type=Path, metavar="DIR", help="JetStream storage (default: in the runner's state directory)")
    p.add_argument("--no-jetstream", action="store_true", help="plain NATS without JetStream (no delivery guarantee)")
    p.set_defaults(func=_cmd_nats_server)

    p = sub.add_parser("k8s", help="write Kubernetes manifests that run a deployment (kubectl apply -f)")
    p.add_argument("file", type=Path, help="deployment YAML file")
    p.add_argument("-o", "--output", type=Path, metavar="PATH", help="write here instead of stdout: a directory (one file per object) or a .yaml file")
    p.add_argument("--image", help="runner image of the workers (containers/build.sh; default pipeline-runner:cpu, pipeline-runner:gpu for device gpu)")
    p.add_argument("--gpu-image", metavar="IMAGE", help="image of the device gpu operators (default: --image if given, else pipeline-runner:gpu)")
    p.add_argument("--file-in-image", metavar="PATH", help="the deployment file's path inside the image (default /app/<its path in the repository>)")
    p.add_argument("--image-pull-policy", choices=("Always", "IfNotPresent", "Never"), help="of the worker containers (default: Kubernetes', Always for :latest)")
    p.add_argument("--namespace", metavar="NS", help="namespace of every object (default: kubectl's current one)")
    p.add_argument("--nats", metavar="URL", help="an existing NATS for the workers: no NATS cluster is written (default: the file's nats_url, else a cluster)")
    p.add_argument("--nats-replicas", type=_positive_int, default=3, metavar="N", help="members of the NATS cluster (default 3)")
    p.add_argument("--nats-image", default="nats:2.10-alpine", metavar="IMAGE", help="nats-server image (default nats:2.10-alpine)")
    p.add_argument("--nats-storage", default="10Gi", metavar="SIZE", help="JetStream volume per NATS member (default 10Gi)")
    p.add_argument("--nats-storage-class", metavar="CLASS", help="storage class of those volumes (default: the cluster's)")
    p.add_argument("--nats-secret", metavar="NAME", help="Secret with keys PIPELINE_RUNNER_NATS_TOKEN / _USER / _PASSWORD for NATS credentials")
    p.set_defaults(func=_cmd_k8s)

    p = sub.add_parser("triton", help="manage the Triton Inference Server used by Triton operators")
    triton = p.add_subparsers(dest="triton_command", required=True, metavar="COMMAND")
    p = triton.add_parser("setup", help="install Triton and its model environment (once; cached)")
    p.add_argument("--home", type=Path, metavar="DIR", help="install here (default: $PIPELINE_RUNNER_TRITON_HOME or ~/.cache/pipeline_runner/triton)")
    p.set_defaults(func=_cmd_triton_setup)
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


# --- validate / schema / status ----------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    from .python_first.commands import explain_target

    if args.explain:
        sys.stdout.write(explain_target(args.file, args.name, args.workers))
        return 0
    if args.workers is not None:
        raise RunnerError("--workers goes with --explain")
    config, capacity_problems = _load_for_this_host(args.file, args.name)
    for problem in capacity_problems:
        print(f"warning: {problem}", file=sys.stderr)
    workers = ", ".join(f"{op.name}×{op.workers}" for op in config.operators)
    print(f"{args.file}: OK — deployment {config.name!r}, operators: {workers}")
    return 0


def _load_for_this_host(target: str, name: str | None, share: HostShare | None = None) -> tuple[DeploymentConfig, list[str]]:
    """The deployment ``target`` describes, and each way its ``share`` of workers exceeds this host."""
    from .capacity import HostShare
    from .config_loader import capacity_lines, check_deployment
    from .python_first.commands import load_target
    from .python_first.compile import is_class_target

    share = share or HostShare()
    if is_class_target(target) or name is not None:
        config = load_target(target, name)  # refuses --name with a file
        return config, capacity_lines(config, share, target)
    checked = check_deployment(target, share)
    return checked.config, checked.capacity_problems


def _cmd_schema(args: argparse.Namespace) -> int:
    from .schema import schema_text, write_schema

    if args.write:
        print(f"wrote {write_schema()}")
    else:
        sys.stdout.write(schema_text())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .state import running_deployments

    running = running_deployments()
    if not running:
        print("no deployment is running on this machine")
        return 0
    for state in running:
        alive = sum(1 for w in state.workers if w.pid)
        print(
            f"{state.name}: pid {state.pid}, NATS {redact_url(state.nats_url)}, "
            f"{alive}/{len(state.workers)} workers, logs {state.log_dir}"
            + (f", metrics {state.metrics_url}" if state.metrics_url else "")
        )
        stats = asyncio.run(_worker_stats(state, len(state.workers)))
        table = Table(show_header=True)
        columns = (
            "worker", "host", "pid", "device", "restarts", "served", "unfinished", "cancelled", "redelivered",
            "tensors held",
        )  # fmt: skip
        for column in columns:
            table.add_column(column, justify="left" if column in ("worker", "host") else "right", no_wrap=True)
        # Workers of the same deployment on other hosts answer too, with the same names (each host
        # numbers its own from 0): only this host's state file knows restarts, by pid.
        here = socket.gethostname()
        restarts = {w.pid: w.restarts for w in state.workers if w.pid}
        for s in sorted(stats, key=lambda s: (s["worker"], s.get("host", ""), s["pid"])):
            local = s.get("host") == here and s["pid"] in restarts
            table.add_row(
                s["worker"], str(s.get("host", "?")), str(s["pid"]), _device_label(s),
                str(restarts[s["pid"]]) if local else "-", str(s["served"]), str(s["unfinished"]),
                str(s["cancelled"]), str(s.get("redelivered", 0)), str(s["data_plane"]["stored_tensors"]),
            )  # fmt: skip
        Console(width=max(Console().width, 120)).print(table)
        if len(stats) < alive:
            print(f"({alive - len(stats)} workers did not answer within 2 s)")
    return 0


def _cmd_nats_server(args: argparse.Namespace) -> int:
    return asyncio.run(_nats_server(args))


async def _nats_server(args: argparse.Namespace) -> int:
    import socket

    from .nats_security import NatsClientOptions, embedded_server_config
    from .nats_server import ClusterSpec, NatsServer
    from .state import state_dir

    name = args.name or socket.gethostname()
    cluster = None
    if args.cluster_port:
        cluster = ClusterSpec(args.cluster, args.cluster_host or args.host, args.cluster_port, args.routes)
    elif args.routes:
        raise RunnerError("--routes needs a --cluster-port to accept routes on")
    workdir = args.store_dir or state_dir() / "nats-server" / name
    # Credentials come from the PIPELINE_RUNNER_NATS_* variables, as for the workers.
    options = NatsClientOptions.resolve()
    server = NatsServer(
        workdir, args.host, args.port, not args.no_jetstream,
        config_text=embedded_server_config(options, None, None),
        server_name=name, cluster=cluster,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = await server.start()
    members = f", cluster {args.cluster!r} on {cluster.host}:{cluster.port}, routes: {', '.join(args.routes) or 'none'}" if cluster else ""
    print(f"nats-server {name!r} listening on {url}{members}\n  log: {server.log_file}\nPress Ctrl-C to stop.", flush=True)
    waiter = asyncio.create_task(stop.wait())
    exited = asyncio.create_task(server.wait())
    await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if exited.done():
        raise RunnerError(f"nats-server exited: {server.log_tail()}")
    exited.cancel()
    await server.stop()
    return 0


def _device_label(stats: dict[str, Any]) -> str:
    """``cpu``, or ``gpu N`` with the deployment's number of the worker's GPU."""
    device = str(stats.get("device", "?"))
    return f"gpu {stats['gpu']}" if device == "gpu" and stats.get("gpu") is not None else device


def _cmd_triton_setup(args: argparse.Namespace) -> int:
    from .triton.environment import setup_triton

    installation = setup_triton(args.home, progress=lambda message: print(message, flush=True))
    print(f"tritonserver: {installation.server}")
    print(f"backends:     {installation.backend_dir}")
    if installation.model_python is not None:
        print(f"model python: {installation.model_python}")
    print(f"source:       {installation.source}")
    return 0


async def _worker_stats(state: Any, expected: int) -> list[dict[str, Any]]:
    from .remote import Connection

    async with await Connection.connect(state.nats_url, state.name) as connection:
        return await connection.worker_stats(expected=expected, timeout_s=2.0)


# --- k8s ---------------------------------------------------------------------------------


def _cmd_k8s(args: argparse.Namespace) -> int:
    from .config_loader import load_deployment
    from .k8s import K8sOptions, manifests, portability_warnings, to_yaml, write_manifests

    config = load_deployment(args.file)
    options = K8sOptions(
        image=args.image,
        gpu_image=args.gpu_image,
        file_in_image=args.file_in_image,
        namespace=args.namespace,
        nats_url=args.nats,
        nats_replicas=args.nats_replicas,
        nats_image=args.nats_image,
        nats_storage=args.nats_storage,
        nats_storage_class=args.nats_storage_class,
        nats_secret=args.nats_secret,
        image_pull_policy=args.image_pull_policy,
    )
    objects = manifests(config, options)
    for warning in portability_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    header = f"Deployment {config.name!r} on Kubernetes, written by `runner k8s` from {args.file}.\nApply with: kubectl apply -f <this>"
    if args.output is None:
        sys.stdout.write(to_yaml(objects, header))
    else:
        written = write_manifests(objects, args.output, header)
        where = args.output if len(written) > 1 else written[0]
        print(f"wrote {len(objects)} objects to {where}", file=sys.stderr)
    return 0


# --- deploy ------------------------------------------------------------------------------


def _cmd_deploy(args: argparse.Namespace) -> int:
    from .capacity import HostShare

    config, capacity_problems = _load_for_this_host(args.file, args.name, HostShare(args.only, args.workers))
    if capacity_problems and not args.allow_oversubscribe:
        refusal = f"{args.file}: not deploying beyond this host's capacity; --allow-oversubscribe starts the workers anyway"
        raise ConfigError([*capacity_problems, refusal])
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for problem in capacity_problems:
        logging.getLogger("pipeline_runner.deployment").warning("%s (--allow-oversubscribe)", problem)
    return asyncio.run(_deploy(config, args))


async def _deploy(config: Any, args: argparse.Namespace) -> int:
    from .deployment import Deployment
    from .state import write_state

    deployment = Deployment(
        config,
        nats_url=args.nats,
        log_dir=args.log_dir,
        start_timeout_s=args.start_timeout,
        on_change=lambda d: write_state(d.state()),
        only=args.only,
        workers=args.workers,
        data_plane_host=args.data_plane_host,
        http_only=args.http_only,
        http_host=args.http_host,
        http_port=args.http_port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
    )
    health = None
    if args.health_port is not None:
        from .health import HealthServer

        health = HealthServer(deployment.readiness, args.health_host, args.health_port)
        await health.start()
    try:
        return await _run_deployment(deployment)
    finally:
        if health is not None:
            await health.stop()


async def _run_deployment(deployment: Any) -> int:
    from .state import remove_state

    config = deployment.config
    stop = asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            print("\nstopping (Ctrl-C again to kill at once)...", file=sys.stderr, flush=True)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    starting = asyncio.create_task(deployment.start())
    await _first(starting, stop)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 130
    starting.result()  # raises a WorkerStartError with the worker's own message
    try:
        _print_banner(deployment)
        await stop.wait()
        stop.clear()
        draining = asyncio.create_task(deployment.stop())
        await _first(draining, stop)
        if not draining.done():  # a second Ctrl-C: no more waiting for in-flight requests
            await deployment.kill()
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)
        print("stopped.", file=sys.stderr, flush=True)
    finally:
        remove_state(config.name, os.getpid())
    return 0


async def _first(task: asyncio.Task[None], event: asyncio.Event) -> None:
    """Wait until ``task`` finishes or ``event`` is set, whichever comes first."""
    waiter = asyncio.create_task(event.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def _print_banner(deployment: Any) -> None:
    config = deployment.config
    counts = Counter(w.spec.operator.name for w in deployment.workers)
    workers = ", ".join(f"{name}×{n}" for name, n in counts.items())
    embedded = "" if config.request_plane.nats_url or deployment._nats is None else " (embedded)"
    print(
        f"Deployment {config.name!r} is running: {sum(counts.values())} workers ({workers})\n"
        f"  NATS:  {redact_url(deployment.nats_url)}{embedded}\n"
        + (f"  HTTP: {deployment.http_url}\n" if deployment.http_url else "")
        + (f"  metrics: {deployment.metrics_url}\n" if deployment.metrics_url else "")
        + f"  logs:  {deployment.log_dir}\n"
        + (f"  traces: {deployment.trace_file} (runner client --trace)\n" if deployment.trace_file else "")
        + f"  try:   runner client --requests 100\n"
        f"Press Ctrl-C to stop.",
        flush=True,
    )


# --- client ------------------------------------------------------------------------------


def _cmd_client(args: argparse.Namespace) -> int:
    use_fast_event_loop()
    return asyncio.run(_client(args))


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RunnerError(f"--param must look like KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


async def _client(args: argparse.Namespace) -> int:
    from .client import make_inputs, run_load_test
    from .remote import Connection
    from .state import find_deployment, wait_for_deployment

    parameters = _parse_params(args.param)
    deployment = args.deployment
    nats_url = args.nats
    data_plane = None
    trace_file: str | None = None
    if nats_url is None or deployment is None:
        try:
            state = wait_for_deployment(deployment, args.wait) if args.wait else find_deployment(deployment)
        except RunnerError:
            if nats_url is None:
                raise
            raise RunnerError("--nats was given without --deployment and no deployment runs here: pass --deployment NAME") from None
        nats_url = nats_url or state.nats_url
        deployment = deployment or state.name
        data_plane = state.data_plane
        trace_file = state.trace_file if state.name == deployment else None
        served = sorted({w.operator for w in state.workers})
        if state.name == deployment and args.operator not in served:
            raise RunnerError(
                f"deployment {deployment!r} has no operator {args.operator!r} "
                f"(its operators: {', '.join(served)}); choose one with --operator"
            )
    inputs = make_inputs(args.size, args.dtype, count=min(args.requests, 16))
    if args.data_plane_host is not None:
        from .config import DataPlaneConfig

        data_plane = (data_plane or DataPlaneConfig()).model_copy(update={"host": args.data_plane_host})
    trace_settings = _client_tracing(trace_file, deployment, args.trace is not None)
    tracing.configure(trace_settings, "runner-client", {"pipeline_runner.deployment": deployment})
    connection = await Connection.connect(
        nats_url, deployment, default_timeout_s=args.timeout, data_plane=data_plane
    )
    try:
        operator = connection.operator(args.operator, args.version)
        console.print(
            f"{args.requests} requests to {deployment}/{args.operator} v{args.version} via {redact_url(nats_url)}, "
            f"concurrency {args.concurrency}, input {args.size} × {args.dtype}"
        )
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            refresh_per_second=_PROGRESS_REDRAWS_PER_S,
        ) as progress:
            task = progress.add_task("requests", total=args.requests, errors=0)
            done, errors = 0, 0

            def on_done(ok: bool) -> None:
                # Counted here, shown by show_progress: rich's update per request (a lock and a
                # speed sample) cost the client more than its own load loop.
                nonlocal done, errors
                done += 1
                errors += not ok

            async def show_progress() -> None:
                while True:
                    progress.update(task, completed=done, errors=errors)
                    await asyncio.sleep(1 / _PROGRESS_REDRAWS_PER_S)

            shower = asyncio.create_task(show_progress())
            try:
                result = await run_load_test(
                    operator,
                    requests=args.requests,
                    concurrency=args.concurrency,
                    inputs=inputs,
                    parameters=parameters,
                    timeout_s=args.timeout,
                    check=not args.no_check,
                    on_done=on_done,
                )
            finally:
                shower.cancel()
                progress.update(task, completed=done, errors=errors)
    finally:
        await connection.close()
        tracing.shutdown()
    _print_result(result)
    if args.trace is not None and trace_settings is not None:
        _print_slowest(result.slowest(args.trace), trace_settings)
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0 if result.ok == result.requests else 1


def _client_tracing(trace_file: str | None, deployment: str, asked: bool) -> Any:
    """How this client traces: into the deployment's span file, else as OTEL_* say (None: not at all)."""
    from .tracing.settings import TracingSettings, resolve_tracing

    settings = TracingSettings("file", Path(trace_file)) if trace_file else resolve_tracing(None)
    if asked and settings is None:
        raise RunnerError(
            f"--trace: deployment {deployment!r} records no traces here; deploy it with tracing on "
            "(a `tracing:` section with exporter: file, or PIPELINE_RUNNER_TRACE_FILE=PATH), or set "
            "OTEL_TRACES_EXPORTER=otlp here to send this client's spans to your collector"
        )
    return settings


def _print_slowest(slowest: list[Any], settings: Any) -> None:
    """Where the slowest requests spent their time (from the span file), or their trace ids."""
    out = Console()
    if settings.file is None:
        out.print(f"slowest requests (look them up in your tracing backend, exporter {settings.exporter}):")
        for rank, traced in enumerate(slowest, 1):
            out.print(f"  {rank}. {traced.latency_s * 1000:.2f} ms  trace {traced.trace_id}")
        return
    from .tracing.breakdown import hop_timings
    from .tracing.file_exporter import wait_for_spans

    spans = wait_for_spans(settings.file, {t.trace_id for t in slowest})

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    table = Table(title=f"where the {len(slowest)} slowest requests spent their time (ms)", show_header=True)
    for name in ("request", "hop (worker)", "queue", "execute", "calls", "fetch"):
        table.add_column(name, justify="left" if name in ("request", "hop (worker)") else "right")
    for rank, traced in enumerate(slowest, 1):
        hops = hop_timings(spans, traced.trace_id)
        label = f"{rank}. {traced.latency_s * 1000:.2f}"
        if not hops:
            table.add_row(label, "(no spans from the workers)", "", "", "", "", end_section=True)
            continue
        for i, hop in enumerate(hops):
            table.add_row(label if i == 0 else "", "  " * hop.depth + hop.worker, ms(hop.queue_ms),
                          ms(hop.execute_ms), ms(hop.calls_ms), ms(hop.fetch_ms), end_section=i == len(hops) - 1)
    out.print(table)
    out.print("queue: from the caller's send to the start of execute (NATS, work queue, worker queue); "
              "calls / fetch: the part of execute spent waiting on downstream operators / the data plane")
    for rank, traced in enumerate(slowest, 1):
        out.print(f"  {rank}. trace {traced.trace_id}")


def _print_result(result: Any) -> None:
    def ms(q: float) -> str:
        value = result.percentile_ms(q)
        return "-" if value is None else f"{value:.2f} ms"

    table = Table(title="runner client results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests ok", f"{result.ok}/{result.requests}")
    table.add_row("failed", str(result.failed))
    table.add_row("timed out", str(result.timed_out))
    table.add_row("throughput", f"{result.throughput:.1f} req/s")
    table.add_row("latency p50", ms(50))
    table.add_row("latency p90", ms(90))
    table.add_row("latency p99", ms(99))
    table.add_row("latency max", ms(100))
    table.add_row("wall time", f"{result.duration_s:.2f} s")
    out = Console()
    out.print(table)
    for message, count in result.errors.most_common(5):
        out.print(f"[red]{count} × {message}[/red]")


if __name__ == "__main__":
    sys.exit(main())
