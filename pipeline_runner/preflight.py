"""What ``runner deploy`` would reject, found without starting anything.

One place for the checks of a valid deployment against the files and settings it names (operator
code, Triton models, the embedded NATS server's message size); the deployment file loader runs them for
``runner validate`` and ``runner deploy`` alike and reports each at its line.

Operator code is located, never imported: modules are found as the import system would find
them (without running any package's ``__init__``) and their source is parsed, not executed, to
see that the named class is there. Importing would run arbitrary code at validate time, and
operator code may be slow or need a GPU.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import DeploymentConfig, OperatorConfig
from .errors import RunnerError
from .loader import is_file_implementation, split_implementation

Loc = tuple[str | int, ...]

#: nats-server's default max_payload, which the embedded server keeps.
EMBEDDED_MAX_PAYLOAD_BYTES = 1 << 20
#: Room left in a message beside one inline tensor, for the header and the request's parameters.
HEADER_ROOM_BYTES = 64 << 10


@dataclass(frozen=True)
class Problem:
    """Something wrong at key path ``loc`` of a deployment file.

    With ``shows_value`` the message is a "must be ..." phrase that the loader completes with the
    value as written (", got ...").
    """

    loc: Loc
    message: str
    shows_value: bool = False


def preflight(config: DeploymentConfig) -> list[Problem]:
    """What ``runner deploy`` would fail on with ``config`` that shows without starting anything."""
    root = config.root
    if not root.is_dir():
        return [Problem(("working_dir",), f"cannot find directory {root}")]
    problems = _inline_threshold_problems(config)
    code_problems: dict[str, Problem | None] = {}  # by implementation: many operators share one
    for index, op in enumerate(config.operators):
        if op.kind == "triton":
            problems += _triton_problems(root, index, op)
            continue
        assert op.implementation is not None
        if op.implementation not in code_problems:
            code_problems[op.implementation] = _implementation_problem(root, op.implementation)
        problem = code_problems[op.implementation]
        if problem is not None:
            problems.append(Problem(("operators", index, "implementation"), problem.message, problem.shows_value))
    return problems


# --- the request and data planes --------------------------------------------------------------


def _inline_threshold_problems(config: DeploymentConfig) -> list[Problem]:
    # Only the embedded server's limit is known before connecting; another server says its own.
    if config.request_plane.nats_url is not None:
        return []
    most = EMBEDDED_MAX_PAYLOAD_BYTES - HEADER_ROOM_BYTES
    if config.data_plane.inline_threshold_bytes <= most:
        return []
    message = (
        f"must be at most {most} so that a tensor sent inline fits in a NATS message (the embedded "
        f"nats-server's max payload is {EMBEDDED_MAX_PAYLOAD_BYTES} bytes, {HEADER_ROOM_BYTES} kept "
        "for the header); larger tensors go over the data plane"
    )
    return [Problem(("data_plane", "inline_threshold_bytes"), message, shows_value=True)]


# --- Triton models ------------------------------------------------------------------------------


def _triton_problems(root: Path, index: int, op: OperatorConfig) -> list[Problem]:
    assert op.repository is not None
    repository = (root / op.repository).resolve()
    if not repository.is_dir():
        return [Problem(("operators", index, "repository"), f"cannot find Triton model repository {repository}")]
    model = op.model or op.name
    if not (repository / model / "config.pbtxt").is_file():
        message = f"no model '{model}' in Triton model repository {repository} (no {model}/config.pbtxt)"
        return [Problem(("operators", index, "model" if op.model else "name"), message)]
    if op.config_overrides:
        from .triton.model_config import parse_overrides  # imports grpc: only when needed

        try:
            parse_overrides(op.config_overrides)
        except RunnerError as exc:
            return [Problem(("operators", index, "config_overrides"), f"must be a Triton model config: {exc}")]
    return []


# --- operator code --------------------------------------------------------------------------------


def _implementation_forms() -> str:
    described = OperatorConfig.model_fields["implementation"].description or ""
    return described.removeprefix("kind python: ").rstrip(".")


def _implementation_problem(root: Path, implementation: str) -> Problem | None:
    """What is wrong with an operator's ``implementation`` (at the operator's key path, to be set)."""
    loc: Loc = ()
    target, class_name = split_implementation(implementation)
    if ":" in implementation and not class_name.isidentifier():
        return Problem(loc, f"must be {_implementation_forms()}", shows_value=True)
    if is_file_implementation(implementation):
        path = root / target
        if not path.is_file():
            return Problem(loc, f"cannot find file '{target}' under {root}")
        if path.suffix != ".py":
            return Problem(loc, f"must name a Python file (.py): {path.resolve()} is not one")
        source: Path | None = path
        what = f"file '{target}'"
    else:
        if not all(part.isidentifier() for part in target.split(".")):
            return Problem(loc, f"must be {_implementation_forms()}", shows_value=True)
        spec = _find_module(target, root)
        if spec is None:
            return Problem(loc, f"cannot find module '{target}' under {root}")
        source = Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
        what = f"module '{target}'"
    if source is None or not class_name:
        return None  # compiled or namespace modules, and the one-class form, are checked on import
    problem = _class_problem(source, class_name, what)
    return Problem(loc, problem) if problem else None


def _find_module(name: str, root: Path) -> importlib.machinery.ModuleSpec | None:
    """Where module ``name`` would be imported from with ``root`` on sys.path, without importing it."""
    parts = name.split(".")
    saved = list(sys.path)
    sys.path.insert(0, str(root))
    try:
        # importlib.util.find_spec("a.b") would import package "a"; walk the packages instead.
        spec = importlib.util.find_spec(parts[0])
        for depth in range(2, len(parts) + 1):
            if spec is None or spec.submodule_search_locations is None:
                return None
            locations = list(spec.submodule_search_locations)
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), locations)
        return spec
    except (ImportError, ValueError):
        return None
    finally:
        sys.path[:] = saved


def _class_problem(source: Path, class_name: str, what: str) -> str | None:
    """Why ``source`` cannot provide ``class_name``, judged from its syntax tree, if it cannot."""
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except SyntaxError as exc:
        return f"{what} cannot be imported: {exc.msg} at {source}:{exc.lineno}"
    except (OSError, ValueError) as exc:
        return f"{what} cannot be read: {exc}"
    names = _top_level_names(tree)
    if names is None or class_name in names:
        return None
    classes = sorted(node.name for node in tree.body if isinstance(node, ast.ClassDef))
    return f"{what} defines no '{class_name}' (its classes: {', '.join(classes) or 'none'})"


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """The names a module binds at its top level; None where it cannot be told without running it."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            return None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__getattr__":
            return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("globals", "exec"):
            return None
    for node in ast.walk(tree):
        # Anything bound anywhere at module level, including under if/try: a generous superset.
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names
