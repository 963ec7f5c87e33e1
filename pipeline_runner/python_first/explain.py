"""Where each effective value of a deployment's operators came from: default < class < file < flag."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..config import DeploymentConfig, OperatorConfig

Source = Literal["default", "class", "file", "flag"]

# Fields of the other kind say nothing about an operator; they are left out of its explanation.
_KIND_ONLY = {
    "python": ("implementation",),
    "triton": ("repository", "model", "model_version", "config_overrides"),
}


@dataclass(frozen=True)
class FieldValue:
    """One effective value: ``path`` is dotted (``delivery.mode``, ``parameters.input_copies``)."""

    path: str
    value: Any
    source: Source


@dataclass(frozen=True)
class OperatorExplanation:
    name: str
    #: The class its values came from (``module:Class``), or None where a file was read.
    origin: str | None
    fields: list[FieldValue]


def explain_operator(
    op: OperatorConfig,
    *,
    written: Mapping[str, Any] | None = None,
    from_class: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    origin: str | None = None,
) -> OperatorExplanation:
    """Each field of ``op`` with its source: ``flags`` (dotted paths) over what the file
    ``written`` (its entry as read) over what the class set (``from_class``) over defaults."""
    flags = flags or {}
    others = [key for kind, keys in _KIND_ONLY.items() if kind != op.kind for key in keys]
    dumped = op.model_dump(mode="json", exclude=set(others))
    values = []
    for path, value in _leaves(dumped, ()):
        dotted = ".".join(path)
        if dotted in flags:
            values.append(FieldValue(dotted, flags[dotted], "flag"))
        elif written is not None and _has(written, path):
            values.append(FieldValue(dotted, value, "file"))
        elif from_class is not None and _has(from_class, path):
            values.append(FieldValue(dotted, value, "class"))
        else:
            values.append(FieldValue(dotted, value, "default"))
    return OperatorExplanation(op.name, origin, values)


def _leaves(value: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict) and value:
        return [leaf for key, child in value.items() for leaf in _leaves(child, (*path, key))]
    return [(path, value)]


def _has(mapping: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether ``mapping`` sets the value at ``path``."""
    node: Any = mapping
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def render(config: DeploymentConfig, explanations: list[OperatorExplanation], target: str, name_source: Source) -> str:
    """A plain text table per operator: field, effective value, where it came from."""
    lines = [
        f"{target}: deployment {config.name!r} (name: {name_source}); each value comes from the last of "
        "default < class < file < flag that sets it"
    ]
    for explanation in explanations:
        origin = f" (from {explanation.origin})" if explanation.origin else ""
        lines.append(f"operator {explanation.name}{origin}")
        shown = [(f.path, json.dumps(f.value, ensure_ascii=False), f.source) for f in explanation.fields]
        width = max(len(path) for path, _, _ in shown)
        value_width = min(max(len(value) for _, value, _ in shown), 48)
        for path, value, source in shown:
            lines.append(f"  {path:<{width}}  {value:<{value_width}}  {source}")
    return "\n".join(lines) + "\n"
