"""The README's examples stay true: its deployment file validates, its commands exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline_runner.cli import _parser
from pipeline_runner.config_loader import parse_deployment

from .conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_the_deployment_file_example_is_a_valid_deployment(tmp_path: Path) -> None:
    block = re.search(r"## Deployment file\n\n```yaml\n(.*?)```", README, re.S)
    assert block, "README lost its deployment file example"
    source = tmp_path / "deployments" / "example.yaml"
    source.parent.mkdir()
    (tmp_path / "operators" / "hello_world").mkdir(parents=True)
    for name in ("__init__.py", "hello_world/__init__.py"):
        (tmp_path / "operators" / name).write_text("")
    (tmp_path / "operators" / "hello_world" / "encoder.py").write_text("class Encoder: ...\n")
    config = parse_deployment(block.group(1), source)
    assert config.operators[0].name == "encoder"


def test_the_first_commands_are_the_quick_start_and_the_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert "runner deploy deployments/hello_world.yaml" in commands[0]
    assert "runner client --requests 100" in commands[0]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run exactly the README's test command"


def test_every_command_in_the_cli_table_exists() -> None:
    documented = set(re.findall(r"\| `runner ([\w-]+)", README))
    subcommands = set(_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert documented and documented <= subcommands


def _runner_commands() -> list[str]:
    """Every ``runner ...`` command in the README's bash blocks, as a user would type it."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0]
            for match in re.finditer(r"(?:^|[\s{(;&])(runner [^&;|>}#]*)", line):
                commands.append(match.group(1).strip().rstrip("'\""))
    return commands


@pytest.mark.parametrize("command", _runner_commands())
def test_every_runner_command_in_the_readme_parses(command: str) -> None:
    argv = shlex.split(command.replace("$NATS", "nats://10.0.0.1:4222"))[1:]
    try:
        _parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README command does not parse ({exc.code}): {command}")
