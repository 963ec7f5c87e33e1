"""A Triton model's ``config.pbtxt`` merged with the overrides of a deployment file.

Both sides are parsed into Triton's own ``ModelConfig`` protobuf message (shipped with
tritonclient), so the merge follows protobuf rules and an override with a wrong field or type
fails with the field's name, instead of producing a config Triton rejects later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from ..errors import RunnerError

ModelConfig = model_config_pb2.ModelConfig


def read_model_config(path: Path) -> ModelConfig:
    """Parse a ``config.pbtxt``; RunnerError names the file and protobuf's complaint."""
    try:
        return text_format.Parse(path.read_text(), ModelConfig())
    except OSError as exc:
        raise RunnerError(f"cannot read {path}: {exc.strerror or exc}") from None
    except text_format.ParseError as exc:
        raise RunnerError(f"{path}: {exc}") from None


def parse_overrides(overrides: dict[str, Any]) -> ModelConfig:
    """The overrides as a ModelConfig (Triton's JSON field names, e.g. ``instance_group``)."""
    try:
        return json_format.ParseDict(overrides, ModelConfig())
    except json_format.ParseError as exc:
        raise RunnerError(f"config_overrides: {exc}") from None


def merged_model_config(path: Path, overrides: dict[str, Any]) -> ModelConfig:
    """``path``'s config with ``overrides`` applied.

    A repeated field in the overrides (``instance_group``, ``input``...) replaces the file's
    list rather than being appended to it, and a map (``parameters``) is merged key by key:
    what a user writing an override means in both cases.
    """
    config = read_model_config(path)
    override = parse_overrides(overrides)
    for field, _ in override.ListFields():
        if field.label == field.LABEL_REPEATED and not _is_map(field):
            config.ClearField(field.name)
    config.MergeFrom(override)
    return config


def to_json(config: ModelConfig) -> str:
    """The JSON form Triton's model-load API accepts as a config override."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def _is_map(field: Any) -> bool:
    message = field.message_type
    return bool(message is not None and message.GetOptions().map_entry)
