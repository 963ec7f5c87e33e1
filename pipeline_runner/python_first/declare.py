"""Declaring operators in code: a class's defaults for its deployment entry, and its callees.

``@operator_defaults(workers=2, ...)`` takes exactly the fields of a deployment file's operator
entry (:class:`~pipeline_runner.config.OperatorConfig`) and validates them with that model, so a
class can say nothing the file could not. ``backend = depends(Backend)`` declares a callee: on an
operator instance the attribute is an :class:`~pipeline_runner.python_first.endpoint.OperatorHandle`
(a ``RemoteOperator``) on that class's operator of the same deployment.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from ..config import OperatorConfig
from ..errors import ConfigError
from ..operator import Operator

if TYPE_CHECKING:
    from .endpoint import OperatorHandle

_DEFAULTS_ATTR = "__pipeline_runner_defaults__"

#: Operator fields a class cannot set: its kind and what runs it are the class itself.
NOT_FOR_CLASSES = frozenset({"kind", "implementation", "repository", "model", "model_version", "config_overrides"})

OperatorClass = TypeVar("OperatorClass", bound=type[Operator])


def class_path(cls: type) -> str:
    """``module:QualName``: how deployment files and messages name a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def snake_case(name: str) -> str:
    """``EncoderDecoder`` -> ``encoder_decoder``, ``HTTPFrontend`` -> ``http_frontend``, ``_Private`` -> ``private``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name.lstrip("_")).lower()


@dataclass(frozen=True)
class ClassDefaults:
    """What ``@operator_defaults`` said about one class (not inherited by subclasses)."""

    name: str | None = None
    #: The fields given, validated, in JSON form; nested mappings hold only the keys given.
    fields: dict[str, Any] = field(default_factory=dict)


def class_defaults(cls: type) -> ClassDefaults:
    """The decorator's values of ``cls`` itself; a subclass starts afresh (its own name too)."""
    found = cls.__dict__.get(_DEFAULTS_ATTR)
    return found if isinstance(found, ClassDefaults) else ClassDefaults()


def operator_name(cls: type) -> str:
    """The operator name of ``cls``: ``@operator_defaults(name=...)``, else its snake_case name."""
    return class_defaults(cls).name or snake_case(cls.__name__)


def operator_version(cls: type) -> int:
    version = class_defaults(cls).fields.get("version", 1)
    return int(version)


def operator_defaults(*, name: str | None = None, **fields: Any) -> Callable[[OperatorClass], OperatorClass]:
    """Class decorator: the defaults of this class's operator entry in a compiled deployment.

    Keywords are the fields of a deployment file's operator entry (``workers``, ``device``,
    ``delivery``, ``max_batch_size``, ``parameters``, ...), validated by the same model;
    ``name`` overrides the snake_case of the class name. ``runner compile`` writes them into the
    deployment file, which is what runs: see the README's "Python-first pipelines".
    """

    def decorate(cls: OperatorClass) -> OperatorClass:
        where = class_path(cls)
        if not (inspect.isclass(cls) and issubclass(cls, Operator)):
            raise ConfigError([f"{where}: @operator_defaults is for pipeline_runner.Operator subclasses"])
        problems = []
        for key in fields:
            if key in NOT_FOR_CLASSES:
                problems.append(f"{where}: @operator_defaults({key}=...): not for a Python operator class")
            elif key not in OperatorConfig.model_fields:
                allowed = [k for k in OperatorConfig.model_fields if k not in NOT_FOR_CLASSES]
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(allowed)}"
                problems.append(f"{where}: @operator_defaults({key}=...): no such operator field ({hint})")
        if problems:
            raise ConfigError(problems)
        entry = {"name": name or snake_case(cls.__name__), "implementation": where, **fields}
        try:
            validated = OperatorConfig.model_validate(entry)
        except ValidationError as exc:
            lines = describe_errors(exc)
            if name is None:  # the name was made from the class's: say so
                derived = f" (the operator name {entry['name']!r} comes from the class name: give name=...)"
                lines = [line + derived if line.startswith("name:") else line for line in lines]
            raise ConfigError([f"{where}: @operator_defaults: {line}" for line in lines]) from None
        dumped = validated.model_dump(mode="json")
        given = {key: _given(fields[key], dumped[key]) for key in fields}
        setattr(cls, _DEFAULTS_ATTR, ClassDefaults(name, given))
        return cls

    return decorate


def _given(raw: Any, dumped: Any) -> Any:
    """The part of ``dumped`` (a field's JSON form) that ``raw`` (as passed) actually set."""
    if isinstance(raw, BaseModel):
        children = {key: getattr(raw, key) for key in raw.model_fields_set}
    elif isinstance(raw, dict) and isinstance(dumped, dict):
        children = raw
    else:
        return dumped
    return {key: _given(value, dumped[key]) for key, value in children.items() if key in dumped}


def describe_errors(exc: ValidationError) -> list[str]:
    """Pydantic's messages, one per problem, as ``field.path: message``."""
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        lines.append(f"{loc}: {error['msg']}" if loc else str(error["msg"]))
    return lines


class Depends:
    """A class attribute naming an operator this one calls; see :func:`depends`."""

    def __init__(self, target: type[Operator] | str):
        self.target = target
        self.attribute: str | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = name

    def __repr__(self) -> str:
        target = self.target if isinstance(self.target, str) else class_path(self.target)
        return f"depends({target})"

    def resolve(self) -> type:
        """The class depended on (importing ``'module:Class'`` given as a string)."""
        if not isinstance(self.target, str):
            return self.target
        module_name, colon, class_name = self.target.partition(":")
        if not colon or not class_name:
            raise ConfigError([f"depends({self.target!r}): a class is named 'package.module:Class'"])
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError([f"depends({self.target!r}): cannot import {module_name!r}: {type(exc).__name__}: {exc}"]) from None
        found = getattr(module, class_name, None)
        if found is None:
            raise ConfigError([f"depends({self.target!r}): module {module_name!r} has no attribute {class_name!r}"])
        return found

    @overload
    def __get__(self, instance: None, owner: type) -> Depends: ...
    @overload
    def __get__(self, instance: object, owner: type) -> OperatorHandle: ...
    def __get__(self, instance: object | None, owner: type) -> Depends | OperatorHandle:
        if instance is None:
            return self
        from .endpoint import OperatorHandle

        target = self.resolve()
        if not (inspect.isclass(target) and issubclass(target, Operator)):
            raise ConfigError([f"{class_path(owner)}.{self.attribute}: {target!r} is not a pipeline_runner.Operator subclass"])
        handle = OperatorHandle(target)
        if self.attribute is not None:
            instance.__dict__[self.attribute] = handle  # one handle per operator instance
        return handle


def depends(target: type[Operator] | str) -> Any:
    """Declare, as a class attribute, an operator this one calls: ``backend = depends(Backend)``.

    ``target`` is an Operator subclass, or ``'package.module:Class'`` for one defined later or
    elsewhere. On an instance the attribute is a handle (a ``RemoteOperator``) on the target's
    operator of the same deployment; ``runner compile`` follows these to find every operator.
    """
    return Depends(target)


def dependencies(cls: type) -> list[tuple[str, Depends]]:
    """``(attribute, Depends)`` of ``cls`` and its bases, a subclass's attribute hiding its base's."""
    found: dict[str, Depends] = {}
    for base in reversed(cls.__mro__):
        for attribute, value in vars(base).items():
            if isinstance(value, Depends):
                found[attribute] = value
            else:
                found.pop(attribute, None)
    return list(found.items())
