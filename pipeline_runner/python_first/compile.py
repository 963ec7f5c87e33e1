"""``runner compile``: from an entry Operator class, through its ``depends``, to a deployment.

The operators are listed callees first (the deployment stops them in reverse file order, so
callers stop before the operators they call); each entry carries the class's
``@operator_defaults`` and a comment naming the class it came from.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import DeploymentConfig, OperatorConfig
from ..errors import ConfigError
from ..operator import Operator
from .declare import class_defaults, class_path, dependencies, describe_errors, operator_name
from .endpoint import endpoint_spec

_CLASS_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

#: Deployment settings the code has no say in: a compiled file may set them, and compiling into
#: an existing file keeps them (the code owns the operators and where they are imported from).
FILE_OWNED = ("request_plane", "data_plane", "http", "log_level", "log_dir")


def is_class_target(text: str) -> bool:
    """True for ``package.module:Class``; False for a path that exists or ends in .yaml/.yml."""
    if text.endswith((".yaml", ".yml")) or Path(text).exists():
        return False
    return bool(_CLASS_TARGET.match(text))


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Modules resolve from the current directory, as with ``python -m``."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_class(target: str) -> type:
    """The class ``package.module:Class`` names, imported with the current directory on sys.path."""
    module_name, _, class_name = target.partition(":")
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except ConfigError:
            raise  # a declaration error (e.g. @operator_defaults) already names its class
        except Exception as exc:
            where = f" (modules resolve from the current directory, {os.getcwd()})" if isinstance(exc, ModuleNotFoundError) else ""
            raise ConfigError([f"{target}: cannot import {module_name!r}: {type(exc).__name__}: {exc}{where}"]) from None
    found = getattr(module, class_name, None)
    if found is None:
        raise ConfigError([f"{target}: module {module_name!r} has no attribute {class_name!r}"])
    return found


@dataclass(frozen=True)
class CompiledOperator:
    cls: type[Operator]
    config: OperatorConfig
    #: The operator names of its ``depends``, in declaration order.
    calls: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return class_path(self.cls)


@dataclass(frozen=True)
class CompiledDeployment:
    """The deployment an entry class compiles to, with the class behind each operator."""

    entry: str
    config: DeploymentConfig
    operators: list[CompiledOperator]
    #: Deployment settings (of FILE_OWNED) as written in the file compiled into, if any.
    settings: dict[str, Any] = field(default_factory=dict)

    def render(self, command: str) -> str:
        """The deployment file, commented with the classes its operators come from."""
        lines = [
            f"# Compiled by `{command}`.",
            "# Operators come from the classes named below: change the code and compile again",
            "# rather than editing them here (`runner compile --check` tells when they disagree).",
        ]
        top = {"name": self.config.name, "working_dir": self.config.working_dir, **self.settings}
        lines += yaml.safe_dump(top, sort_keys=False).splitlines()
        lines.append("operators:")
        for op in self.operators:
            calls = f"; calls {', '.join(op.calls)}" if op.calls else ""
            lines.append(f"  # from {op.source}{calls}")
            body = yaml.safe_dump(op.config.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
            for index, line in enumerate(body.splitlines()):
                lines.append(("  - " if index == 0 else "    ") + line)
        return "\n".join(lines) + "\n"


def default_name(target: str) -> str:
    """The deployment name of ``package.module:Class``: the module's last part."""
    module = target.partition(":")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", module.rpartition(".")[2])


def compile_target(
    target: str, *, name: str | None = None, working_dir: str = ".", settings: dict[str, Any] | None = None
) -> CompiledDeployment:
    """Compile ``package.module:Class``; ConfigError naming the classes when it cannot be done.

    ``settings`` are deployment settings of FILE_OWNED to keep (as written in a file).
    """
    with _cwd_on_path():
        entry = import_class(target)
        return compile_class(
            entry, name=name or default_name(target), working_dir=working_dir, entry_text=target, settings=settings
        )


def compile_class(
    entry: type,
    *,
    name: str,
    working_dir: str = ".",
    entry_text: str | None = None,
    settings: dict[str, Any] | None = None,
) -> CompiledDeployment:
    """Walk the ``depends`` graph from ``entry`` and build the deployment of every class on it."""
    settings = {key: value for key, value in (settings or {}).items() if key in FILE_OWNED}
    where = entry_text or class_path(entry)
    if not (inspect.isclass(entry) and issubclass(entry, Operator)):
        raise ConfigError([f"{where}: {entry!r} is not a pipeline_runner.Operator subclass"])
    walk = _Walk()
    walk.visit(entry)
    problems = walk.problems
    taken: dict[str, type] = {}
    for cls in walk.order:
        problems += _class_problems(cls)
        op_name = operator_name(cls)
        other = taken.setdefault(op_name, cls)
        if other is not cls:
            problems.append(
                f"operator name {op_name!r} is used by both {class_path(other)} and {class_path(cls)}: "
                "give one of them @operator_defaults(name=...)"
            )
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    entries = [
        {"name": operator_name(cls), "implementation": class_path(cls), **class_defaults(cls).fields}
        for cls in walk.order
    ]
    try:
        config = DeploymentConfig.model_validate(
            {"name": name, "working_dir": working_dir, **settings, "operators": entries}
        )
    except ValidationError as exc:
        raise ConfigError([f"{where}: {line}" for line in _located(exc, walk.order)]) from None
    operators = [
        CompiledOperator(cls, op, [operator_name(target) for target in walk.calls[cls]])
        for cls, op in zip(walk.order, config.operators, strict=True)
    ]
    return CompiledDeployment(where, config, operators, settings)


def _located(exc: ValidationError, order: list[type]) -> list[str]:
    """Pydantic's messages with ``operators[i]`` replaced by the class of operator i."""
    lines = []
    for line in describe_errors(exc):
        match = re.match(r"operators\.(\d+)\.?(.*)", line)
        if match and int(match.group(1)) < len(order):
            line = f"{class_path(order[int(match.group(1))])}: {match.group(2)}"
        lines.append(line)
    return lines


def _class_problems(cls: type) -> list[str]:
    where = class_path(cls)
    if cls.__module__ == "__main__" or "." in cls.__qualname__:
        return [f"{where}: an operator class must be defined at the top level of an importable module"]
    if inspect.isabstract(cls):
        return [f"{where}: is abstract: implement execute() or an @endpoint method"]
    try:
        endpoint_spec(cls)
    except ConfigError as exc:
        return list(exc.problems)
    return []


class _Walk:
    """Depth first through ``depends``: callees before callers, cycles and bad targets noted."""

    def __init__(self) -> None:
        self.order: list[type] = []
        self.calls: dict[type, list[type]] = {}
        self.problems: list[str] = []
        self._path: list[tuple[type, str]] = []  # (class, attribute followed) down to here
        self._visiting: set[type] = set()

    def visit(self, cls: type) -> None:
        if cls in self.calls:
            return
        if cls in self._visiting:
            start = next(i for i, (c, _) in enumerate(self._path) if c is cls)
            hops = [f"{class_path(c)}.{attribute}" for c, attribute in self._path[start:]]
            self.problems.append(f"cycle in depends: {' -> '.join(hops)} -> {class_path(cls)}")
            return
        self._visiting.add(cls)
        targets = []
        for attribute, dependency in dependencies(cls):
            target = self._target(cls, attribute, dependency)
            if target is None:
                continue
            targets.append(target)
            self._path.append((cls, attribute))
            self.visit(target)
            self._path.pop()
        self._visiting.discard(cls)
        self.calls[cls] = targets
        self.order.append(cls)

    def _target(self, cls: type, attribute: str, dependency: Any) -> type[Operator] | None:
        where = f"{class_path(cls)}.{attribute}"
        try:
            target = dependency.resolve()
        except ConfigError as exc:
            self.problems += [f"{where}: {problem}" for problem in exc.problems]
            return None
        if not (inspect.isclass(target) and issubclass(target, Operator)):
            shown = class_path(target) if inspect.isclass(target) else repr(target)
            self.problems.append(f"{where}: depends on {shown}, which is not a pipeline_runner.Operator subclass")
            return None
        return target


def comparable(config: DeploymentConfig, compare_name: bool) -> dict[str, Any]:
    """What ``--check`` compares: the operators' effective values and the directory they import from."""
    data = config.model_dump(mode="json", exclude_defaults=True, exclude=set(FILE_OWNED))
    data["working_dir"] = str(config.root)
    if not compare_name:
        del data["name"]
    return data


def check_against(file: Path, file_config: DeploymentConfig, compiled: CompiledDeployment, compare_name: bool) -> list[str]:
    """A unified diff from the file to the compiled deployment; empty when they agree."""
    have = comparable(file_config, compare_name)
    want = comparable(compiled.config, compare_name)
    if have == want:
        return []
    before = yaml.safe_dump(have, sort_keys=False).splitlines()
    after = yaml.safe_dump(want, sort_keys=False).splitlines()
    return list(difflib.unified_diff(before, after, str(file), f"compiled from {compiled.entry}", lineterm=""))
