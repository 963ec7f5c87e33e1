"""What `runner` says about a bad deployment file.

Every problem is one line: ``<file>:<line>: <key path>: <what was expected>, got <value as written>``.
All problems of a file are reported together, sorted by line, in one ``ConfigError``.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline_runner.config_loader import MAX_ALIAS_NODES, load_deployment, parse_deployment
from pipeline_runner.errors import ConfigError

FILE = "hello_world.yaml"
WriteDeployment = Callable[[str], str]

HEADER = """\
name: hello_world
operators:
  - name: encoder
    implementation: ops.encoder:Encoder
"""


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteDeployment:
    """Writes ``hello_world.yaml`` next to an ``ops`` package and returns the name to load it by."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "__init__.py").write_text("")
    (tmp_path / "ops" / "encoder.py").write_text("class Encoder: ...\n")

    def write(text: str) -> str:
        (tmp_path / FILE).write_text(textwrap.dedent(text))
        return FILE

    return write


def problems_of(path: str | Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_deployment(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- values of the wrong type or out of range -------------------------------------------------


def test_workers_written_as_a_word(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + """\
  - name: decoder
    implementation: ops.encoder:Encoder
    workers: two
""")
    assert problems_of(path) == [
        'hello_world.yaml:7: operators[1].workers: must be an integer >= 1, got "two"'
    ]


def test_batching_beside_max_batch_size_or_beyond_the_slots(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + """\
    max_batch_size: 4
    batching: {max_batch_size: 8, max_wait_ms: 2}
  - name: decoder
    implementation: ops.encoder:Encoder
    batching: {max_batch_size: 32, max_wait_ms: -1}
""")
    assert problems_of(path) == [
        f"{FILE}:6: operators[0].batching: must not be set together with max_batch_size "
        "(move it to batching.max_batch_size), got a mapping",
        f"{FILE}:9: operators[1].batching.max_wait_ms: must be a number from 0 to 60000, got -1",
        f"{FILE}:9: operators[1].batching.max_batch_size: must be at most max_inflight_requests (16): "
        "each request of a batch takes one of the worker's slots (raise max_inflight_requests), got 32",
    ]


def test_an_unknown_delivery_mode_lists_the_choices(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    delivery:\n      mode: exactly_once\n")
    [problem] = problems_of(path)
    assert problem.startswith("hello_world.yaml:6: operators[0].delivery.mode: must be one of")
    assert "'at_least_once'" in problem and "'at_most_once'" in problem and '"exactly_once"' in problem


def test_guaranteed_delivery_on_an_embedded_server_without_jetstream(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "request_plane:\n  embedded:\n    jetstream: false\n")
    assert problems_of(path) == [
        "hello_world.yaml:7: request_plane.embedded.jetstream: must be true: operators encoder use "
        "delivery.mode 'at_least_once', which needs JetStream (or set their delivery.mode to "
        "'at_most_once'), got false"
    ]
    # Without the guarantee the file is fine.
    deployment(HEADER + "    delivery: {mode: at_most_once}\nrequest_plane:\n  embedded:\n    jetstream: false\n")
    assert load_deployment(FILE).operators[0].delivery.mode == "at_most_once"


def test_zero_workers(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    workers: 0\n")
    assert problems_of(path) == ["hello_world.yaml:5: operators[0].workers: must be an integer >= 1, got 0"]


def test_workers_written_as_a_float_is_not_an_integer(deployment: WriteDeployment) -> None:
    """JSON Schema accepts 2.0 as an integer; the models (strict) do not, and say so the same way."""
    path = deployment(HEADER + "    workers: 2.0\n")
    assert problems_of(path) == ["hello_world.yaml:5: operators[0].workers: must be an integer >= 1, got 2.0"]


def test_negative_request_timeout(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "request_plane:\n  request_timeout_s: -1.5\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: request_plane.request_timeout_s: must be a number > 0, got -1.5"
    ]


def test_parameters_that_are_not_a_mapping(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    parameters: [input_copies, 3]\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: operators[0].parameters: must be a mapping, got a list"
    ]


def test_parameter_keys_must_be_strings(deployment: WriteDeployment) -> None:
    """Unquoted ``yes``/``3`` are a boolean and an integer in YAML, not names."""
    path = deployment(HEADER + "    parameters:\n      yes: 1\n      3: 4\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: operators[0].parameters: keys must be strings, got yes",
        "hello_world.yaml:7: operators[0].parameters: keys must be strings, got 3",
    ]


def test_unquoted_date_where_a_string_is_expected(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "log_dir: 2024-01-31\n")
    assert problems_of(path) == ["hello_world.yaml:5: log_dir: must be a string, got 2024-01-31"]


# --- choices and names -------------------------------------------------------------------------


def test_unknown_kind_lists_the_choices_and_suggests_the_closest(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    kind: pyhton\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: operators[0].kind: must be one of 'python', 'triton', "
        'got "pyhton" (did you mean \'python\'?)'
    ]


def test_log_level_in_the_wrong_case(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    log_level: debug\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: operators[0].log_level: must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', "
        'got "debug" (did you mean \'DEBUG\'?)'
    ]


def test_a_triton_operator_needs_a_repository_and_no_implementation(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    kind: triton\n")
    assert problems_of(path) == [
        "hello_world.yaml:3: operators[0]: missing required key 'repository' (kind 'triton' needs it)",
        "hello_world.yaml:4: operators[0].implementation: must not be set for kind 'triton' "
        "(it belongs to kind 'python'), got \"ops.encoder:Encoder\"",
    ]


def test_triton_keys_on_a_python_operator(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    repository: models\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: operators[0].repository: must not be set for kind 'python' "
        "(it belongs to kind 'triton'), got \"models\""
    ]


TRITON = """\
name: hello_world
operators:
  - name: encoder
    kind: triton
    repository: models
"""


def test_a_missing_triton_repository_or_model(deployment: WriteDeployment, tmp_path: Path) -> None:
    path = deployment(TRITON)
    assert problems_of(path) == [
        f"hello_world.yaml:5: operators[0].repository: cannot find Triton model repository {tmp_path.resolve() / 'models'}"
    ]
    (tmp_path / "models" / "other").mkdir(parents=True)
    assert problems_of(path) == [
        f"hello_world.yaml:3: operators[0].name: no model 'encoder' in Triton model repository "
        f"{tmp_path.resolve() / 'models'} (no encoder/config.pbtxt)"
    ]


def test_triton_config_overrides_must_be_model_config_fields(deployment: WriteDeployment, tmp_path: Path) -> None:
    (tmp_path / "models" / "encoder").mkdir(parents=True)
    (tmp_path / "models" / "encoder" / "config.pbtxt").write_text('backend: "python"\n')
    path = deployment(TRITON + "    config_overrides:\n      instance_groups: [{count: 2}]\n")
    [problem] = problems_of(path)
    assert problem.startswith("hello_world.yaml:6: operators[0].config_overrides: must be a Triton model config:")
    assert "instance_groups" in problem
    deployment(TRITON + "    config_overrides:\n      instance_group: [{count: 2, kind: KIND_CPU}]\n")
    assert load_deployment(FILE).operators[0].config_overrides == {"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}


def test_duplicate_operator_name_points_at_the_second_use(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + """\
  - name: decoder
    implementation: ops.encoder:Encoder
  - name: encoder
    implementation: ops.encoder:Encoder
""")
    assert problems_of(path) == [
        "hello_world.yaml:7: operators[2].name: must be unique among operators "
        '(operators[0] has the same name), got "encoder"'
    ]


@pytest.mark.parametrize(
    "name", ["enc.oder", "my op", "-encoder", "x" * 65], ids=["dot", "space", "leading-dash", "too-long"]
)
def test_operator_name_must_be_usable_in_a_nats_subject(deployment: WriteDeployment, name: str) -> None:
    path = deployment(HEADER.replace("name: encoder", f'name: "{name}"'))
    assert problems_of(path) == [
        "hello_world.yaml:3: operators[0].name: must be 1 to 64 letters, digits, '_' or '-', "
        f'starting with a letter or digit (used in NATS subjects), got "{name}"'
    ]


# --- keys: unknown, missing, duplicated --------------------------------------------------------


def test_misspelled_key_gets_a_suggestion(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    wokers: 2\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: operators[0]: unknown key 'wokers' (did you mean 'workers'?)"
    ]


def test_unknown_key_without_a_near_miss_lists_the_allowed_keys(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "replicas: 2\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: unknown key 'replicas' "
        "(allowed keys: name, working_dir, request_plane, data_plane, log_level, log_dir, operators, http, metrics, tracing)"
    ]


def test_missing_implementation_is_reported_at_the_operator(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "  - name: decoder\n    workers: 2\n")
    assert problems_of(path) == [
        "hello_world.yaml:5: operators[1]: missing required key 'implementation' (kind 'python' needs it)"
    ]


def test_missing_operators(deployment: WriteDeployment) -> None:
    path = deployment("# no operators yet\nname: hello_world\n")
    assert problems_of(path) == ["hello_world.yaml:2: missing required key 'operators'"]


def test_empty_operators_list(deployment: WriteDeployment) -> None:
    path = deployment("name: hello_world\noperators: []\n")
    assert problems_of(path) == [
        "hello_world.yaml:2: operators: must list at least 1 operator, got an empty list"
    ]


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    workers: 2\n    workers: 4\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: operators[0].workers: duplicate key (first set at line 5)"
    ]


def test_merge_keys_may_override_without_being_duplicates(deployment: WriteDeployment) -> None:
    path = deployment(HEADER.replace("  - name: encoder", "  - &encoder\n    name: encoder") + """\
  - <<: *encoder
    name: decoder
""")
    assert [op.name for op in load_deployment(path).operators] == ["encoder", "decoder"]


# --- files crafted to be expensive ---------------------------------------------------------------


def _laughs(levels: int, merge: bool) -> str:
    """A "billion laughs" file: each level refers nine times to the one before."""
    lines = ["name: laughs", "operators:", "  - name: encoder", "    implementation: ops.encoder:Encoder"]
    if merge:
        lines += ["    parameters:", "      l0: &l0 {a: lol, b: lol}"]
        for level in range(1, levels):
            lines.append(f"      l{level}: &l{level} {{<<: [{', '.join([f'*l{level - 1}'] * 9)}]}}")
    else:
        lines += ["    parameters:", "      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        for level in range(1, levels):
            lines.append(f"      l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("merge", [False, True], ids=["aliases", "merge-keys"])
def test_aliases_expanding_exponentially_are_refused_at_the_alias_that_goes_too_far(
    deployment: WriteDeployment, merge: bool
) -> None:
    path = deployment(_laughs(9, merge))
    [problem] = problems_of(path)
    # An alias of level 4 stands for 66430 nodes: the second on level 5's line passes the bound.
    assert problem.startswith("hello_world.yaml:11:")
    assert f"invalid YAML: aliases expand to more than {MAX_ALIAS_NODES} nodes" in problem


def test_aliases_within_the_bound_are_expanded(deployment: WriteDeployment) -> None:
    path = deployment(_laughs(4, merge=False))  # 9^3 = 729 copies of "lol" at the last level
    parameters = load_deployment(path).operators[0].parameters
    assert len(parameters["l3"]) == 9 and len(parameters["l3"][0][0]) == 9


def test_a_large_file_sharing_defaults_through_merge_keys_loads(deployment: WriteDeployment) -> None:
    operators = [
        "  - &defaults",
        "    name: op0",
        "    implementation: ops.encoder:Encoder",
        "    max_inflight_requests: 4",
        "    delivery: {mode: at_least_once, max_attempts: 2}",
        "    parameters: {scale: 1.5, labels: [a, b, c], nested: {k: v}}",
    ]
    for index in range(1, 1000):
        operators += ["  - <<: *defaults", f"    name: op{index}"]
    path = deployment("name: big\noperators:\n" + "\n".join(operators) + "\n")
    config = load_deployment(path)
    assert len(config.operators) == 1000
    assert config.operator("op999").delivery.max_attempts == 2
    assert config.operator("op999").parameters["labels"] == ["a", "b", "c"]


# --- the file as a whole ------------------------------------------------------------------------


def test_yaml_syntax_error_gives_line_and_column(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "    workers: [1, 2\n")
    assert problems_of(path) == [
        "hello_world.yaml:6:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 5)"
    ]


def test_unterminated_quote(deployment: WriteDeployment) -> None:
    path = deployment('name: "hello_world\noperators: []\n')
    assert problems_of(path) == [
        "hello_world.yaml:3:1: invalid YAML: found unexpected end of stream "
        "(while scanning a quoted scalar at line 1)"
    ]


def test_top_level_list_instead_of_mapping(deployment: WriteDeployment) -> None:
    path = deployment("- name: encoder\n  implementation: ops.encoder:Encoder\n")
    assert problems_of(path) == [
        "hello_world.yaml:1: the top level must be a mapping with at least 'name' and 'operators', "
        "got a list"
    ]


@pytest.mark.parametrize("text", ["", "# just a comment\n\n"])
def test_empty_file(deployment: WriteDeployment, text: str) -> None:
    path = deployment(text)
    assert problems_of(path) == [
        "hello_world.yaml: the file is empty; a deployment is a mapping with at least 'name' and 'operators'"
    ]


def test_several_documents_in_one_file(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "---\nname: other\n")
    assert problems_of(path) == [
        "hello_world.yaml:5:1: invalid YAML: expected a single document in the stream, "
        "but found another document"
    ]


def test_nonexistent_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert problems_of("deployments/missing.yaml") == ["deployments/missing.yaml: no such file"]


def test_directory_instead_of_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert problems_of(".") == [".: is a directory, not a deployment file"]


# --- operator code ------------------------------------------------------------------------------


def test_implementation_module_not_found(deployment: WriteDeployment, tmp_path: Path) -> None:
    path = deployment(HEADER + "  - name: decoder\n    implementation: ops.decoder:Decoder\n")
    assert problems_of(path) == [
        f"hello_world.yaml:6: operators[1].implementation: cannot find module 'ops.decoder' under {tmp_path.resolve()}"
    ]


def test_implementation_file_not_found(deployment: WriteDeployment, tmp_path: Path) -> None:
    path = deployment(HEADER + "  - name: decoder\n    implementation: ops/decoder.py:Decoder\n")
    assert problems_of(path) == [
        f"hello_world.yaml:6: operators[1].implementation: cannot find file 'ops/decoder.py' under {tmp_path.resolve()}"
    ]


def test_implementation_that_is_neither_module_nor_file(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "  - name: decoder\n    implementation: ops-decoder:Decoder\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: operators[1].implementation: must be 'package.module:Class', "
        "or a file path 'path/to/file.py[:Class]' relative to working_dir, got \"ops-decoder:Decoder\""
    ]


def test_implementation_naming_a_file_that_is_not_python(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "  - name: decoder\n    implementation: /etc/passwd:X\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: operators[1].implementation: must name a Python file (.py): /etc/passwd is not one"
    ]


def test_implementation_naming_a_class_the_module_does_not_define(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "  - name: decoder\n    implementation: ops.encoder:Decoder\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: operators[1].implementation: module 'ops.encoder' defines no 'Decoder' "
        "(its classes: Encoder)"
    ]


def test_implementation_that_cannot_be_parsed(deployment: WriteDeployment, tmp_path: Path) -> None:
    (tmp_path / "ops" / "broken.py").write_text("class Broken(:\n")
    path = deployment(HEADER + "  - name: broken\n    implementation: ops/broken.py:Broken\n")
    [problem] = problems_of(path)
    assert problem.startswith("hello_world.yaml:6: operators[1].implementation: file 'ops/broken.py' cannot be imported:")
    assert f"{tmp_path / 'ops' / 'broken.py'}:1" in problem


def test_a_class_bound_in_ways_only_running_the_module_tells_is_left_to_deploy(
    deployment: WriteDeployment, tmp_path: Path
) -> None:
    (tmp_path / "ops" / "star.py").write_text("from ops.encoder import *\n")
    (tmp_path / "ops" / "alias.py").write_text("from ops.encoder import Encoder as Decoder\n")
    path = deployment(HEADER + """\
  - name: star
    implementation: ops.star:Encoder
  - name: alias
    implementation: ops.alias:Decoder
""")
    assert [op.name for op in load_deployment(path).operators] == ["encoder", "star", "alias"]


def test_inline_threshold_above_the_embedded_servers_max_payload(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "data_plane:\n  inline_threshold_bytes: 4194304\n")
    assert problems_of(path) == [
        "hello_world.yaml:6: data_plane.inline_threshold_bytes: must be at most 983040 so that a "
        "tensor sent inline fits in a NATS message (the embedded nats-server's max payload is "
        "1048576 bytes, 65536 kept for the header); larger tensors go over the data plane, got 4194304"
    ]
    # Another server's limit is its own, learnt when connecting.
    deployment(HEADER + "data_plane:\n  inline_threshold_bytes: 4194304\nrequest_plane:\n  nats_url: nats://nats:4222\n")
    assert load_deployment(FILE).data_plane.inline_threshold_bytes == 4194304


def test_installed_modules_are_found_too(deployment: WriteDeployment) -> None:
    path = deployment(HEADER + "  - name: decoder\n    implementation: json.decoder:JSONDecoder\n")
    assert load_deployment(path).operator("decoder").implementation == "json.decoder:JSONDecoder"


def test_operator_code_is_found_but_not_imported(deployment: WriteDeployment, tmp_path: Path) -> None:
    """Validating a file must not run operator code (it may be slow, or need a GPU)."""
    (tmp_path / "ops" / "loud.py").write_text("raise SystemExit('imported!')\nclass Loud: ...\n")
    path = deployment(HEADER + "  - name: loud\n    implementation: ops.loud:Loud\n")
    path_before = list(sys.path)
    load_deployment(path)
    assert "ops" not in sys.modules and "ops.loud" not in sys.modules
    assert sys.path == path_before


# --- everything at once ------------------------------------------------------------------------


def test_all_problems_are_reported_together_sorted_by_line(deployment: WriteDeployment) -> None:
    path = deployment("""\
        name: hello world
        request_plane:
          request_timeout_s: 0
        operators:
          - name: encoder
            implementation: ops.encoder:Encoder
            kind: triton
            wokers: 2
          - name: encoder
            workers: two
    """)
    assert problems_of(path) == [
        "hello_world.yaml:1: name: must be 1 to 64 letters, digits, '_' or '-', starting with a letter "
        'or digit (used in NATS subjects), got "hello world"',
        "hello_world.yaml:3: request_plane.request_timeout_s: must be a number > 0, got 0",
        "hello_world.yaml:5: operators[0]: missing required key 'repository' (kind 'triton' needs it)",
        "hello_world.yaml:6: operators[0].implementation: must not be set for kind 'triton' "
        "(it belongs to kind 'python'), got \"ops.encoder:Encoder\"",
        "hello_world.yaml:8: operators[0]: unknown key 'wokers' (did you mean 'workers'?)",
        "hello_world.yaml:9: operators[1]: missing required key 'implementation' (kind 'python' needs it)",
        'hello_world.yaml:9: operators[1].name: must be unique among operators '
        '(operators[0] has the same name), got "encoder"',
        'hello_world.yaml:10: operators[1].workers: must be an integer >= 1, got "two"',
    ]


def test_messages_name_the_file_as_the_user_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "deployments" / FILE
    path.parent.mkdir()
    path.write_text(HEADER + "    workers: 0\n")
    assert problems_of(path) == [f"{path}:5: operators[0].workers: must be an integer >= 1, got 0"]


# --- a valid file ------------------------------------------------------------------------------


def test_valid_file_loads_with_working_dir_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "code" / "ops").mkdir(parents=True)
    (tmp_path / "code" / "ops" / "encoder.py").write_text("class Encoder: ...\n")
    (tmp_path / "code" / "decoder.py").write_text("class Decoder: ...\n")
    path = tmp_path / "deployments" / FILE
    path.parent.mkdir()
    path.write_text("""\
name: hello_world
working_dir: ../code
log_level: DEBUG
request_plane:
  request_timeout_s: 5
operators:
  - name: encoder
    implementation: ops.encoder:Encoder   # a namespace package is fine
    workers: 2
    parameters: {input_copies: 3}
  - name: decoder
    implementation: decoder.py:Decoder
""")
    config = load_deployment(path)
    assert config.source == path.resolve()
    assert config.root == (tmp_path / "code").resolve()
    assert [(op.name, op.workers) for op in config.operators] == [("encoder", 2), ("decoder", 1)]
    assert config.operator("encoder").parameters == {"input_copies": 3}
    assert config.request_plane.request_timeout_s == 5.0


def test_parse_deployment_takes_text_and_a_source_name(tmp_path: Path) -> None:
    (tmp_path / "op.py").write_text("class Op: ...\n")
    text = "name: inline\noperators:\n  - {name: op, implementation: op.py}\n"
    config = parse_deployment(text, tmp_path / "inline.yaml")
    assert config.root == tmp_path.resolve()
    with pytest.raises(ConfigError) as caught:
        parse_deployment(text.replace("name: op", "name: op, workers: -1"), "<stdin>")
    assert caught.value.problems == ["<stdin>:3: operators[0].workers: must be an integer >= 1, got -1"]
