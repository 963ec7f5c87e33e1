"""hello_streaming ported Python-first (operators/hello_streaming_py): the compiled file, and both
versions deployed side by side giving the same streamed answers and the same errors.

Real nats-server, real worker processes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pipeline_runner import Connection, DeploymentConfig, OperatorError
from pipeline_runner.config_loader import load_deployment

from .conftest import REPO_ROOT, connected, running
from .test_cli import runner
from .test_hello_streaming import assert_every_stage_cancelled_and_the_backend_stopped

YAML_FIRST = REPO_ROOT / "deployments" / "hello_streaming.yaml"
PYTHON_FIRST = REPO_ROOT / "deployments" / "hello_streaming_py.yaml"
ENTRY = "operators.hello_streaming_py:Frontend"

FIFTY_WORDS = " ".join(f"word{i}" for i in range(50))
TOO_MANY_WORDS = " ".join(["w"] * 1001)  # max_words is 1000 in every stage


def with_parameters(config: DeploymentConfig, **per_operator: dict[str, Any]) -> DeploymentConfig:
    """``config`` with some operators' parameters overridden."""
    operators = [
        op.model_copy(update={"parameters": {**op.parameters, **per_operator.get(op.name, {})}})
        for op in config.operators
    ]
    return config.model_copy(update={"operators": operators})


def test_the_committed_compiled_file_agrees_with_the_code() -> None:
    result = runner("compile", "--check", str(PYTHON_FIRST), ENTRY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agrees with operators.hello_streaming_py:Frontend" in result.stdout


def test_the_compiled_file_has_the_yaml_first_operators_with_classes_instead_of_next() -> None:
    yaml_first, python_first = load_deployment(YAML_FIRST), load_deployment(PYTHON_FIRST)
    assert python_first.root == yaml_first.root
    ours = {op.name: op for op in python_first.operators}
    assert sorted(ours) == sorted(op.name for op in yaml_first.operators)
    for theirs in yaml_first.operators:
        op = ours[theirs.name]
        assert op.implementation == f"operators.hello_streaming_py.pipeline:{theirs.implementation.partition(':')[2]}"
        # `next` named the callee by string; depends() names it by class now.
        assert op.parameters == {k: v for k, v in theirs.parameters.items() if k != "next"}
        assert op.model_dump(exclude={"implementation", "parameters"}) == theirs.model_dump(
            exclude={"implementation", "parameters"}
        )
    # The HTTP route is the deployment's, not a class's: written in the file, kept by compiling.
    assert python_first.http == yaml_first.http


async def answer(conn: Connection, operator: str, parameters: dict[str, Any]) -> Any:
    """Every response's (parameters, final), or the error's (code, operator)."""
    try:
        return [(r.parameters, r.final) async for r in conn.operator(operator).call(parameters=parameters, timeout_s=30)]
    except OperatorError as exc:
        return (exc.code, exc.operator)


async def error_message(conn: Connection, operator: str, parameters: dict[str, Any]) -> str:
    try:
        [r async for r in conn.operator(operator).call(parameters=parameters, timeout_s=30)]
    except OperatorError as exc:
        return exc.message
    raise AssertionError(f"{operator} {parameters}: no error")


async def test_python_first_and_yaml_first_hello_streaming_give_identical_answers(nats_url: str) -> None:
    no_delay = {"backend": {"delay": 0}}
    async with (
        running(with_parameters(load_deployment(YAML_FIRST), **no_delay), nats_url, workers=1) as yaml_first,
        running(with_parameters(load_deployment(PYTHON_FIRST), **no_delay), nats_url, workers=1) as python_first,
        connected(yaml_first, timeout_s=30) as theirs,
        connected(python_first, timeout_s=30) as ours,
    ):
        texts = ["hello world", FIFTY_WORDS, "one", "  tabs\tand\nnewlines  ", "héllo wörld ✓"]
        for operator in ("frontend", "middle", "backend"):
            for text in texts:
                want = await answer(theirs, operator, {"text": text})
                got = await answer(ours, operator, {"text": text})
                assert got == want, f"{operator} {text!r}"
                assert isinstance(want, list) and want[-1] == ({}, True), f"{operator} {text!r}: {want}"
                assert len(want) > len(text.split()), f"{operator} {text!r}: {want}"  # a word each, then the end

        assert (await answer(ours, "frontend", {"text": "hello world"})) == [
            ({"text": "Frontend: Middle: Backend: hello"}, False),
            ({"text": "Frontend: Middle: Backend: world-mid-back"}, False),
            ({}, True),
        ]

        # Bad input: the same error code from the same stage. Where the shared word check speaks,
        # the same message too; a text that is missing or not a string, pydantic words it.
        checked_by_both = [{"text": ""}, {"text": " \n "}, {"text": TOO_MANY_WORDS}]
        not_a_string = [{}, {"text": None}, {"text": 42}, {"text": ["hello"]}, {"text": 3.5}, {"prompt": "hi"}]
        for operator in ("frontend", "middle", "backend"):
            for parameters in checked_by_both + not_a_string:
                want = await answer(theirs, operator, parameters)
                got = await answer(ours, operator, parameters)
                assert got == want == ("bad_input", operator), f"{operator} {parameters}"
            for parameters in checked_by_both:
                assert await error_message(ours, operator, parameters) == await error_message(theirs, operator, parameters)
            assert "text" in await error_message(ours, operator, {"text": 42})

        # After all that, both still serve, with no worker restarted.
        assert await answer(ours, "frontend", {"text": FIFTY_WORDS}) == await answer(theirs, "frontend", {"text": FIFTY_WORDS})
        assert [w.restarts for w in yaml_first.workers + python_first.workers] == [0] * 6


async def test_a_caller_leaving_mid_stream_stops_the_python_first_backend(nats_url: str) -> None:
    config = with_parameters(load_deployment(PYTHON_FIRST), backend={"delay": 0.2})
    words = 40  # 8 s of generation
    async with running(config, nats_url, workers=1) as deployment, connected(deployment, timeout_s=60) as conn:
        stream = conn.operator("frontend").call(parameters={"text": " ".join(["word"] * words)})
        async with contextlib.aclosing(stream):
            async for _ in stream:
                break  # the caller goes away after the first word

        await assert_every_stage_cancelled_and_the_backend_stopped(conn, words)
