"""What ``runner compile``, and ``runner deploy`` / ``validate`` given ``module:Class``, do."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import DeploymentConfig
from ..errors import ConfigError, RunnerError
from .compile import CompiledDeployment, check_against, compile_target, is_class_target
from .declare import class_defaults
from .explain import Source, explain_operator, render


def load_target(target: str, name: str | None = None) -> DeploymentConfig:
    """The deployment a file describes, or that ``package.module:Class`` compiles to (in memory)."""
    if is_class_target(target):
        return compile_target(target, name=name).config
    if name is not None:
        raise RunnerError("--name is for a 'package.module:Class' target; a deployment file names its deployment")
    from ..config_loader import load_deployment

    return load_deployment(target)


def explain_target(target: str, name: str | None = None, workers: int | None = None) -> str:
    """``runner validate --explain``: each operator field's value and where it came from."""
    flags = {"workers": workers} if workers is not None else {}
    if is_class_target(target):
        compiled = compile_target(target, name=name)
        explanations = [
            explain_operator(
                op.config,
                from_class={"name": op.config.name, "implementation": op.source, **class_defaults(op.cls).fields},
                flags=flags,
                origin=op.source,
            )
            for op in compiled.operators
        ]
        source: Source = "flag" if name else "class"
        return render(compiled.config, explanations, target, source)
    config = load_target(target, name)
    written = yaml.safe_load(Path(target).read_text(encoding="utf-8-sig"))["operators"]
    explanations = [explain_operator(op, written=entry, flags=flags) for op, entry in zip(config.operators, written, strict=True)]
    return render(config, explanations, target, "file")


def add_compile_parser(sub: Any) -> None:
    p = sub.add_parser("compile", help="write the deployment file of a Python-first pipeline (package.module:Class)")
    p.add_argument("target", metavar="package.module:Class", help="the entry operator class; modules resolve from the current directory")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here (keeping its request_plane, data_plane, log_level and log_dir) instead of stdout")
    p.add_argument("--name", help="deployment name (default: an existing --output's, else the module's last part)")
    p.add_argument("--check", type=Path, metavar="FILE", help="write nothing; exit 1 with a diff when FILE is not what the code compiles to")
    p.set_defaults(func=run_compile)


def run_compile(args: argparse.Namespace) -> int:
    if not is_class_target(args.target):
        raise RunnerError(f"runner compile takes 'package.module:Class', got {args.target!r}")
    if args.check is not None and args.output is not None:
        raise RunnerError("--check and --output exclude each other")
    if args.check is not None:
        return _check(args.check, args.target, args.name)
    output: Path | None = args.output
    settings: dict[str, Any] = {}
    name = args.name
    if output is not None and output.exists():
        # The file's deployment settings (the code has none) and name survive recompiling; the
        # rest may be stale (a renamed module), so the file need not validate as it is.
        settings = _written_settings(output)
        if name is None and isinstance(settings.get("name"), str):
            name = settings["name"]
    working_dir = _relative_cwd(output.parent) if output is not None else "."
    compiled = compile_target(args.target, name=name, working_dir=working_dir, settings=settings)
    text = compiled.render(_command(args))
    if output is None:
        sys.stdout.write(text)
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    _validated(output, compiled)
    print(f"wrote {output}: deployment {compiled.config.name!r}, operators: {_operators(compiled)}", file=sys.stderr)
    return 0


def _written_settings(file: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([f"{file}: cannot read the deployment settings to keep: {exc}"]) from None
    return data if isinstance(data, dict) else {}


def _check(file: Path, target: str, name: str | None) -> int:
    from ..config_loader import load_deployment

    file_config = load_deployment(file)  # an invalid file exits 2 with its problems
    compiled = compile_target(target, name=name)
    diff = check_against(file, file_config, compiled, compare_name=name is not None)
    if not diff:
        print(f"{file}: OK — agrees with {target} (operators: {_operators(compiled)})")
        return 0
    print(f"{file} disagrees with the code of {target}; `runner compile {target} -o {file}` rewrites it:")
    print("\n".join(diff))
    return 1


def _validated(output: Path, compiled: CompiledDeployment) -> None:
    """What was written must load as a deployment file: the same checks as ``runner validate``."""
    from ..config_loader import load_deployment

    try:
        load_deployment(output)
    except ConfigError as exc:  # a bug of the compiler, not of the user's code
        raise ConfigError([f"{output} was written but does not validate:", *exc.problems]) from None


def _relative_cwd(directory: Path) -> str:
    """The current directory as seen from ``directory``: the compiled file's working_dir."""
    return Path(os.path.relpath(Path.cwd(), directory.resolve())).as_posix()


def _operators(compiled: CompiledDeployment) -> str:
    return ", ".join(f"{op.config.name}×{op.config.workers}" for op in compiled.operators)


def _command(args: argparse.Namespace) -> str:
    parts = ["runner compile", args.target]
    if args.output is not None:
        parts += ["-o", str(args.output)]
    if args.name:
        parts += ["--name", args.name]
    return " ".join(parts)
