"""Import an operator class named by a deployment file's ``implementation``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from .errors import WorkerStartError
from .operator import Operator


def split_implementation(implementation: str) -> tuple[str, str]:
    """``'pkg.mod:Class'`` -> ``('pkg.mod', 'Class')``; a bare file path has no class name."""
    target, colon, class_name = implementation.rpartition(":")
    return (target, class_name) if colon else (class_name, "")


def is_file_implementation(implementation: str) -> bool:
    """True for ``path/to/file.py[:Class]``, False for ``package.module:Class``."""
    target, _ = split_implementation(implementation)
    return "/" in target or target.endswith(".py")


def load_operator_class(implementation: str, root: Path) -> type[Operator]:
    """The Operator subclass ``implementation`` names, imported with ``root`` on sys.path."""
    target, class_name = split_implementation(implementation)
    root_str = str(root)
    if root_str not in sys.path:
        sys.path.insert(0, root_str)
    try:
        if is_file_implementation(implementation):
            module = _import_file(root / target)
        else:
            module = importlib.import_module(target)
    except WorkerStartError:
        raise
    except Exception as exc:
        raise WorkerStartError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None:
            raise WorkerStartError(f"{target!r} has no attribute {class_name!r}")
    else:
        cls = _single_operator_class(module, target)
    if not (inspect.isclass(cls) and issubclass(cls, Operator)):
        raise WorkerStartError(f"{implementation!r} is not a subclass of pipeline_runner.Operator")
    if inspect.isabstract(cls):
        raise WorkerStartError(f"{implementation!r} is abstract: implement execute()")
    return cls


def _import_file(path: Path):
    if not path.is_file():
        raise WorkerStartError(f"operator file {path} does not exist")
    module_name = f"_pipeline_runner_operator_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise WorkerStartError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _single_operator_class(module, target: str) -> type[Operator]:
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Operator)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]
    if len(found) != 1:
        names = ", ".join(cls.__name__ for cls in found) or "none"
        raise WorkerStartError(
            f"{target!r} must define exactly one Operator subclass when no ':Class' is given "
            f"(found: {names})"
        )
    return found[0]
