"""The ``runner`` command line: deploy, client, validate, schema, status, triton."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ConfigError, RunnerError
from .nats_security import redact_url

EXIT_CONFIG = 2
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
    p.add_argument("file", type=Path, help="deployment YAML file")
    p.add_argument("--nats", metavar="URL", help="use this NATS server instead of the file's or an embedded one")
    p.add_argument("--log-dir", type=Path, help="directory for per-worker logs")
    p.add_argument("--start-timeout", type=float, default=120.0, metavar="S", help="seconds a worker may take to become ready")
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
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("validate", help="check a deployment file and print it normalized")
    p.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the deployment file's JSON Schema")
    p.add_argument("--write", action="store_true", help="write it to schemas/deployment.schema.json")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("status", help="list deployments running on this machine")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("triton", help="manage the Triton Inference Server used by Triton operators")
    triton = p.add_subparsers(dest="triton_command", required=True, metavar="COMMAND")
    p = triton.add_parser("setup", help="install Triton and its model environment (once; cached)")
    p.add_argument("--home", type=Path, metavar="DIR", help="install here (default: $PIPELINE_RUNNER_TRITON_HOME or ~/.cache/pipeline_runner/triton)")
    p.set_defaults(func=_cmd_triton_setup)
    return parser


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
    from .config_loader import load_deployment

    config = load_deployment(args.file)
    workers = ", ".join(f"{op.name}×{op.workers}" for op in config.operators)
    print(f"{args.file}: OK — deployment {config.name!r}, operators: {workers}")
    return 0


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
        )
        stats = asyncio.run(_worker_stats(state, len(state.workers)))
        table = Table(show_header=True)
        columns = ("worker", "pid", "restarts", "served", "unfinished", "cancelled", "redelivered", "tensors held")
        for column in columns:
            table.add_column(column, justify="left" if column == "worker" else "right", no_wrap=True)
        restarts = {f"{w.operator}.{w.index}": w.restarts for w in state.workers}
        for s in sorted(stats, key=lambda s: s["worker"]):
            table.add_row(
                s["worker"], str(s["pid"]), str(restarts.get(s["worker"], "?")), str(s["served"]),
                str(s["unfinished"]), str(s["cancelled"]), str(s.get("redelivered", 0)),
                str(s["data_plane"]["stored_tensors"]),
            )  # fmt: skip
        Console(width=max(Console().width, 100)).print(table)
        if len(stats) < alive:
            print(f"({alive - len(stats)} workers did not answer within 2 s)")
    return 0


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


# --- deploy ------------------------------------------------------------------------------


def _cmd_deploy(args: argparse.Namespace) -> int:
    from .config_loader import load_deployment

    config = load_deployment(args.file)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return asyncio.run(_deploy(config, args))


async def _deploy(config: Any, args: argparse.Namespace) -> int:
    from .deployment import Deployment
    from .state import remove_state, write_state

    deployment = Deployment(
        config,
        nats_url=args.nats,
        log_dir=args.log_dir,
        start_timeout_s=args.start_timeout,
        on_change=lambda d: write_state(d.state()),
    )
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
        f"  logs:  {deployment.log_dir}\n"
        f"  try:   runner client --requests 100\n"
        f"Press Ctrl-C to stop.",
        flush=True,
    )


# --- client ------------------------------------------------------------------------------


def _cmd_client(args: argparse.Namespace) -> int:
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
        served = sorted({w.operator for w in state.workers})
        if state.name == deployment and args.operator not in served:
            raise RunnerError(
                f"deployment {deployment!r} has no operator {args.operator!r} "
                f"(its operators: {', '.join(served)}); choose one with --operator"
            )
    inputs = make_inputs(args.size, args.dtype, count=min(args.requests, 16))
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
        ) as progress:
            task = progress.add_task("requests", total=args.requests, errors=0)
            errors = 0

            def on_done(ok: bool) -> None:
                nonlocal errors
                errors += not ok
                progress.update(task, advance=1, errors=errors)

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
        await connection.close()
    _print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0 if result.ok == result.requests else 1


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
