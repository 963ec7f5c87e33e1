"""Python-first pipelines, deployed for real: compiled classes answer as their YAML-first twins.

Real nats-server, real worker processes, real UCX for the large tensors.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline_runner import BadInputError, Connection, OperatorError, OperatorHandle
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.python_first.compile import compile_class

from .conftest import REPO_ROOT, TESTS_DIR, connected, running
from .test_cli import deployed, runner

YAML_FIRST = REPO_ROOT / "deployments" / "hello_world_python.yaml"
PYTHON_FIRST = REPO_ROOT / "deployments" / "hello_world_py.yaml"
ENTRY = "operators.hello_world_py:EncoderDecoder"


def test_the_committed_compiled_file_agrees_with_the_code() -> None:
    result = runner("compile", "--check", str(PYTHON_FIRST), ENTRY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agrees with operators.hello_world_py:EncoderDecoder" in result.stdout


def test_the_compiled_file_is_the_yaml_first_pipeline_declared_in_code() -> None:
    yaml_first, python_first = load_deployment(YAML_FIRST), load_deployment(PYTHON_FIRST)
    assert python_first.root == yaml_first.root
    for theirs, ours in zip(yaml_first.operators, python_first.operators, strict=True):
        assert ours.name == theirs.name
        module, _, class_name = ours.implementation.partition(":")
        assert (module, class_name) == ("operators.hello_world_py.pipeline", theirs.implementation.partition(":")[2])
        assert ours.model_dump(exclude={"implementation"}) == theirs.model_dump(exclude={"implementation"})


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        rng.integers(-(2**31), 2**31 - 1, size=1024, dtype=np.int32),
        rng.standard_normal((4, 33)),  # float64, two dimensions
        rng.integers(0, 2, size=17).astype(bool),
        rng.integers(0, 255, size=9, dtype=np.uint8),
        rng.standard_normal(200_000).astype(np.float32),  # 800 kB: over UCX, not inline
    ]


async def _answer(conn: Connection, operator: str, inputs: dict[str, Any], parameters: dict[str, Any]) -> Any:
    """The output array, or (code, message) of the error."""
    try:
        response = await conn.operator(operator).infer(inputs, parameters=parameters, timeout_s=20)
    except OperatorError as exc:
        return (exc.code, exc.message)
    return await response.array("output")


async def test_python_first_and_yaml_first_hello_world_give_identical_answers(nats_url: str) -> None:
    async with (
        running(load_deployment(YAML_FIRST), nats_url, workers=1) as yaml_first,
        running(load_deployment(PYTHON_FIRST), nats_url, workers=1) as python_first,
        connected(yaml_first) as theirs,
        connected(python_first) as ours,
    ):
        cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        for array in _inputs():
            for copies in (1, 3, 5):
                cases.append(("encoder", {"input": array}, {"input_copies": copies}))
            cases.append(("decoder", {"input": np.tile(array, 2)}, {"input_copies": 2}))
            cases.append(("encoder_decoder", {"input": array}, {}))
        bad = np.arange(6, dtype=np.int32)
        cases += [
            ("encoder_decoder", {"input": bad}, {"input_copies": 0}),
            ("encoder", {"input": np.array([1 + 2j])}, {}),  # complex: not taken
            ("encoder", {"input": np.int32(3)}, {}),  # a scalar
            ("decoder", {"input": bad}, {"input_copies": 4}),  # 6 is no multiple of 4
            ("encoder_decoder", {"wrong_name": bad}, {}),
        ]
        for operator, inputs, parameters in cases:
            want = await _answer(theirs, operator, inputs, parameters)
            got = await _answer(ours, operator, inputs, parameters)
            where = f"{operator} {parameters} {[(k, v.dtype, v.shape) for k, v in inputs.items()]}"
            if isinstance(want, tuple):
                assert got == want, where
                assert want[0] == "bad_input", where
            else:
                assert isinstance(got, np.ndarray), f"{where}: {got}"
                assert (got.dtype, got.shape) == (want.dtype, want.shape), where
                assert got.tobytes() == want.tobytes(), where
            if operator == "encoder_decoder" and not isinstance(want, tuple):
                assert got.tobytes() == inputs["input"].tobytes()


def test_runner_deploy_of_a_class_then_client_on_any_of_its_operators() -> None:
    with deployed(ENTRY, "hello_world_py") as (proc, state):  # type: ignore[arg-type]
        assert sorted({w.operator for w in state.workers}) == ["decoder", "encoder", "encoder_decoder"]
        result = runner("client", "--operator", "encoder_decoder", "--requests", "40", "--dtype", "float32")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "40/40" in result.stdout
        # The encoder's answer is not its input: the client says so, so it really reached it.
        result = runner("client", "--operator", "encoder", "--requests", "3", "--param", "input_copies=1")
        assert result.returncode == 1 and "0/3" in result.stdout
        assert "output differs from the input" in result.stdout


def test_runner_deploy_of_a_class_that_does_not_compile_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "cyclic.py").write_text(
        "from pipeline_runner import Operator, depends\n"
        "class A(Operator):\n"
        "    b = depends('cyclic:B')\n"
        "    async def execute(self, requests): ...\n"
        "class B(Operator):\n"
        "    a = depends(A)\n"
        "    async def execute(self, requests): ...\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_runner.cli", "deploy", "cyclic:A"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "cycle in depends: cyclic:A.b -> cyclic:B.a -> cyclic:A"


# --- typed endpoints ---------------------------------------------------------------------------


@pytest.fixture
def typed(monkeypatch: pytest.MonkeyPatch) -> Any:
    """tests/fixture_operators/typed.py, imported as the workers import it (tests/ on sys.path)."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    return importlib.import_module("fixture_operators.typed")


async def test_typed_endpoints_check_requests_and_responses_at_both_ends(nats_url: str, typed: Any) -> None:
    compiled = compile_class(typed.Front, name="typed", working_dir=str(TESTS_DIR))
    assert [op.name for op in compiled.config.operators] == ["greeter", "counter", "liar", "front"]
    async with running(compiled.config, nats_url, workers=1) as deployment, connected(deployment) as conn:
        # A JSON caller (what an HTTP front door sends): parameters validated in the worker.
        front = conn.operator("front")
        answer = await front.infer(parameters={"name": "ada", "times": 2})
        assert answer.parameters == {"greeting": "hello ada hello ada", "counted": [0, 1]}
        with pytest.raises(OperatorError) as caught:
            await front.infer(parameters={"name": "", "times": 11})
        assert caught.value.code == "bad_input"
        assert caught.value.message == (
            "invalid GreetRequest: name: String should have at least 1 character; "
            "times: Input should be less than or equal to 10"
        )
        with pytest.raises(OperatorError) as caught:
            await conn.operator("greeter").infer(parameters={"name": "nobody"})
        assert (caught.value.code, caught.value.message) == ("bad_input", "nobody cannot be greeted")

        # A Python caller: the same checks, the request before it is sent.
        greeter = OperatorHandle(typed.Greeter, connection=conn)
        greeting = await greeter.request(typed.GreetRequest(name="bob"))
        assert isinstance(greeting, typed.Greeting) and greeting.text == "hello bob"
        with pytest.raises(BadInputError, match=r"^invalid GreetRequest: times: Input should be greater than or equal to 1$"):
            await greeter.request({"name": "bob", "times": 0})
        with pytest.raises(BadInputError, match="takes a GreetRequest, got a CountRequest"):
            await greeter.request(typed.CountRequest(up_to=1))
        counter = OperatorHandle(typed.Counting, connection=conn)
        assert counter.name == "counter"
        assert [count.index async for count in counter.stream(typed.CountRequest(up_to=3))] == [0, 1, 2]
        with pytest.raises(TypeError, match="streams: use stream"):
            await counter.request(typed.CountRequest(up_to=3))

        # A response that is not the response model is never sent; its caller gets why.
        with pytest.raises(OperatorError) as caught:
            await front.infer(parameters={"name": "liar"})
        assert caught.value.code == "operator_failed"
        assert caught.value.message == (
            "liar: operator_failed: fixture_operators.typed:Liar.greet answered an invalid Greeting: "
            "text: Input should be a valid string"
        )
        # ...and every worker is still serving.
        assert (await front.infer(parameters={"name": "eve"})).parameters["greeting"] == "hello eve"

        # `runner client` reaches a JSON operator too: --param for its request, --no-check.
        code, out = await _runner("client", "--nats", nats_url, "--deployment", "typed", "--operator", "greeter",
                                  "--requests", "5", "--param", "name=ada", "--no-check")  # fmt: skip
        assert code == 0 and "5/5" in out, out
        code, out = await _runner("client", "--nats", nats_url, "--deployment", "typed", "--operator", "greeter",
                                  "--requests", "2", "--param", "name=ada", "--param", "times=0", "--no-check")  # fmt: skip
        assert code == 1 and "0/2" in out and "invalid GreetRequest: times: Input should be greater than" in out, out


async def _runner(*args: str) -> tuple[int, str]:
    """``runner ARGS`` as a subprocess, without blocking the event loop the deployment runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline_runner.cli", *args, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},  # rich wraps at the terminal's width
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode()
