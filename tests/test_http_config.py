"""The deployment file's ``http:`` section and operator ``inputs``/``outputs``, as `runner validate` sees them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline_runner.config_loader import parse_deployment
from pipeline_runner.errors import ConfigError, RunnerError
from pipeline_runner.http.spec import resolve_token

HEADER = """\
name: front
operators:
  - name: encoder
    implementation: tests/fixture_operators/echo.py:Echo
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(textwrap.dedent(text), "front.yaml")
    return caught.value.problems


def test_no_http_section_means_no_http() -> None:
    config = parse_deployment(HEADER, "front.yaml")
    assert config.http is None and config.exposed_operators() == []


def test_defaults_bind_loopback_and_expose_every_operator() -> None:
    config = parse_deployment(HEADER + "http: {}\n", "front.yaml")
    assert config.http is not None
    assert (config.http.host, config.http.port, config.http.workers) == ("127.0.0.1", 8000, 1)
    assert config.http.max_body_bytes == 64 * 1024 * 1024 and config.http.auth is None
    assert [op.name for op in config.exposed_operators()] == ["encoder"]


def test_values_out_of_range_are_reported_at_their_key() -> None:
    assert problems(HEADER + "http:\n  port: 80000\n  workers: 0\n  max_body_bytes: -1\n") == [
        "front.yaml:6: http.port: must be an integer from 0 to 65535, got 80000",
        "front.yaml:7: http.workers: must be an integer from 1 to 256, got 0",
        "front.yaml:8: http.max_body_bytes: must be an integer >= 1, got -1",
    ]


def test_unknown_keys_get_a_suggestion() -> None:
    assert problems(HEADER + "http:\n  prot: 8000\n") == [
        "front.yaml:6: http: unknown key 'prot' (did you mean 'port'?)"
    ]


def test_expose_and_routes_must_name_operators_and_paths() -> None:
    text = HEADER + "http:\n  expose: [encoder, decoder]\n  routes: {/generate: nope, /v2/x: encoder, bad: encoder}\n"
    assert problems(text) == [
        'front.yaml:6: http.expose[1]: must name an operator of this deployment (encoder), got "decoder"',
        'front.yaml:7: http.routes["/generate"]: must name an exposed operator (encoder), got "nope"',
        "front.yaml:7: http.routes[\"/v2/x\"]: must not start with /v2 (the Open Inference Protocol's paths), got \"encoder\"",
        "front.yaml:7: http.routes.bad: 'bad' must be a URL path like /generate: '/' and segments of letters, "
        "digits, '_', '-', '.' or '~', got \"encoder\"",
    ]


def test_auth_takes_exactly_one_token_source() -> None:
    assert problems(HEADER + "http:\n  auth: {}\n") == [
        "front.yaml:6: http.auth: must set exactly one of token_env and token_file, got an empty mapping"
    ]
    assert problems(HEADER + "http:\n  auth: {token_env: A, token_file: b}\n") == [
        "front.yaml:6: http.auth: must set exactly one of token_env and token_file, got a mapping"
    ]


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    config = parse_deployment(HEADER + "http:\n  auth: {token_env: MY_TOKEN}\n", "front.yaml")
    assert config.http is not None
    assert resolve_token(config.http.auth, tmp_path, {"MY_TOKEN": " t0k \n"}) == "t0k"
    with pytest.raises(RunnerError, match="MY_TOKEN is not set"):
        resolve_token(config.http.auth, tmp_path, {})
    config = parse_deployment(HEADER + "http:\n  auth: {token_file: token.txt}\n", "front.yaml")
    assert config.http is not None
    with pytest.raises(RunnerError, match="cannot read"):
        resolve_token(config.http.auth, tmp_path, {})
    (tmp_path / "token.txt").write_text("from-file\n")
    assert resolve_token(config.http.auth, tmp_path, {}) == "from-file"


def test_tensor_declarations_are_checked() -> None:
    text = HEADER + "    inputs: [{name: input, datatype: INT33, shape: [-1]}]\n    outputs: [{name: out, shape: [-2]}]\n"
    assert problems(text) == [
        "front.yaml:5: operators[0].inputs[0].datatype: must be one of 'BOOL', 'UINT8', 'UINT16', 'UINT32', "
        "'UINT64', 'INT8', 'INT16', 'INT32', 'INT64', 'FP16', 'FP32', 'FP64', 'BYTES', got \"INT33\" (did you mean 'INT32'?)",
        "front.yaml:6: operators[0].outputs[0].shape[0]: must be an integer >= -1, got -2",
        "front.yaml:6: operators[0].outputs[0]: missing required key 'datatype'",
    ]
