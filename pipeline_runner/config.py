"""Deployment file models: what a user writes in ``deployments/*.yaml``.

These models are the single source of truth for the deployment format: the JSON Schema in
``schemas/deployment.schema.json`` is generated from them (``runner schema``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

# Names end up in NATS subjects, so no dots, spaces, wildcards or '>'.
Name = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        max_length=64,
        description=(
            "1 to 64 letters, digits, '_' or '-', starting with a letter or digit (used in NATS subjects)."
        ),
    ),
]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _located_error(
    error_type: str, message: str, *, expected: str, at: tuple[str | int, ...] = (), **ctx: Any
) -> PydanticCustomError:
    """A validation error that says precisely where it is and what was expected.

    Validators that check more than one field can only raise at their own location; ``at``
    extends it to the offending value (e.g. ``(2, "name")`` below ``operators``). ``expected``
    is the "must be ..." phrase the deployment file loader shows next to the value as written.
    """
    return PydanticCustomError(error_type, message, {"expected": expected, "at": at, **ctx})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EmbeddedNatsConfig(_Model):
    """The nats-server that ``runner deploy`` starts when no ``nats_url`` is given."""

    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless told otherwise.")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    jetstream: bool = Field(True, description="Enable JetStream on the embedded server.")


class RequestPlaneConfig(_Model):
    """How workers and clients reach NATS."""

    nats_url: str | None = Field(
        None,
        min_length=1,
        description="URL of an existing NATS server or cluster; absent starts an embedded server.",
    )
    embedded: EmbeddedNatsConfig = Field(default_factory=EmbeddedNatsConfig)
    request_timeout_s: float = Field(
        30.0, gt=0, description="Default deadline of a request, in seconds, when the caller sets none."
    )


class OperatorConfig(_Model):
    """One pipeline stage and how many worker processes serve it."""

    name: Name
    kind: Literal["python", "triton"] = Field(
        "python", description="'python' runs a Python class; 'triton' is reserved for Triton models."
    )
    implementation: str = Field(
        min_length=1,
        description=(
            "'package.module:Class', or a file path 'path/to/file.py[:Class]' relative to working_dir."
        ),
    )
    version: int = Field(1, ge=1, description="Part of the operator's subject; callers ask for a version.")
    workers: int = Field(1, ge=1, le=1024, description="Number of worker processes.")
    max_inflight_requests: int = Field(
        16, ge=1, le=100_000, description="Requests one worker serves concurrently."
    )
    max_batch_size: int = Field(
        1, ge=1, le=100_000, description="Most requests handed to one execute() call."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Free-form settings passed to the operator."
    )
    log_level: LogLevel | None = Field(None, description="Overrides the deployment's log_level.")

    @field_validator("kind")
    @classmethod
    def _kind_is_available(cls, kind: str) -> str:
        if kind == "triton":
            raise _located_error(
                "kind_reserved",
                "kind 'triton' is reserved and not available in this version; use 'python'",
                expected="must be 'python' ('triton' is reserved and not available in this version)",
            )
        return kind


class DeploymentConfig(_Model):
    """A whole deployment: its operators and its request plane."""

    name: Name
    working_dir: str = Field(
        ".",
        description=(
            "Directory operator code is imported from, relative to this file. "
            "Module implementations are imported with it on sys.path."
        ),
    )
    request_plane: RequestPlaneConfig = Field(default_factory=RequestPlaneConfig)
    log_level: LogLevel = "INFO"
    log_dir: str | None = Field(
        None, description="Directory for per-worker logs; default: the runner's state directory."
    )
    operators: list[OperatorConfig] = Field(min_length=1)

    _source: Path | None = PrivateAttr(None)

    @field_validator("operators")
    @classmethod
    def _operator_names_are_unique(cls, operators: list[OperatorConfig]) -> list[OperatorConfig]:
        first_index: dict[str, int] = {}
        for index, op in enumerate(operators):
            if op.name in first_index:
                first = first_index[op.name]
                raise _located_error(
                    "duplicate_operator_name",
                    "operator name '{name}' is used by operators[{first}] and operators[{index}]",
                    expected=f"must be unique among operators (operators[{first}] has the same name)",
                    at=(index, "name"),
                    name=op.name,
                    first=first,
                    index=index,
                )
            first_index[op.name] = index
        return operators

    @property
    def source(self) -> Path | None:
        """The file this deployment was loaded from, if any."""
        return self._source

    @property
    def root(self) -> Path:
        """``working_dir`` resolved against the deployment file's directory (or the cwd)."""
        base = self._source.parent if self._source else Path.cwd()
        return (base / self.working_dir).resolve()

    def operator(self, name: str) -> OperatorConfig:
        for op in self.operators:
            if op.name == name:
                return op
        raise KeyError(name)
