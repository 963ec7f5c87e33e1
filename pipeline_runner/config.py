"""Deployment file models: what a user writes in ``deployments/*.yaml``.

These models are the single source of truth for the deployment format: the JSON Schema in
``schemas/deployment.schema.json`` is generated from them (``runner schema``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    SecretStr,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

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


def _rule_error(error_type: str, message: str, *, requirement: str, **ctx: Any) -> PydanticCustomError:
    """An error of a rule the JSON Schema cannot express.

    ``requirement`` is the "must be ..." phrase the deployment file loader shows next to the value
    as written; the loader reports these errors alongside the JSON Schema's findings.
    """
    return PydanticCustomError(error_type, message, {"requirement": requirement, **ctx})


def _error_details(exc: ValidationError) -> list[InitErrorDetails]:
    """``exc``'s errors in a form that can be raised again together with others."""
    details: list[InitErrorDetails] = []
    for error in exc.errors():
        ctx = error.get("ctx", {})
        # Built-in error types come with a documentation URL; ours must be rebuilt as custom.
        kind = error["type"] if "url" in error else PydanticCustomError(error["type"], error["msg"], ctx)
        details.append(InitErrorDetails(type=kind, loc=error["loc"], input=error["input"], ctx=ctx))
    return details


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EmbeddedNatsConfig(_Model):
    """The nats-server that ``runner deploy`` starts when no ``nats_url`` is given."""

    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless told otherwise.")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    jetstream: bool = Field(True, description="Enable JetStream on the embedded server.")
    tls_cert_file: str | None = Field(
        None, min_length=1, description="Server certificate: the embedded server then requires TLS."
    )
    tls_key_file: str | None = Field(None, min_length=1, description="Key of tls_cert_file.")
    max_procs: int | None = Field(
        None,
        ge=1,
        description=(
            "Threads the server's Go runtime runs on at once (GOMAXPROCS). Unset: half the CPUs "
            "this process may use (its CPU affinity, capped by a container's CPU limit), at least 1, "
            "since the workers share the machine; a GOMAXPROCS in the environment wins over that."
        ),
    )


class NatsAuthConfig(_Model):
    """Credentials for NATS; prefer the PIPELINE_RUNNER_NATS_* environment variables for secrets."""

    token: SecretStr | None = Field(None, description="Token (env PIPELINE_RUNNER_NATS_TOKEN).")
    user: str | None = Field(None, min_length=1, description="User (env PIPELINE_RUNNER_NATS_USER).")
    password: SecretStr | None = Field(
        None, description="Password (env PIPELINE_RUNNER_NATS_PASSWORD)."
    )
    credentials_file: str | None = Field(
        None, min_length=1, description="NATS .creds file: JWT and NKey seed (env PIPELINE_RUNNER_NATS_CREDS)."
    )
    nkey_seed_file: str | None = Field(
        None, min_length=1, description="File holding an NKey seed (env PIPELINE_RUNNER_NATS_NKEY_SEED)."
    )


class NatsTlsConfig(_Model):
    """TLS towards NATS: the CA to trust and, for mutual TLS, this side's certificate."""

    ca_file: str | None = Field(None, min_length=1, description="CA bundle (env PIPELINE_RUNNER_NATS_TLS_CA).")
    cert_file: str | None = Field(
        None, min_length=1, description="Client certificate (env PIPELINE_RUNNER_NATS_TLS_CERT)."
    )
    key_file: str | None = Field(None, min_length=1, description="Client key (env PIPELINE_RUNNER_NATS_TLS_KEY).")


class RequestPlaneConfig(_Model):
    """How workers and clients reach NATS."""

    nats_url: str | None = Field(
        None,
        min_length=1,
        description="URL of an existing NATS server or cluster; absent starts an embedded server.",
    )
    embedded: EmbeddedNatsConfig = Field(default_factory=EmbeddedNatsConfig)
    auth: NatsAuthConfig = Field(
        default_factory=NatsAuthConfig,
        description="Credentials workers and clients present; an embedded server requires them.",
    )
    tls: NatsTlsConfig = Field(default_factory=NatsTlsConfig)
    request_timeout_s: float = Field(
        30.0, gt=0, description="Default deadline of a request, in seconds, when the caller sets none."
    )


class DataPlaneConfig(_Model):
    """How tensors too large to ride inline in a NATS message move between processes."""

    inline_threshold_bytes: int = Field(
        65536,
        ge=0,
        description=(
            "Tensors up to this many bytes ride inline in NATS messages; larger ones stay with "
            "their producer and are fetched over UCX."
        ),
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Interface the UCX data plane listens on; use a routable address across hosts.",
    )
    fetch_timeout_s: float = Field(
        30.0, gt=0, description="Longest a consumer waits for one tensor fetch."
    )
    parallel_fetches: int = Field(
        2,
        ge=1,
        le=1024,
        description=(
            "Fetches of 1 MiB and more into host memory that one process runs at once; the "
            "others wait their turn (in arrival order, within their deadline)."
        ),
    )


class BatchingConfig(_Model):
    """Dynamic batching: requests arriving close together run in one ``execute`` call."""

    max_batch_size: int = Field(
        ..., ge=1, le=100_000, description="Most requests handed to one execute() call; a full batch runs at once."
    )
    max_wait_ms: float = Field(
        ...,
        ge=0,
        le=60_000,
        description=(
            "Longest a batch waits for more requests after its first one arrived; a request "
            "whose deadline is closer than this closes its batch at once. 0: take only what is "
            "already waiting."
        ),
    )


class DeliveryConfig(_Model):
    """What happens to a request when the worker holding it dies."""

    mode: Literal["at_least_once", "at_most_once"] = Field(
        "at_least_once",
        description=(
            "'at_least_once': requests wait in a JetStream work queue until a worker has sent "
            "their final response, and go to another worker when one dies (needs JetStream). "
            "'at_most_once': plain NATS request/reply; a request held by a worker that dies ends "
            "in a timeout error."
        ),
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description=(
            "Workers a request may be handed to in all; when that many died holding it, the "
            "caller gets a 'worker_lost' error."
        ),
    )
    idempotent: bool = Field(
        True,
        description=(
            "false: never run a request twice; when its worker dies the caller gets a "
            "'worker_lost' error instead of a second attempt."
        ),
    )
    redeliver_after_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description=(
            "A worker not heard from for this long is taken for dead and its requests go to "
            "another (JetStream ack_wait); live workers send progress every third of it."
        ),
    )
    storage: Literal["memory", "file"] = Field(
        "memory",
        description="Where the work queue keeps waiting requests; 'file' survives a nats-server restart.",
    )
    replicas: int = Field(
        1,
        ge=1,
        le=5,
        description=(
            "Copies of the work queue kept by a NATS cluster (JetStream num_replicas); 3 keeps "
            "waiting requests through the loss of one of three cluster members."
        ),
    )


class ResourcesConfig(_Model):
    """What one worker of an operator needs; ``runner k8s`` turns it into container requests."""

    cpu: str | None = Field(
        None,
        pattern=r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$",
        description="CPU per worker, as Kubernetes writes it: '2', '0.5' or '500m'.",
    )
    memory: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="Memory per worker, as Kubernetes writes it: '512Mi', '4Gi'.",
    )


# Open Inference Protocol v2 tensor datatypes (KServe / Triton HTTP/REST).
TensorDatatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class TensorSpec(_Model):
    """One tensor an operator takes or gives, as the Open Inference Protocol's metadata lists it."""

    name: str = Field(min_length=1, max_length=256, description="The input's or output's name.")
    datatype: TensorDatatype = Field(description="Open Inference Protocol datatype, e.g. INT32, FP32, BYTES.")
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        description="Dimensions; -1 for a dimension of any size, e.g. [-1] for a vector of any length."
    )


class HttpAuthConfig(_Model):
    """Bearer-token auth of the HTTP front door; the token never appears in the file itself."""

    token_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the token, e.g. PIPELINE_RUNNER_HTTP_TOKEN.",
    )
    token_file: str | None = Field(
        None, min_length=1, description="File holding the token (relative to working_dir)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> HttpAuthConfig:
        if (self.token_env is None) == (self.token_file is None):
            raise _rule_error(
                "token_source",
                "set exactly one of token_env and token_file",
                requirement="must set exactly one of token_env and token_file",
            )
        return self


_ROUTE_PATH = re.compile(r"^/[A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*$")


class HttpConfig(_Model):
    """The HTTP front door: Open Inference Protocol v2, JSON and streaming endpoints."""

    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    workers: int = Field(1, ge=1, le=256, description="Ingress processes sharing the port.")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest request body accepted; larger ones get 413."
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline of an HTTP request; a client may set a shorter one (header X-Request-Timeout).",
    )
    auth: HttpAuthConfig | None = Field(
        None, description="Bearer-token auth: requests without the token get 401 (health endpoints excepted)."
    )
    expose: list[Name] | None = Field(
        None, min_length=1, description="Operators reachable over HTTP; default: every operator."
    )
    routes: dict[str, Name] = Field(
        default_factory=dict,
        description="Extra JSON endpoints: path -> operator, e.g. {/generate: frontend}; POST /{operator} always works.",
    )


class MetricsConfig(_Model):
    """Prometheus metrics: one ``/metrics`` endpoint per deployment process, summing its workers'."""

    enabled: bool = Field(True, description="Serve Prometheus metrics (runner deploy prints the URL).")
    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind; loopback unless told otherwise.")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one (printed, and in runner status).")
class TracingConfig(_Model):
    """OpenTelemetry traces of every request across its hops; the OTEL_* environment variables also turn them on."""

    enabled: bool = Field(False, description="Export spans (off: tracing costs nothing).")
    exporter: Literal["otlp", "console", "file"] = Field(
        "otlp",
        description=(
            "Where spans go: an OTLP collector (OTEL_EXPORTER_OTLP_ENDPOINT, default localhost:4318; "
            "needs the [otlp] extra), the process's output, or JSON lines appended to `file`."
        ),
    )
    file: str | None = Field(
        None, min_length=1, description="JSON-lines span file of the file exporter, relative to working_dir."
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of new traces recorded; downstream hops follow the caller."
    )

    @model_validator(mode="after")
    def _file_exporter_needs_a_file(self) -> TracingConfig:
        if self.exporter == "file" and self.file is None:
            raise ValueError("exporter 'file' needs `file` (the JSON-lines file spans are appended to)")
        return self

    def with_file_under(self, root: Path) -> TracingConfig:
        """This section with ``file`` resolved against ``root`` (what other processes are told)."""
        if self.file is None:
            return self
        return self.model_copy(update={"file": str((root / self.file).resolve())})


class OperatorConfig(_Model):
    """One pipeline stage and how many worker processes serve it."""

    name: Name
    kind: Literal["python", "triton"] = Field(
        "python",
        description="'python' runs a Python class; 'triton' runs a model of a Triton model repository.",
    )
    implementation: str | None = Field(
        None,
        min_length=1,
        description=(
            "kind python: 'package.module:Class', or a file path 'path/to/file.py[:Class]' "
            "relative to working_dir."
        ),
    )
    repository: str | None = Field(
        None,
        min_length=1,
        description="kind triton: the Triton model repository directory, relative to working_dir.",
    )
    model: str | None = Field(
        None, min_length=1, description="kind triton: the model's name in the repository; default: the operator's name."
    )
    model_version: int | None = Field(
        None, ge=1, description="kind triton: the model version to call; default: Triton's choice (the latest)."
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "kind triton: fields merged into the model's config.pbtxt when it is loaded, in "
            "Triton's JSON form, e.g. {instance_group: [{count: 2, kind: KIND_CPU}]}, "
            "parameters, dynamic_batching. A list replaces the file's list; parameters merge by key."
        ),
    )
    version: int = Field(1, ge=1, description="Part of the operator's subject; callers ask for a version.")
    workers: int = Field(1, ge=1, description="Number of worker processes.")
    max_inflight_requests: int = Field(
        16, ge=1, le=100_000, description="Requests one worker serves concurrently."
    )
    max_queued_requests: int = Field(
        1024,
        ge=0,
        description=(
            "Requests one worker holds waiting beyond max_inflight_requests; more are refused "
            "at once with an 'overloaded' error, so memory stays bounded."
        ),
    )
    max_batch_size: int = Field(
        1,
        ge=1,
        le=100_000,
        description=(
            "Most requests handed to one execute() call, taking only those already waiting "
            "(the same as batching: {max_batch_size: N, max_wait_ms: 0})."
        ),
    )
    batching: BatchingConfig | None = Field(
        None,
        description=(
            "kind python: dynamic batching, e.g. {max_batch_size: 32, max_wait_ms: 5}: a batch "
            "runs when full or when its first request has waited max_wait_ms."
        ),
    )
    max_request_bytes: int | None = Field(
        None,
        ge=1,
        description=(
            "Most bytes of tensors one request may declare; a larger one is refused with a "
            "'too_large' error before anything is fetched. Default: 1 GiB, or an eighth of the "
            "worker host's memory where that is less."
        ),
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Free-form settings passed to the operator."
    )
    delivery: DeliveryConfig = Field(
        default_factory=DeliveryConfig,
        description="Delivery guarantee: redelivery when a worker dies (default) or at most once.",
    )
    device: Literal["cpu", "gpu", "auto"] = Field(
        "cpu",
        description=(
            "Where the operator's arrays live: 'cpu' (NumPy), 'gpu' (CuPy; deploying fails where "
            "no GPU is found) or 'auto' (a GPU when CuPy finds one, else the CPU)."
        ),
    )
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description=(
            "device gpu/auto: the GPU numbers the workers take round-robin, one GPU per worker "
            "(worker i gets gpus[i % len(gpus)]), numbered as CUDA does in the deploying process "
            "(after its CUDA_VISIBLE_DEVICES); default: every visible GPU."
        ),
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="CPU and memory per worker (Kubernetes requests); a GPU worker also asks for one GPU.",
    )
    log_level: LogLevel | None = Field(None, description="Overrides the deployment's log_level.")
    inputs: list[TensorSpec] | None = Field(
        None, description="Tensors the operator takes, for Open Inference Protocol metadata (GET /v2/models/NAME)."
    )
    outputs: list[TensorSpec] | None = Field(
        None, description="Tensors the operator gives, for Open Inference Protocol metadata."
    )

    @model_validator(mode="wrap")
    @classmethod
    def _fields_of_its_kind(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> OperatorConfig:
        # Wraps the fields' own validation so that a missing or misplaced key is reported
        # together with whatever else is wrong with the operator.
        details = _kind_problems(data) + _device_problems(data) + _batching_problems(data)
        if not details:
            validated: OperatorConfig = handler(data)
            return validated
        try:
            handler(data)
        except ValidationError as exc:
            details = _error_details(exc) + details
        raise ValidationError.from_exception_data(cls.__name__, details)


    @property
    def batch_policy(self) -> BatchingConfig:
        """How this operator's requests are batched (``max_batch_size`` alone waits for none)."""
        return self.batching or BatchingConfig(max_batch_size=self.max_batch_size, max_wait_ms=0)


_KIND_KEYS = {
    "python": ("implementation", "batching"),
    "triton": ("repository", "model", "model_version", "config_overrides"),
}
_KIND_NEEDS = {"python": "implementation", "triton": "repository"}


def _kind_problems(op: Any) -> list[InitErrorDetails]:
    """Errors for an operator (as written) lacking its kind's key or using the other kind's."""
    if not isinstance(op, dict) or op.get("kind", "python") not in _KIND_NEEDS:
        return []
    kind = op.get("kind", "python")
    details = []
    needed = _KIND_NEEDS[kind]
    # A key set to its empty default counts as absent (that is how a model dumps it).
    if op.get(needed) is None:
        error = _rule_error(
            "missing_key",
            "missing required key {key!r}",
            requirement=f"missing required key {needed!r} (kind {kind!r} needs it)",
            key=needed,
        )
        details.append(InitErrorDetails(type=error, loc=(needed,), input=None))
    for other, keys in _KIND_KEYS.items():
        for key in keys if other != kind else ():
            if op.get(key) not in (None, {}):
                error = _rule_error(
                    "foreign_key",
                    "key {key!r} is not used by kind {kind!r}",
                    requirement=f"must not be set for kind {kind!r} (it belongs to kind {other!r})",
                    key=key,
                    kind=kind,
                )
                details.append(InitErrorDetails(type=error, loc=(key,), input=op[key]))
    return details


def _device_problems(op: Any) -> list[InitErrorDetails]:
    """An error for ``gpus`` on an operator (as written) that runs on the CPU."""
    if not isinstance(op, dict) or op.get("device", "cpu") != "cpu" or op.get("gpus") is None:
        return []
    error = _rule_error(
        "gpus_on_cpu",
        "gpus is set but device is 'cpu'",
        requirement="must not be set for device 'cpu' (set device: gpu or auto to use GPUs)",
    )
    return [InitErrorDetails(type=error, loc=("gpus",), input=op["gpus"])]


def _batching_problems(op: Any) -> list[InitErrorDetails]:
    """Errors for ``batching`` (as written) next to ``max_batch_size``, or beyond the worker's slots."""
    if not isinstance(op, dict) or not isinstance(op.get("batching"), dict):
        return []
    details = []
    if op.get("max_batch_size") not in (None, 1):
        error = _rule_error(
            "batch_size_twice",
            "both max_batch_size and batching are set",
            requirement="must not be set together with max_batch_size (move it to batching.max_batch_size)",
        )
        details.append(InitErrorDetails(type=error, loc=("batching",), input=op["batching"]))
    size, inflight = op["batching"].get("max_batch_size"), op.get("max_inflight_requests", 16)
    if isinstance(size, int) and isinstance(inflight, int) and size > inflight:
        error = _rule_error(
            "batch_beyond_inflight",
            "batching.max_batch_size {size} exceeds max_inflight_requests {inflight}",
            requirement=(
                f"must be at most max_inflight_requests ({inflight}): each request of a batch takes "
                "one of the worker's slots (raise max_inflight_requests)"
            ),
            size=size,
            inflight=inflight,
        )
        details.append(InitErrorDetails(type=error, loc=("batching", "max_batch_size"), input=size))
    return details


def _duplicate_names(operators: Any) -> list[InitErrorDetails]:
    """An error for each operator (dict or model) named like an earlier one."""
    if not isinstance(operators, list):
        return []
    first_index: dict[str, int] = {}
    duplicates: list[InitErrorDetails] = []
    for index, op in enumerate(operators):
        name = op.get("name") if isinstance(op, dict) else getattr(op, "name", None)
        if not isinstance(name, str):
            continue
        if name not in first_index:
            first_index[name] = index
            continue
        first = first_index[name]
        error = _rule_error(
            "duplicate_operator_name",
            "operator name '{name}' is already used by operators[{first}]",
            requirement=f"must be unique among operators (operators[{first}] has the same name)",
            name=name,
            first=first,
        )
        duplicates.append(InitErrorDetails(type=error, loc=(index, "name"), input=name))
    return duplicates


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
    data_plane: DataPlaneConfig = Field(default_factory=DataPlaneConfig)
    log_level: LogLevel = "INFO"
    log_dir: str | None = Field(
        None, description="Directory for per-worker logs; default: the runner's state directory."
    )
    operators: list[OperatorConfig] = Field(min_length=1)
    http: HttpConfig | None = Field(
        None, description="Serve the pipeline over HTTP (Open Inference Protocol v2, JSON, streaming); absent: no HTTP."
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Prometheus metrics of the workers, the HTTP front door and the deployment."
    )
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    _source: Path | None = PrivateAttr(None)

    @field_validator("operators", mode="wrap")
    @classmethod
    def _operator_names_are_unique(
        cls, operators: Any, handler: ValidatorFunctionWrapHandler
    ) -> list[OperatorConfig]:
        # Wraps the list's own validation so that a duplicate is reported at the duplicate's
        # name, together with whatever else is wrong with the operators.
        duplicates = _duplicate_names(operators)
        if not duplicates:
            validated: list[OperatorConfig] = handler(operators)
            return validated
        details: list[InitErrorDetails] = []
        try:
            handler(operators)
        except ValidationError as exc:
            details = _error_details(exc)
        raise ValidationError.from_exception_data(cls.__name__, details + duplicates)

    @model_validator(mode="after")
    def _jetstream_for_guaranteed_delivery(self) -> DeploymentConfig:
        embedded = self.request_plane.embedded
        if self.request_plane.nats_url is not None or embedded.jetstream:
            return self
        needing = [op.name for op in self.operators if op.delivery.mode == "at_least_once"]
        if not needing:
            return self
        error = _rule_error(
            "jetstream_needed",
            "operators {needing} use delivery.mode 'at_least_once', which needs JetStream",
            requirement=(
                f"must be true: operators {', '.join(needing)} use delivery.mode 'at_least_once', "
                "which needs JetStream (or set their delivery.mode to 'at_most_once')"
            ),
            needing=", ".join(needing),
        )
        details = [InitErrorDetails(type=error, loc=("request_plane", "embedded", "jetstream"), input=False)]
        raise ValidationError.from_exception_data(type(self).__name__, details)

    @model_validator(mode="after")
    def _http_names_operators(self) -> DeploymentConfig:
        if self.http is None:
            return self
        names = [op.name for op in self.operators]
        known = ", ".join(names)
        details: list[InitErrorDetails] = []
        for index, name in enumerate(self.http.expose or []):
            if name not in names:
                error = _rule_error(
                    "unknown_operator",
                    "no operator {name!r}",
                    requirement=f"must name an operator of this deployment ({known})",
                    name=name,
                )
                details.append(InitErrorDetails(type=error, loc=("http", "expose", index), input=name))
        exposed = [name for name in self.http.expose or names if name in names]
        for path, name in self.http.routes.items():
            if not _ROUTE_PATH.match(path) or len(path) > 256:
                error = _rule_error(
                    "route_path",
                    "path {path!r} is not a URL path",
                    requirement=(
                        f"{path!r} must be a URL path like /generate: '/' and segments of letters, "
                        "digits, '_', '-', '.' or '~'"
                    ),
                    path=path,
                )
                details.append(InitErrorDetails(type=error, loc=("http", "routes", path), input=name))
            elif path == "/v2" or path.startswith("/v2/"):
                error = _rule_error(
                    "reserved_path",
                    "path {path!r} is reserved",
                    requirement="must not start with /v2 (the Open Inference Protocol's paths)",
                    path=path,
                )
                details.append(InitErrorDetails(type=error, loc=("http", "routes", path), input=name))
            elif name not in exposed:
                error = _rule_error(
                    "unknown_operator",
                    "no exposed operator {name!r}",
                    requirement=f"must name an exposed operator ({', '.join(exposed)})",
                    name=name,
                )
                details.append(InitErrorDetails(type=error, loc=("http", "routes", path), input=name))
        if details:
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self

    def exposed_operators(self) -> list[OperatorConfig]:
        """The operators the HTTP front door serves (none without an ``http`` section)."""
        if self.http is None:
            return []
        names = self.http.expose
        return [op for op in self.operators if names is None or op.name in names]

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
