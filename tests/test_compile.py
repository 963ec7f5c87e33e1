"""``runner compile``: classes and their ``depends`` to a deployment file, checks and precedence.

Each test writes a small package ``app`` in a temporary directory and works there, as a user
running ``runner compile app.pipeline:Front`` from their project directory would.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from pipeline_runner import Operator, OperatorHandle, RemoteOperator, depends, endpoint, operator_defaults
from pipeline_runner.cli import main
from pipeline_runner.config_loader import load_deployment
from pipeline_runner.errors import BadInputError, ConfigError
from pipeline_runner.python_first.compile import compile_target, is_class_target
from pipeline_runner.python_first.declare import Depends, operator_name, snake_case
from pipeline_runner.python_first.endpoint import InvalidResponseError, endpoint_spec

WriteModule = Callable[[str, str], None]

PIPELINE = """\
from pipeline_runner import Operator, depends, operator_defaults

class Base(Operator):
    async def execute(self, requests):
        for request in requests:
            await request.respond()

@operator_defaults(workers=3, device="auto", delivery={"mode": "at_most_once"})
class Backend(Base):
    pass

@operator_defaults(max_batch_size=8, parameters={"greeting": "hi"})
class MiddleStage(Base):
    backend = depends(Backend)

@operator_defaults(name="front_door", workers=2)
class Front(Base):
    middle = depends(MiddleStage)
    backend = depends(Backend)
"""


def _forget_app() -> None:
    for name in [name for name in sys.modules if name == "app" or name.startswith("app.")]:
        del sys.modules[name]


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Writes ``app/<name>.py`` under a fresh project directory, the current directory; the
    next compile imports what was written last (as a fresh ``runner`` process would)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a rewrite within a second is no stale .pyc
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")

    def write(name: str, text: str) -> None:
        (tmp_path / "app" / f"{name}.py").write_text(textwrap.dedent(text))
        _forget_app()
        importlib.invalidate_caches()

    yield write
    _forget_app()


def problems(target: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        compile_target(target)
    return caught.value.problems


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``runner ARGS`` (its ``main``, in this process): (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --- compiling -----------------------------------------------------------------------------------


def test_compile_lists_callees_first_with_each_class_defaults_and_origin(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    code, out, err = run("compile", "app.pipeline:Front", "-o", "deployments/app.yaml")
    assert code == 0, err
    assert err.strip() == "wrote deployments/app.yaml: deployment 'pipeline', operators: backend×3, middle_stage×1, front_door×2"
    text = (tmp_path / "deployments" / "app.yaml").read_text()
    assert text.splitlines()[3:] == [
        "name: pipeline",
        "working_dir: ..",
        "operators:",
        "  # from app.pipeline:Backend",
        "  - name: backend",
        "    implementation: app.pipeline:Backend",
        "    workers: 3",
        "    delivery:",
        "      mode: at_most_once",
        "    device: auto",
        "  # from app.pipeline:MiddleStage; calls backend",
        "  - name: middle_stage",
        "    implementation: app.pipeline:MiddleStage",
        "    max_batch_size: 8",
        "    parameters:",
        "      greeting: hi",
        "  # from app.pipeline:Front; calls middle_stage, backend",
        "  - name: front_door",
        "    implementation: app.pipeline:Front",
        "    workers: 2",
    ]
    config = load_deployment(tmp_path / "deployments" / "app.yaml")  # what runner validate checks
    assert config.root == tmp_path.resolve()
    assert config.operator("backend").delivery.mode == "at_most_once"
    assert config.operator("backend").delivery.max_attempts == 3  # the rest of delivery: defaults


def test_compile_to_stdout_with_a_deployment_name(run: Callable[..., tuple[int, str, str]], module: WriteModule) -> None:
    module("pipeline", PIPELINE)
    code, out, err = run("compile", "app.pipeline:Backend", "--name", "solo")
    assert code == 0, err
    assert "name: solo\nworking_dir: .\noperators:\n  # from app.pipeline:Backend\n  - name: backend\n" in out


def test_operator_names_are_the_snake_case_of_class_names_unless_given() -> None:
    assert [snake_case(n) for n in ("Encoder", "EncoderDecoder", "HTTPFrontend", "Stage2Model", "_Private")] == [
        "encoder", "encoder_decoder", "http_frontend", "stage2_model", "private",
    ]  # fmt: skip

    @operator_defaults(name="custom")
    class Named(Operator):
        async def execute(self, requests): ...

    class SubOfNamed(Named):  # the decorator's values are not inherited: its name neither
        pass

    assert (operator_name(Named), operator_name(SubOfNamed)) == ("custom", "sub_of_named")


def test_a_class_depended_on_twice_is_one_operator(module: WriteModule) -> None:
    module("pipeline", PIPELINE)
    compiled = compile_target("app.pipeline:Front")
    assert [op.name for op in compiled.config.operators] == ["backend", "middle_stage", "front_door"]


# --- what compile refuses, naming class and module -----------------------------------------------


def test_a_cycle_of_depends_names_every_hop(module: WriteModule) -> None:
    module("cycle", """\
        from pipeline_runner import Operator, depends

        class Op(Operator):
            async def execute(self, requests): ...

        class A(Op):
            b = depends("app.cycle:B")

        class B(Op):
            c = depends("app.other:C")

        class Entry(Op):
            a = depends(A)
    """)
    module("other", """\
        from pipeline_runner import depends
        from app.cycle import Op

        class C(Op):
            a = depends("app.cycle:A")
    """)
    assert problems("app.cycle:Entry") == [
        "cycle in depends: app.cycle:A.b -> app.cycle:B.c -> app.other:C.a -> app.cycle:A"
    ]


def test_depending_on_something_that_is_not_an_operator(module: WriteModule) -> None:
    module("bad", """\
        from pipeline_runner import Operator, depends

        class Helper:
            pass

        class Front(Operator):
            helper = depends(Helper)
            missing = depends("app.bad:Nowhere")
            gone = depends("app.gone:Thing")

            async def execute(self, requests): ...
    """)
    assert problems("app.bad:Front") == [
        "app.bad:Front.helper: depends on app.bad:Helper, which is not a pipeline_runner.Operator subclass",
        "app.bad:Front.missing: depends('app.bad:Nowhere'): module 'app.bad' has no attribute 'Nowhere'",
        "app.bad:Front.gone: depends('app.gone:Thing'): cannot import 'app.gone': "
        "ModuleNotFoundError: No module named 'app.gone'",
    ]


def test_two_classes_with_one_operator_name(module: WriteModule) -> None:
    module("one", "from pipeline_runner import Operator\nclass Encoder(Operator):\n    async def execute(self, r): ...\n")
    module("two", """\
        from pipeline_runner import Operator, depends
        import app.one

        class Encoder(Operator):
            async def execute(self, requests): ...

        class Front(Operator):
            first = depends(app.one.Encoder)
            second = depends(Encoder)
            async def execute(self, requests): ...
    """)
    assert problems("app.two:Front") == [
        "operator name 'encoder' is used by both app.one:Encoder and app.two:Encoder: "
        "give one of them @operator_defaults(name=...)"
    ]


def test_an_entry_that_is_not_an_operator_or_cannot_be_imported(module: WriteModule) -> None:
    module("plain", "class Thing:\n    pass\nraise_later = 1\n")
    module("broken", "raise RuntimeError('no weights here')\n")
    assert problems("app.plain:Thing") == ["app.plain:Thing: <class 'app.plain.Thing'> is not a pipeline_runner.Operator subclass"]
    assert problems("app.plain:Other") == ["app.plain:Other: module 'app.plain' has no attribute 'Other'"]
    assert problems("app.broken:X") == ["app.broken:X: cannot import 'app.broken': RuntimeError: no weights here"]
    assert problems("elsewhere.mod:X") == [
        "elsewhere.mod:X: cannot import 'elsewhere.mod': ModuleNotFoundError: No module named 'elsewhere' "
        f"(modules resolve from the current directory, {Path.cwd()})"
    ]


def test_abstract_and_nested_classes_cannot_be_operators(module: WriteModule) -> None:
    module("shapes", """\
        from pipeline_runner import Operator, depends

        class Abstract(Operator):
            pass

        class Outer:
            class Inner(Operator):
                async def execute(self, requests): ...

        class Front(Operator):
            a = depends(Abstract)
            b = depends(Outer.Inner)
            async def execute(self, requests): ...
    """)
    assert problems("app.shapes:Front") == [
        "app.shapes:Abstract: is abstract: implement execute() or an @endpoint method",
        "app.shapes:Outer.Inner: an operator class must be defined at the top level of an importable module",
    ]


def test_class_defaults_are_validated_as_deployment_fields(module: WriteModule) -> None:
    module("defaults", """\
        from pipeline_runner import Operator, operator_defaults

        @operator_defaults(workers=0, device="tpu", gpus=[0])
        class Bad(Operator):
            async def execute(self, requests): ...
    """)
    assert problems("app.defaults:Bad") == [
        "app.defaults:Bad: @operator_defaults: workers: Input should be greater than or equal to 1",
        "app.defaults:Bad: @operator_defaults: device: Input should be 'cpu', 'gpu' or 'auto'",
    ]


def test_class_defaults_take_only_what_a_deployment_file_can_say() -> None:
    with pytest.raises(ConfigError) as caught:

        @operator_defaults(wrokers=2, repository="models")
        class Typo(Operator):
            async def execute(self, requests): ...

    where = "tests.test_compile:test_class_defaults_take_only_what_a_deployment_file_can_say.<locals>.Typo"
    assert caught.value.problems == [
        f"{where}: @operator_defaults(wrokers=...): no such operator field (did you mean 'workers'?)",
        f"{where}: @operator_defaults(repository=...): not for a Python operator class",
    ]
    with pytest.raises(ConfigError) as caught:
        operator_defaults(colour="red")(_Backend)
    assert caught.value.problems == [
        "tests.test_compile:_Backend: @operator_defaults(colour=...): no such operator field (fields: name, version, workers, "
        "max_inflight_requests, max_queued_requests, max_batch_size, batching, max_request_bytes, parameters, delivery, device, gpus, "
        "resources, log_level, inputs, outputs)"
    ]
    with pytest.raises(ConfigError, match="is for pipeline_runner.Operator subclasses"):
        operator_defaults(workers=2)(type("NotAnOperator", (), {}))


# --- --check -------------------------------------------------------------------------------------


def test_check_passes_for_a_fresh_compile_and_fails_with_a_diff_after_a_change(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    assert run("compile", "app.pipeline:Front", "-o", "app.yaml")[0] == 0
    code, out, err = run("compile", "--check", "app.yaml", "app.pipeline:Front")
    assert (code, err) == (0, "")
    assert out == "app.yaml: OK — agrees with app.pipeline:Front (operators: backend×3, middle_stage×1, front_door×2)\n"

    # The code changes: Backend now wants 4 workers.
    module("pipeline", PIPELINE.replace("workers=3", "workers=4"))
    code, out, err = run("compile", "--check", "app.yaml", "app.pipeline:Front")
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0] == "app.yaml disagrees with the code of app.pipeline:Front; `runner compile app.pipeline:Front -o app.yaml` rewrites it:"
    assert "-  workers: 3" in lines and "+  workers: 4" in lines
    assert [line for line in lines[1:] if line[:1] in "+-" and not line.startswith(("+++", "---"))] == [
        "-  workers: 3", "+  workers: 4",
    ]  # fmt: skip


def test_check_fails_for_a_hand_edit_or_a_renamed_operator(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    run("compile", "app.pipeline:Front", "-o", "app.yaml")
    text = (tmp_path / "app.yaml").read_text()
    (tmp_path / "app.yaml").write_text(text.replace("name: middle_stage", "name: middle"))
    code, out, _ = run("compile", "--check", "app.yaml", "app.pipeline:Front")
    assert code == 1 and "-- name: middle" in out.splitlines() and "+- name: middle_stage" in out.splitlines()


def test_the_file_keeps_the_deployment_settings_the_code_cannot_express(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    run("compile", "app.pipeline:Front", "-o", "app.yaml")
    text = (tmp_path / "app.yaml").read_text().replace("name: pipeline", "name: prod\nlog_level: DEBUG\nrequest_plane:\n  request_timeout_s: 5")
    (tmp_path / "app.yaml").write_text(text)
    assert run("compile", "--check", "app.yaml", "app.pipeline:Front")[0] == 0  # not the code's business
    code, out, _ = run("compile", "--check", "app.yaml", "app.pipeline:Front", "--name", "staging")
    assert code == 1 and "-name: prod" in out and "+name: staging" in out
    # Compiling again into the file rewrites the operators and keeps those settings and the name.
    module("pipeline", PIPELINE.replace("workers=3", "workers=5"))
    assert run("compile", "app.pipeline:Front", "-o", "app.yaml")[0] == 0
    config = load_deployment(tmp_path / "app.yaml")
    assert (config.name, config.log_level, config.request_plane.request_timeout_s) == ("prod", "DEBUG", 5.0)
    assert config.operator("backend").workers == 5


def test_compiling_into_a_stale_file_rewrites_it(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    (tmp_path / "app.yaml").write_text("name: old\nlog_level: ERROR\noperators:\n  - {name: gone, implementation: app.moved:Gone}\n")
    assert run("compile", "app.pipeline:Front", "-o", "app.yaml")[0] == 0
    config = load_deployment(tmp_path / "app.yaml")
    assert (config.name, config.log_level) == ("old", "ERROR")
    assert [op.name for op in config.operators] == ["backend", "middle_stage", "front_door"]


def test_check_of_an_invalid_file_exits_2_with_its_problems(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    (tmp_path / "app.yaml").write_text("name: x\noperators:\n  - name: a\n    implementation: app.pipeline:Front\n    workers: 0\n")
    code, _, err = run("compile", "--check", "app.yaml", "app.pipeline:Front")
    assert (code, err) == (2, "app.yaml:5: operators[0].workers: must be an integer >= 1, got 0\n")


# --- precedence: default < class < file < flag -----------------------------------------------------


def _explained(out: str, operator: str) -> dict[str, tuple[str, str]]:
    """``runner validate --explain`` output: field -> (value as shown, source), for ``operator``."""
    rows: dict[str, tuple[str, str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("operator "):
            current = line.split()[1]
        elif current == operator and line.startswith("  "):
            field, *middle, source = line.split()
            rows[field] = (" ".join(middle), source)
    return rows


def test_explain_of_a_class_says_which_values_the_class_set(run: Callable[..., tuple[int, str, str]], module: WriteModule) -> None:
    module("pipeline", PIPELINE)
    code, out, err = run("validate", "--explain", "app.pipeline:Front", "--workers", "7")
    assert code == 0, err
    backend = _explained(out, "backend")
    assert backend["implementation"] == ('"app.pipeline:Backend"', "class")
    assert backend["workers"] == ("7", "flag")
    assert backend["device"] == ('"auto"', "class")
    assert backend["delivery.mode"] == ('"at_most_once"', "class")
    assert backend["delivery.max_attempts"] == ("3", "default")
    assert backend["max_batch_size"] == ("1", "default")
    assert _explained(out, "middle_stage")["parameters.greeting"] == ('"hi"', "class")
    assert "repository" not in backend  # a Triton field says nothing about a Python operator


def test_explain_of_a_file_says_which_values_the_file_set(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    run("compile", "app.pipeline:Front", "-o", "app.yaml")
    text = (tmp_path / "app.yaml").read_text().replace("    max_batch_size: 8\n", "    max_batch_size: 8\n    workers: 6\n")
    (tmp_path / "app.yaml").write_text(text)
    code, out, err = run("validate", "--explain", "app.yaml")
    assert code == 0, err
    middle = _explained(out, "middle_stage")
    assert middle["workers"] == ("6", "file")
    assert middle["max_batch_size"] == ("8", "file")  # written by compile from the class: now the file's
    assert middle["max_inflight_requests"] == ("16", "default")
    code, out, _ = run("validate", "--explain", "app.yaml", "--workers", "2")
    assert _explained(out, "middle_stage")["workers"] == ("2", "flag")


def test_validate_and_deploy_take_a_class_or_a_file(run: Callable[..., tuple[int, str, str]], module: WriteModule, tmp_path: Path) -> None:
    module("pipeline", PIPELINE)
    code, out, err = run("validate", "app.pipeline:Front")
    assert code == 0, err
    assert out.startswith("app.pipeline:Front: OK — deployment 'pipeline', operators: backend×3, middle_stage×1, front_door×2")
    code, _, err = run("validate", "app.yaml")
    assert (code, err) == (2, "app.yaml: no such file\n")
    code, _, err = run("validate", "app.yaml", "--name", "x")
    assert code == 1 and "--name is for a 'package.module:Class' target" in err
    assert is_class_target("app.pipeline:Front") and is_class_target("main:App")
    assert not is_class_target("deployments/x.yaml") and not is_class_target("x.yml") and not is_class_target("x")
    (tmp_path / "app.pipeline:Front").write_text("")  # an existing path is a file, whatever its name
    assert not is_class_target("app.pipeline:Front")


# --- depends and endpoints on the Python side ------------------------------------------------------


class _Backend(Operator):
    async def execute(self, requests): ...


@operator_defaults(version=3)
class _Versioned(Operator):
    async def execute(self, requests): ...


class _Front(Operator):
    backend = depends(_Backend)
    versioned = depends(_Versioned)

    async def execute(self, requests): ...


def test_depends_is_a_remote_operator_handle_on_the_instance() -> None:
    front = _Front.__new__(_Front)  # no worker context needed to look at the handles
    assert isinstance(_Front.backend, Depends)
    handle = front.backend
    assert isinstance(handle, OperatorHandle) and isinstance(handle, RemoteOperator)
    assert (handle.name, handle.version) == ("backend", 1)
    assert front.backend is handle  # one handle per instance
    assert (front.versioned.name, front.versioned.version) == ("versioned", 3)


class Ask(BaseModel):
    prompt: str
    tokens: int = Field(16, gt=0)


class Answer(BaseModel):
    text: str


class Untyped(Operator):
    @endpoint
    async def run(self, request: dict) -> Answer:  # type: ignore[type-arg]
        return Answer(text="")


class StreamsUnannotated(Operator):
    @endpoint
    async def run(self, request: Ask) -> Answer:
        yield Answer(text="")


class Model(Operator):
    @endpoint
    async def generate(self, request: Ask) -> Answer:
        return Answer(text=request.prompt)


def test_an_endpoint_must_be_typed_with_pydantic_models() -> None:
    with pytest.raises(ConfigError, match=r":Untyped.run: its argument must be annotated with a pydantic model"):
        endpoint_spec(Untyped)
    with pytest.raises(ConfigError, match=r":StreamsUnannotated.run: a streaming @endpoint is annotated -> AsyncIterator\[Model\]"):
        endpoint_spec(StreamsUnannotated)
    with pytest.raises(TypeError, match="must be an 'async def' method"):
        endpoint(lambda self, request: None)


def test_an_endpoint_operator_has_no_execute_of_its_own() -> None:
    with pytest.raises((TypeError, RuntimeError)) as caught:

        class Both(Operator):
            @endpoint
            async def run(self, request: Ask) -> Answer:
                return Answer(text="")

            async def execute(self, requests): ...

    assert "define execute() or an @endpoint method, not both" in str(caught.value) + str(caught.value.__cause__)


def test_endpoint_requests_and_responses_are_checked_with_pydantic_messages() -> None:
    spec = endpoint_spec(Model)
    assert spec is not None and not spec.streaming
    assert spec.parse_request({"prompt": "hi"}) == Ask(prompt="hi")
    with pytest.raises(BadInputError) as caught:
        spec.parse_request({"tokens": 0})
    assert str(caught.value) == "invalid Ask: prompt: Field required; tokens: Input should be greater than 0"
    assert spec.request_parameters(Ask(prompt="hi")) == {"prompt": "hi", "tokens": 16}
    changed = Ask(prompt="hi")
    changed.tokens = 0  # pydantic does not check assignments unless told to: the caller does
    with pytest.raises(BadInputError, match="^invalid Ask: tokens: Input should be greater than 0$"):
        spec.request_parameters(changed)
    assert spec.response_parameters(Answer(text="ok")) == {"text": "ok"}
    with pytest.raises(InvalidResponseError, match=r":Model.generate answered an invalid Answer: text: Field required$"):
        spec.response_parameters({})
    with pytest.raises(InvalidResponseError, match=r":Model.generate must answer Answer, got a Ask$"):
        spec.response_parameters(Ask(prompt="no"))


def test_cli_main_reports_compile_errors_without_a_traceback(module: WriteModule, capsys: pytest.CaptureFixture[str]) -> None:
    module("pipeline", PIPELINE)
    assert main(["compile", "app.pipeline:Nope"]) == 2
    assert capsys.readouterr().err == "app.pipeline:Nope: module 'app.pipeline' has no attribute 'Nope'\n"
    assert main(["compile", "deployments/x.yaml"]) == 1
    assert "runner compile takes 'package.module:Class'" in capsys.readouterr().err
