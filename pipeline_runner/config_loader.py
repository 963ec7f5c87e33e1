"""Load deployment files, reporting every problem at the line the user has to fix.

Each problem is one line, ``<file>:<line>: <key path>: <what was expected>, got <value>``, where
the value is shown as written in the file (strings quoted). Everything wrong with a file is
raised together as one :class:`ConfigError`, sorted by line.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as JsonSchemaError
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .capacity import HostShare, capacity_problems
from .config import DeploymentConfig
from .errors import ConfigError
from .preflight import Problem, preflight
from .schema import deployment_json_schema

Loc = tuple[str | int, ...]

_TAG_PREFIX = "tag:yaml.org,2002:"
_STR_TAG = _TAG_PREFIX + "str"
_MAP_TAG = _TAG_PREFIX + "map"
_SEQ_TAG = _TAG_PREFIX + "seq"
_MERGE_TAG = _TAG_PREFIX + "merge"
_DEPLOYMENT = "a mapping with at least 'name' and 'operators'"
#: Most nodes that aliases (and the merge keys using them) may add to a file, counted as if each
#: alias were replaced by a copy of its anchor's node: far above what defaults shared between
#: operators need, far below what makes validating slow ("billion laughs" files).
MAX_ALIAS_NODES = 100_000


@dataclass(frozen=True)
class CheckedDeployment:
    """A valid deployment file and what it asks of this host beyond its capacity.

    ``runner deploy`` refuses to start workers beyond the host's capacity (unless told to go ahead),
    ``runner validate`` warns; both lines name the file, line and key path as errors do.
    """

    config: DeploymentConfig
    capacity_problems: list[str]


def load_deployment(path: str | Path) -> DeploymentConfig:
    """Read, parse and validate the deployment file at ``path``; raise :class:`ConfigError`."""
    return parse_deployment(_read(path), path)


def check_deployment(path: str | Path, share: HostShare = HostShare()) -> CheckedDeployment:
    """:func:`load_deployment`, and the capacity of this host for its ``share`` of the workers."""
    source = str(path)
    config, doc = _parse(_read(path), source)
    problems = _rendered(doc, capacity_problems(config, share))
    return CheckedDeployment(config, [p.render(source) for p in problems])


def capacity_lines(config: DeploymentConfig, share: HostShare, source: str) -> list[str]:
    """:func:`check_deployment`'s capacity lines for a deployment that has no file (compiled from code)."""
    return [_Problem(None, p.loc, p.message).render(source) for p in capacity_problems(config, share)]


def _read(path: str | Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a deployment file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})"]) from None
    return text


def parse_deployment(text: str, source: str | Path) -> DeploymentConfig:
    """Validate deployment YAML ``text``; ``source`` names it in messages and anchors ``config.root``."""
    return _parse(text, source)[0]


def _parse(text: str, source: str | Path) -> tuple[DeploymentConfig, _YamlDocument]:
    doc = _YamlDocument.parse(text, str(source))
    problems = doc.problems + _schema_problems(doc)
    # Where jsonschema found problems, pydantic would repeat them; only the model's own
    # checks (duplicate names, reserved kinds) add to them.
    config, model_problems = _model_problems(doc, only_model_checks=bool(problems))
    problems += model_problems
    if config is not None and not problems:
        config._source = Path(source).resolve()
        problems = _rendered(doc, preflight(config))
    if problems or config is None:
        problems.sort(key=lambda p: p.line or 0)
        raise ConfigError([p.render(str(source)) for p in problems])
    return config, doc


# --- YAML with locations -------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    line: int | None
    loc: Loc | None
    message: str

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        what = f"{_format_loc(self.loc)}: {self.message}" if self.loc else self.message
        return f"{where}: {what}"


class _YamlDocument:
    """The data of a YAML file plus, for every key path, the nodes it was written as."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        # loc -> (key node, value node); the key node is None for list items and the root.
        self.nodes: dict[Loc, tuple[Node | None, Node]] = {}
        self.problems: list[_Problem] = []

    @classmethod
    def parse(cls, text: str, source: str) -> _YamlDocument:
        doc = cls()
        loader: _BoundedLoader | None = None
        try:
            loader = _BoundedLoader(text)  # checks for unprintable characters right away
            root = loader.get_single_node()
            if root is None:
                raise ConfigError([f"{source}: the file is empty; a deployment is {_DEPLOYMENT}"])
            if not isinstance(root, MappingNode) or root.tag != _MAP_TAG:
                what = f"the top level must be {_DEPLOYMENT}, got {_shown(root)}"
                raise ConfigError([f"{source}:{_line(root)}: {what}"])
            doc._find_duplicate_keys(root, (), set())
            doc.nodes[()] = (None, root)
            doc.data = doc._build(root, (), loader, set())
        except yaml.MarkedYAMLError as exc:
            raise ConfigError([_yaml_error(source, exc)]) from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            raise ConfigError([f"{source}:{line}:{column}: invalid YAML: {exc.reason}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
        except RecursionError:
            raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None
        finally:
            if loader is not None:
                loader.dispose()
        return doc

    def line(self, loc: Loc) -> int:
        """The line of ``loc``'s key (or item), else of its nearest ancestor present in the file."""
        key, value = self.nodes[self.present(loc)]
        return _line(key or value)

    def shown(self, loc: Loc) -> str | None:
        """The value at ``loc`` as written in the file, or None where the file does not set it."""
        return _shown(self.nodes[loc][1]) if loc in self.nodes else None

    def present(self, loc: Loc) -> Loc:
        """The longest prefix of ``loc`` that the file sets."""
        while loc not in self.nodes:
            loc = loc[:-1]
        return loc

    def _problem(self, node: Node, loc: Loc, message: str) -> None:
        self.problems.append(_Problem(_line(node), loc, message))

    def _find_duplicate_keys(self, node: Node, loc: Loc, seen: set[int]) -> None:
        # On the raw tree: PyYAML keeps the last of duplicate keys silently, and after merge keys
        # ('<<') are flattened, legitimate overrides look like duplicates.
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                if not isinstance(key_node, ScalarNode):
                    continue  # reported while building: keys must be strings
                child = loc + (key_node.value,)
                if key_node.tag == _STR_TAG:
                    if key_node.value in first_line:
                        first = first_line[key_node.value]
                        self._problem(key_node, child, f"duplicate key (first set at line {first})")
                    else:
                        first_line[key_node.value] = _line(key_node)
                self._find_duplicate_keys(value_node, child, seen)
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self._find_duplicate_keys(item, loc + (index,), seen)

    def _build(self, node: Node, loc: Loc, loader: _BoundedLoader, active: set[int]) -> Any:
        if isinstance(node, ScalarNode):
            try:
                return loader.construct_object(node)
            except yaml.YAMLError:
                raise
            except Exception:  # PyYAML fails variously on an explicit tag it cannot read: "!!int abc"
                raise _yaml_problem(node, f"cannot read {node.value!r} as {_short_tag(node)}") from None
        if id(node) in active:
            raise _yaml_problem(node, "an alias refers to a node that contains it")
        if node.tag != (_MAP_TAG if isinstance(node, MappingNode) else _SEQ_TAG):
            raise _yaml_problem(node, f"unsupported tag {_short_tag(node)!r}")
        active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                items = []
                for index, item in enumerate(node.value):
                    self.nodes[loc + (index,)] = (None, item)
                    items.append(self._build(item, loc + (index,), loader, active))
                return items
            assert isinstance(node, MappingNode)
            loader.flatten_mapping(node)  # resolves '<<' merge keys; later keys override earlier
            mapping: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG):
                    self._problem(key_node, loc, f"keys must be strings, got {_shown(key_node)}")
                    continue
                child = loc + (key_node.value,)
                self.nodes[child] = (key_node, value_node)
                mapping[key_node.value] = self._build(value_node, child, loader, active)
            return mapping
        finally:
            active.discard(id(node))


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses aliases expanding beyond :data:`MAX_ALIAS_NODES` nodes.

    Counted while composing, from each node's expanded size, so that an exponential file is
    refused at its first offending alias before anything walks the expansion.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._expanded_size: dict[int, int] = {}  # id(node) -> nodes in it, aliases expanded
        self._alias_nodes = 0

    def compose_node(self, parent: Node | None, index: object) -> Node:
        if not self.check_event(yaml.AliasEvent):
            node: Node = super().compose_node(parent, index)
            self._expanded_size[id(node)] = 1 + sum(self._size(child) for child in _children(node))
            return node
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        self._alias_nodes += self._size(node)
        if self._alias_nodes > MAX_ALIAS_NODES:
            raise yaml.composer.ComposerError(
                problem=(
                    f"aliases expand to more than {MAX_ALIAS_NODES} nodes (this one to "
                    f"{self._size(node)}); write the values out or share fewer levels of aliases"
                ),
                problem_mark=mark,
            )
        return node

    def _size(self, node: Node) -> int:
        # A node still being composed is the target of a recursive alias, reported when building.
        return self._expanded_size.get(id(node), 1)


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _yaml_problem(node: Node, problem: str) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=node.start_mark)


def _short_tag(node: Node) -> str:
    return str(node.tag).replace(_TAG_PREFIX, "!!")


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _shown(node: Node) -> str:
    """A node's value as the user wrote it: strings quoted, collections named."""
    if isinstance(node, MappingNode):
        return "a mapping" if node.value else "an empty mapping"
    if isinstance(node, SequenceNode):
        return "a list" if node.value else "an empty list"
    text = str(node.value)
    if len(text) > 80:  # enough for any valid name, short enough for one line
        text = text[:77] + "..."
    if node.tag == _STR_TAG:
        return json.dumps(text, ensure_ascii=False)
    return text or "an empty value"


def _yaml_error(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = exc.problem or exc.context or "cannot parse"
    if exc.context and exc.problem:
        if problem.startswith("but "):  # e.g. "expected a single document in the stream, but ..."
            problem = f"{exc.context}, {problem}"
        elif exc.context_mark and mark and exc.context_mark.line != mark.line:
            problem = f"{problem} ({exc.context} at line {exc.context_mark.line + 1})"
    return f"{where}: invalid YAML: {problem}"


def _format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part, ensure_ascii=False)}]"
    return text


# --- validation ------------------------------------------------------------------------------


@cache
def _schema() -> dict[str, Any]:
    return deployment_json_schema()


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(_schema())


def _schema_problems(doc: _YamlDocument) -> list[_Problem]:
    problems: list[_Problem] = []
    for error in _specific(_validator().iter_errors(doc.data)):
        loc: Loc = tuple(error.absolute_path)
        schema = _resolve(error.schema) if isinstance(error.schema, dict) else {}
        if error.validator == "additionalProperties":
            allowed = list(schema.get("properties", {}))
            for key in error.instance:
                if key not in allowed:
                    message = f"unknown key {key!r}{_suggestion(key, allowed, keys=True)}"
                    problems.append(_Problem(doc.line(loc + (key,)), loc, message))
        elif error.validator == "required":
            for key in error.validator_value:
                if key not in error.instance:
                    problems.append(_Problem(doc.line(loc), loc, f"missing required key {key!r}"))
        elif error.validator == "minItems":
            count = error.validator_value
            message = f"must list at least {count} {_item_noun(loc, count)}, got {doc.shown(loc)}"
            problems.append(_Problem(doc.line(loc), loc, message))
        else:
            problems.append(_value_problem(doc, loc, _expectation(schema, loc)))
    return list(dict.fromkeys(problems))  # one value may break several keywords of its schema


def _specific(errors: Iterable[JsonSchemaError]) -> Iterator[JsonSchemaError]:
    """``errors``, with each of an optional value (``X | None``) that is present replaced by the
    errors against ``X`` itself, so a bad key inside an optional mapping is reported at the key."""
    for error in errors:
        if error.validator == "anyOf" and error.instance is not None and error.context:
            branches = [i for i, b in enumerate(error.validator_value) if _resolve(b).get("type") != "null"]
            inner = [e for e in error.context if len(branches) == 1 and e.relative_schema_path[0] == branches[0]]
            if inner:
                yield from _specific(inner)
                continue
        yield error


def _model_problems(
    doc: _YamlDocument, only_model_checks: bool
) -> tuple[DeploymentConfig | None, list[_Problem]]:
    try:
        return DeploymentConfig.model_validate(doc.data), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            ctx = error.get("ctx") or {}
            if only_model_checks and "requirement" not in ctx:
                continue
            if error["type"] == "missing_key":  # reported where the key should be, as JSON Schema's are
                loc = doc.present(tuple(error["loc"]))
                problems.append(_Problem(doc.line(loc), loc, ctx["requirement"]))
                continue
            loc = doc.present(tuple(error["loc"]))
            expected = ctx.get("requirement")
            if not expected:
                schema = _schema_at(loc)
                expected = _expectation(schema, loc) if schema else error["msg"]
            problems.append(_value_problem(doc, loc, expected))
        return None, list(dict.fromkeys(problems))


def _value_problem(doc: _YamlDocument, loc: Loc, expected: str) -> _Problem:
    got = doc.shown(loc)
    message = f"{expected}, got {got}" if got is not None and loc else expected
    node = doc.nodes.get(loc, (None, None))[1]
    if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
        message += _suggestion(node.value, _enum_values(_schema_at(loc) or {}))
    return _Problem(doc.line(loc), loc or None, message)


def _rendered(doc: _YamlDocument, found: list[Problem]) -> list[_Problem]:
    """Problems found in a valid file (by key path), each at its line."""
    problems = []
    for problem in found:
        if problem.shows_value:
            problems.append(_value_problem(doc, problem.loc, problem.message))
        else:
            problems.append(_Problem(doc.line(problem.loc), problem.loc, problem.message))
    return problems


# --- what a schema expects, in words ---------------------------------------------------------


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
        return schema
    target = _schema()["$defs"][ref.removeprefix("#/$defs/")]
    return _resolve({**target, **{k: v for k, v in schema.items() if k != "$ref"}})


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives a value may take, leaving out null: an absent key already means null."""
    schema = _resolve(schema)
    if "anyOf" not in schema:
        return [schema]
    branches = [_resolve(branch) for branch in schema["anyOf"]]
    return [branch for branch in branches if branch.get("type") != "null"] or branches


def _schema_at(loc: Loc) -> dict[str, Any] | None:
    schema = _schema()
    for part in loc:
        branches = _branches(schema)
        if len(branches) != 1:
            return None
        schema = branches[0]
        if isinstance(part, int):
            child = schema.get("items")
        else:
            child = schema.get("properties", {}).get(part, schema.get("additionalProperties"))
        if not isinstance(child, dict):
            return None
        schema = child
    return schema


def _expectation(schema: dict[str, Any], loc: Loc) -> str:
    return "must be " + " or ".join(_phrase(branch, loc) for branch in _branches(schema))


def _phrase(schema: dict[str, Any], loc: Loc) -> str:
    if "const" in schema:
        return _literal(schema["const"])
    if "enum" in schema:
        values = [_literal(value) for value in schema["enum"]]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(_phrase({**schema, "type": each}, loc) for each in kind)
    if kind == "string":
        return _string_phrase(schema)
    if kind in ("integer", "number"):
        return _number_phrase(schema, "an integer" if kind == "integer" else "a number")
    if kind == "array" and "minItems" in schema:
        count = schema["minItems"]
        return f"a list of at least {count} {_item_noun(loc, count)}"
    return {"boolean": "true or false", "object": "a mapping", "array": "a list", "null": "null"}.get(
        str(kind), "valid"
    )


def _string_phrase(schema: dict[str, Any]) -> str:
    if "pattern" in schema:
        # The description of a patterned field says in words what the pattern allows.
        description = str(schema.get("description", "")).rstrip(".")
        if not description:
            return f"a string matching {schema['pattern']!r}"
        return description[:1].lower() + description[1:]
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if high is not None:
        return f"a string of {low} to {high} characters" if low else f"a string of up to {high} characters"
    if low == 1:
        return "a non-empty string"
    return f"a string of at least {low} characters" if low else "a string"


def _number_phrase(schema: dict[str, Any], noun: str) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{noun} from {low} to {high}"
    operators = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    bounds = [f"{op} {schema[key]}" for key, op in operators.items() if key in schema]
    return f"{noun} {' and '.join(bounds)}" if bounds else noun


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value)


def _item_noun(loc: Loc, count: int) -> str:
    key = loc[-1] if loc and isinstance(loc[-1], str) else "items"
    singular = key.removesuffix("s")
    return singular if count == 1 else singular + "s"


def _enum_values(schema: dict[str, Any]) -> list[str]:
    values = [value for branch in _branches(schema) for value in branch.get("enum", [])]
    return [value for value in values if isinstance(value, str)]


def _suggestion(word: str, choices: list[str], keys: bool = False) -> str:
    """' (did you mean ...?)' for a near miss, ignoring case; for keys, else the allowed ones."""
    if word in choices:
        return ""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {by_lower[close[0]]!r}?)"
    if keys and choices:
        return f" (allowed keys: {', '.join(choices)})"
    return ""
