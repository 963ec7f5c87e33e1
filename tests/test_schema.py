"""The published JSON Schema of deployment files (``schemas/deployment.schema.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from pipeline_runner.schema import SCHEMA_PATH, deployment_json_schema, schema_text

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DEPLOYMENTS = sorted((REPO_ROOT / "deployments").glob("*.yaml"))

MINIMAL_DEPLOYMENT = """\
name: minimal
operators:
  - name: echo
    implementation: echo.py
"""


def published_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def schema_errors(data: Any) -> list[str]:
    validator = Draft202012Validator(published_schema())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]


def test_published_schema_is_up_to_date_with_the_models() -> None:
    assert SCHEMA_PATH == REPO_ROOT / "schemas" / "deployment.schema.json"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        "schemas/deployment.schema.json differs from pipeline_runner/config.py; "
        "regenerate it with `runner schema --write`"
    )


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = deployment_json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"]


def test_minimal_deployment_validates() -> None:
    assert schema_errors(yaml.safe_load(MINIMAL_DEPLOYMENT)) == []


def test_schema_rejects_unknown_keys_like_the_models() -> None:
    data = yaml.safe_load(MINIMAL_DEPLOYMENT + "    wokers: 2\n")
    assert schema_errors(data) == [
        "['operators', 0]: Additional properties are not allowed ('wokers' was unexpected)"
    ]


@pytest.mark.parametrize("path", EXAMPLE_DEPLOYMENTS, ids=[p.name for p in EXAMPLE_DEPLOYMENTS])
def test_example_deployment_validates(path: Path) -> None:
    assert schema_errors(yaml.safe_load(path.read_text(encoding="utf-8"))) == []
