"""The deployment file's JSON Schema, generated from :class:`DeploymentConfig`.

The checked-in copy at ``schemas/deployment.schema.json`` serves editors and other tools;
``runner schema --write`` regenerates it and a test keeps it in step with the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import DeploymentConfig

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "deployment.schema.json"
SCHEMA_ID = "urn:pipeline-runner:schema:deployment"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def deployment_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a deployment file."""
    schema = DeploymentConfig.model_json_schema()
    schema["$schema"] = SCHEMA_DIALECT
    schema["$id"] = SCHEMA_ID
    schema["title"] = "pipeline_runner deployment"
    return schema


def schema_text() -> str:
    """The schema as written to ``SCHEMA_PATH``: stable key order, so diffs stay readable."""
    return json.dumps(deployment_json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write :func:`schema_text` to ``path`` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_text(), encoding="utf-8")
    return path
