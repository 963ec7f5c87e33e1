"""Kubernetes manifests for a deployment file (``runner k8s``).

The same deployment YAML that ``runner deploy`` runs on one host becomes plain Kubernetes
objects, built here as dicts (never string templates) and written as YAML:

- **NATS** (unless the file or ``--nats`` names one): a ConfigMap with the nats-server config, a
  headless Service for the cluster routes, a client Service on 4222, a StatefulSet of
  nats-server with JetStream on a volume per member, and a PodDisruptionBudget that keeps a
  quorum up during node drains.
- **One Deployment per operator**, ``replicas`` = the operator's ``workers``. Each pod runs one
  worker: ``runner deploy FILE --only OP --workers 1`` from the runner image, with HTTP
  liveness (``/healthz``) and readiness (``/readyz``) probes.
- **The HTTP front door** (files with ``http:``): a Deployment of ingress pods
  (``runner deploy FILE --http-only``) probed on ``/v2/health/live`` and ``/v2/health/ready``,
  and a Service on the file's ``http.port``.

Secrets never appear in the output: NATS credentials come from a Secret named by the caller
(``--nats-secret``), whose keys are the ``PIPELINE_RUNNER_NATS_*`` variables the runner reads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import DeploymentConfig, OperatorConfig
from .errors import ConfigError, RunnerError
from .nats_security import ENV_PREFIX

Manifest = dict[str, Any]
NatsAuth = Literal["none", "token", "user"]

# The tags containers/build.sh gives its cpu and gpu variants.
DEFAULT_IMAGE = "pipeline-runner:cpu"
DEFAULT_GPU_IMAGE = "pipeline-runner:gpu"
DEFAULT_NATS_IMAGE = "nats:2.10-alpine"
DEFAULT_NATS_REPLICAS = 3
DEFAULT_NATS_STORAGE = "10Gi"
#: Where the image holds the repository (containers/build.sh: WORKDIR /app).
IMAGE_ROOT = "/app"
HEALTH_PORT = 8080
#: The ingress's port when the file says 0 (a free port makes no sense behind a Service).
HTTP_PORT = 8000
#: The pods' Prometheus /metrics port where the file leaves metrics.port at 0 (any free port).
METRICS_PORT = 9464
#: Component label and name suffix of the HTTP ingress (operator components are their names).
INGRESS_COMPONENT = "http-ingress"
NATS_CLIENT_PORT = 4222
NATS_CLUSTER_PORT = 6222
NATS_MONITOR_PORT = 8222
#: `runner deploy` drains in about 30 s; Kubernetes kills the pod when this runs out.
WORKER_GRACE_S = 60
#: nats-server's lame-duck mode (30 s) moves clients off before it exits.
NATS_GRACE_S = 60
STATE_DIR = "/tmp/pipeline_runner"
GPU_RESOURCE = "nvidia.com/gpu"
ANNOTATION_PREFIX = "pipeline-runner/"
TOKEN_ENV = ENV_PREFIX + "TOKEN"
USER_ENV = ENV_PREFIX + "USER"
PASSWORD_ENV = ENV_PREFIX + "PASSWORD"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
# A StatefulSet's pods carry the label controller-revision-hash: <name>-<10 characters>, and a
# label value has at most 63 characters.
_STATEFULSET_NAME_MAX = 52
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# The worker image's Python waits for the NATS client Service to accept connections, so that
# workers do not crash-loop (and back off for minutes) while the cluster is still starting.
_WAIT_FOR_TCP = (
    "import socket, sys, time\n"
    "host, port = sys.argv[1], int(sys.argv[2])\n"
    "while True:\n"
    "    try:\n"
    "        socket.create_connection((host, port), timeout=2).close()\n"
    "        break\n"
    "    except OSError as exc:\n"
    "        print(f'waiting for {host}:{port}: {exc}', flush=True)\n"
    "        time.sleep(2)\n"
)


@dataclass(frozen=True)
class K8sOptions:
    """How ``runner k8s`` renders a deployment; the defaults are the command line's."""

    #: The runner image (containers/build.sh) of every worker; None: DEFAULT_IMAGE, or for
    #: ``device: gpu`` operators the gpu variant.
    image: str | None = None
    #: The image of ``device: gpu`` operators; None: ``image`` if given, else DEFAULT_GPU_IMAGE.
    gpu_image: str | None = None
    #: The deployment file's path inside the image; None: ``/app/<path in the repository>``.
    file_in_image: str | None = None
    #: Namespace written into every object; None: kubectl's current one.
    namespace: str | None = None
    #: An existing NATS for the workers (overrides the file's ``request_plane.nats_url``).
    nats_url: str | None = None
    nats_replicas: int = DEFAULT_NATS_REPLICAS
    nats_image: str = DEFAULT_NATS_IMAGE
    #: JetStream volume per NATS member (a Kubernetes quantity).
    nats_storage: str = DEFAULT_NATS_STORAGE
    nats_storage_class: str | None = None
    #: Secret holding PIPELINE_RUNNER_NATS_TOKEN / _USER / _PASSWORD.
    nats_secret: str | None = None
    #: imagePullPolicy of the worker containers; None: Kubernetes' default.
    image_pull_policy: str | None = None


@dataclass(frozen=True)
class _Names:
    """Every Kubernetes name of one deployment, computed (and checked) once."""

    deployment: str
    part_of: str
    nats: str
    nats_headless: str
    nats_config: str
    operators: dict[str, str]  # operator name -> its Deployment's name
    components: dict[str, str]  # operator name -> its component label


def k8s_name(*parts: str, limit: int = 63) -> str:
    """``parts`` joined by '-' as a DNS-1123 label: lower case, '_' as '-', at most ``limit``.

    A name too long is cut and ends in 8 characters of a hash of the whole, so that two long
    names sharing a prefix stay distinct.
    """
    whole = "-".join(parts)
    name = whole.lower().replace("_", "-").strip("-")
    if len(name) > limit:
        digest = hashlib.sha256(whole.encode()).hexdigest()[:8]
        name = f"{name[: limit - 9].rstrip('-')}-{digest}"
    if not _DNS_LABEL.match(name):
        raise RunnerError(f"cannot make a Kubernetes name of {whole!r} (got {name!r})")
    return name


def is_dns_label(text: str) -> bool:
    """Whether ``text`` is a valid DNS-1123 label (a namespace, Service or Secret name)."""
    return len(text) <= 63 and bool(_DNS_LABEL.match(text))


def label_value(text: str) -> str:
    """``text`` itself when Kubernetes accepts it as a label value, else its :func:`k8s_name`."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    return k8s_name(text)


def file_in_image(source: Path) -> str:
    """Where the deployment file ``source`` lies in the image: /app/<path in its repository>.

    The repository is the nearest directory above the file holding ``pyproject.toml`` or
    ``.git``, which is what containers/build.sh copies to /app.
    """
    path = source.resolve()
    for parent in path.parents:
        if (parent / "pyproject.toml").is_file() or (parent / ".git").exists():
            return f"{IMAGE_ROOT}/{path.relative_to(parent).as_posix()}"
    raise RunnerError(
        f"{source}: not inside a repository (no pyproject.toml or .git above it): "
        "give its path inside the image with --file-in-image"
    )


def nats_auth(config: DeploymentConfig, options: K8sOptions) -> NatsAuth:
    """How the generated NATS cluster authenticates clients, read from the file's auth.

    A token or a user in ``request_plane.auth`` asks for that method, as it does of the
    embedded server. Without either, a ``--nats-secret`` means a token (the Secret's
    PIPELINE_RUNNER_NATS_TOKEN): handing over a Secret should never leave the cluster open.
    """
    auth = config.request_plane.auth
    if auth.token is not None:
        return "token"
    if auth.user is not None:
        return "user"
    return "token" if options.nats_secret else "none"


def portability_warnings(config: DeploymentConfig) -> list[str]:
    """Settings that work on one host but not as written in a Kubernetes pod."""
    found = []
    if Path(config.working_dir).is_absolute():
        found.append(f"working_dir {config.working_dir!r} is absolute: the image has the repository at {IMAGE_ROOT}")
    if config.log_dir is not None and Path(config.log_dir).is_absolute():
        found.append(f"log_dir {config.log_dir!r} is absolute: it must exist and be writable in the image")
    for op in config.operators:
        if op.gpus is not None:
            found.append(
                f"operator {op.name!r}: gpus {op.gpus} numbers the GPUs of a host, but each pod "
                "sees only the GPU Kubernetes gave it, as number 0: remove gpus for Kubernetes"
            )
        if op.device == "auto":
            found.append(
                f"operator {op.name!r}: device 'auto' requests no GPU from Kubernetes, so it runs "
                "on the CPU; use device 'gpu' to get one"
            )
    return found


def manifests(config: DeploymentConfig, options: K8sOptions | None = None) -> list[Manifest]:
    """The Kubernetes objects that run ``config``, in the order to apply them.

    Raises :class:`ConfigError` for what the file asks that cannot be rendered (names that
    collide once made DNS names, credentials or TLS the generated NATS cannot take) and
    :class:`RunnerError` for bad options.
    """
    options = options or K8sOptions()
    _check_options(options)
    source = _shown(config.source) if config.source else config.name
    names = _names(config, source)
    nats_url = options.nats_url or config.request_plane.nats_url
    objects: list[Manifest] = []
    if nats_url is None:
        _check_generated_nats(config, options, source)
        objects += nats_manifests(config, options, names)
        nats_url = f"nats://{names.nats}:{NATS_CLIENT_PORT}"
        wait_for = names.nats
    else:
        wait_for = None
    path = options.file_in_image
    if path is None:
        if config.source is None:
            raise RunnerError("the deployment has no source file: give its path inside the image (file_in_image)")
        path = file_in_image(config.source)
    for op in config.operators:
        objects.append(operator_deployment(config, op, options, names, path, nats_url, wait_for))
    if config.http is not None:
        objects += ingress_manifests(config, options, names, path, nats_url, wait_for)
    if options.namespace is not None:
        for obj in objects:
            metadata = obj["metadata"]
            obj["metadata"] = {"name": metadata.pop("name"), "namespace": options.namespace, **metadata}
    return objects


def nats_manifests(config: DeploymentConfig, options: K8sOptions, names: _Names) -> list[Manifest]:
    """ConfigMap, headless and client Services, StatefulSet and PodDisruptionBudget of NATS."""
    labels = _labels(names, "nats", "request-plane")
    selector = _selector(labels)
    conf = nats_server_config(config, options, names)
    ports = [
        {"name": "client", "port": NATS_CLIENT_PORT, "targetPort": "client"},
        {"name": "cluster", "port": NATS_CLUSTER_PORT, "targetPort": "cluster"},
        {"name": "monitor", "port": NATS_MONITOR_PORT, "targetPort": "monitor"},
    ]
    objects: list[Manifest] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(names.nats_config, labels),
            "data": {"nats.conf": conf},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(names.nats_headless, labels),
            "spec": {
                "clusterIP": "None",
                # Members must resolve each other to form the cluster, before any is ready.
                "publishNotReadyAddresses": True,
                "selector": selector,
                "ports": ports,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(names.nats, labels),
            "spec": {
                "selector": selector,
                "ports": [{"name": "client", "port": NATS_CLIENT_PORT, "targetPort": "client"}],
            },
        },
        nats_statefulset(config, options, names, labels, conf),
    ]
    if options.nats_replicas > 1:
        objects.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": _metadata(names.nats, labels),
                # JetStream needs a majority of the members: voluntary evictions take one at a time.
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
            }
        )
    return objects


def nats_routes(names: _Names, replicas: int) -> list[str]:
    """The cluster route of every member: its stable name under the headless Service."""
    return [f"nats://{names.nats}-{i}.{names.nats_headless}:{NATS_CLUSTER_PORT}" for i in range(replicas)]


def nats_server_config(config: DeploymentConfig, options: K8sOptions, names: _Names) -> str:
    """nats-server configuration of every member; secrets only as $VARIABLES from the Secret.

    nats-server resolves ``$NAME`` from the environment and refuses to start when it is unset,
    so a missing Secret key stops the server rather than leaving it open.
    """
    lines = [
        f"# nats-server of deployment {config.name}, written by runner k8s",
        "server_name: $POD_NAME",
        f"port: {NATS_CLIENT_PORT}",
        f"http_port: {NATS_MONITOR_PORT}",
        "pid_file: /var/run/nats.pid",
        # In lame-duck mode (preStop) the server sends its clients to the other members first.
        "lame_duck_grace_period: 10s",
        "lame_duck_duration: 30s",
        "jetstream {",
        "  store_dir: /data",
        "}",
    ]
    if options.nats_replicas > 1:
        lines += [
            "cluster {",
            f"  name: {names.nats}",
            f"  port: {NATS_CLUSTER_PORT}",
            # Clients reach members through the Service, not through pod addresses gossiped to them.
            "  no_advertise: true",
            "  routes: [",
            *(f"    {route}" for route in nats_routes(names, options.nats_replicas)),
            "  ]",
            "}",
        ]
    mode = nats_auth(config, options)
    if mode == "token":
        lines += ["authorization {", f"  token: ${TOKEN_ENV}", "}"]
    elif mode == "user":
        user = config.request_plane.auth.user
        lines += ["authorization {", f"  user: {_quoted(user or '')}", f"  password: ${PASSWORD_ENV}", "}"]
    return "\n".join(lines) + "\n"


def nats_statefulset(
    config: DeploymentConfig, options: K8sOptions, names: _Names, labels: dict[str, str], conf: str
) -> Manifest:
    """The nats-server members, each with its own JetStream volume."""
    env: list[dict[str, Any]] = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    mode = nats_auth(config, options)
    if options.nats_secret is not None and mode != "none":
        # Required (not optional): without its secret the server must not start.
        key = TOKEN_ENV if mode == "token" else PASSWORD_ENV
        env.append(_secret_env(options.nats_secret, key, optional=False))
    probe = {"timeoutSeconds": 5, "successThreshold": 1}
    container: dict[str, Any] = {
        "name": "nats",
        "image": options.nats_image,
        "args": ["--config", "/etc/nats-config/nats.conf"],
        "ports": [
            {"name": "client", "containerPort": NATS_CLIENT_PORT},
            {"name": "cluster", "containerPort": NATS_CLUSTER_PORT},
            {"name": "monitor", "containerPort": NATS_MONITOR_PORT},
        ],
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/nats-config"},
            {"name": "data", "mountPath": "/data"},
        ],
        "lifecycle": {"preStop": {"exec": {"command": ["nats-server", "-sl=ldm=/var/run/nats.pid"]}}},
        # The probes of the official NATS Helm chart: a server recovering JetStream may take long to
        # start; once up it is alive while JetStream is enabled and ready once it serves.
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "monitor"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 90, **probe,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"},
            "initialDelaySeconds": 10, "periodSeconds": 30, "failureThreshold": 3, **probe,
        },
        "readinessProbe": {
            "httpGet": {"path": "/healthz?js-server-only=true", "port": "monitor"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 3, **probe,
        },
    }  # fmt: skip
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": options.nats_storage}},
    }
    if options.nats_storage_class is not None:
        claim["storageClassName"] = options.nats_storage_class
    config_hash = hashlib.sha256(conf.encode()).hexdigest()[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(names.nats, labels),
        "spec": {
            "serviceName": names.nats_headless,
            "replicas": options.nats_replicas,
            # All members start together: a JetStream cluster forms only once a majority is up.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": _selector(labels)},
            "template": {
                # A changed config rolls the members (a ConfigMap change alone does not).
                "metadata": {"labels": labels, "annotations": {ANNOTATION_PREFIX + "config-sha256": config_hash}},
                "spec": {
                    "terminationGracePeriodSeconds": NATS_GRACE_S,
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": names.nats_config}}],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }


def operator_image(op: OperatorConfig, options: K8sOptions) -> str:
    """The image of ``op``'s workers: the gpu variant (CuPy, CUDA libraries) for ``device: gpu``.

    ``device: auto`` gets no GPU from Kubernetes, so the cpu variant serves it.
    """
    if op.device == "gpu":
        return options.gpu_image or options.image or DEFAULT_GPU_IMAGE
    return options.image or DEFAULT_IMAGE


def metrics_port(config: DeploymentConfig) -> int | None:
    """The pods' /metrics port (None: metrics are off)."""
    return (config.metrics.port or METRICS_PORT) if config.metrics.enabled else None


def metrics_args(config: DeploymentConfig) -> list[str]:
    """``runner deploy`` arguments serving /metrics where Prometheus reaches the pod."""
    port = metrics_port(config)
    return [] if port is None else ["--metrics-host", "0.0.0.0", "--metrics-port", str(port)]


def scrape_annotations(config: DeploymentConfig) -> dict[str, str]:
    """The ``prometheus.io/*`` pod annotations Prometheus' Kubernetes discovery commonly keys on."""
    port = metrics_port(config)
    if port is None:
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def metrics_container_ports(config: DeploymentConfig) -> list[dict[str, Any]]:
    """The named ``metrics`` port (what a PodMonitor or ServiceMonitor selects)."""
    port = metrics_port(config)
    return [] if port is None else [{"name": "metrics", "containerPort": port}]


def worker_args(
    path: str, nats_url: str | None, operator: str, health_port: int = HEALTH_PORT
) -> list[str]:
    """The arguments of the image's ``runner`` for one worker of ``operator`` (None: the file's
    NATS URL)."""
    args = ["deploy", path]
    if nats_url is not None:
        args += ["--nats", nats_url]
    args += [
        "--only", operator,
        "--workers", "1",
        # Other pods fetch this worker's large tensors: listen on the pod's interfaces.
        "--data-plane-host", "0.0.0.0",
        "--health-port", str(health_port),
        "--health-host", "0.0.0.0",
        # Worker logs on the container's output, where `kubectl logs` finds them.
        "--log-dir", "-",
    ]  # fmt: skip
    return args


def operator_resources(op: OperatorConfig) -> dict[str, dict[str, str]]:
    """Container resources of one worker of ``op``.

    CPU and memory are requests; memory is also the limit, since a worker past its memory is
    better restarted than left to push its node into swapping or OOM-killing others. CPU has no
    limit: throttling adds latency while idle cores could serve. ``device: gpu`` asks for one
    GPU (a limit, as Kubernetes wants extended resources).
    """
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if op.resources.cpu is not None:
        requests["cpu"] = op.resources.cpu
    if op.resources.memory is not None:
        requests["memory"] = limits["memory"] = op.resources.memory
    if op.device == "gpu":
        limits[GPU_RESOURCE] = "1"
    resources: dict[str, dict[str, str]] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def operator_deployment(
    config: DeploymentConfig,
    op: OperatorConfig,
    options: K8sOptions,
    names: _Names,
    path: str,
    nats_url: str,
    wait_for: str | None,
) -> Manifest:
    """The Deployment of ``op``: ``workers`` pods of one worker each."""
    labels = _labels(names, "pipeline-runner", names.components[op.name])
    annotations = {
        ANNOTATION_PREFIX + "deployment": config.name,
        ANNOTATION_PREFIX + "operator": op.name,
        ANNOTATION_PREFIX + "device": op.device,
    }
    # A URL with credentials in it stays out of the manifests: the file in the image has it.
    args = worker_args(path, None if "@" in nats_url else nats_url, op.name) + metrics_args(config)
    image = operator_image(op, options)
    env: list[dict[str, Any]] = [{"name": "PIPELINE_RUNNER_STATE_DIR", "value": STATE_DIR}]
    if options.nats_secret is not None:
        # Optional: the Secret holds the keys of one method; the runner reads whichever exist.
        env += [_secret_env(options.nats_secret, key, optional=True) for key in (TOKEN_ENV, USER_ENV, PASSWORD_ENV)]
    health = {"port": "health"}
    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        # Arguments, not a command: the image's entrypoint `tini -- runner` stays, and tini as
        # PID 1 forwards SIGTERM and reaps what the worker and its Triton server leave behind.
        "args": args,
        "env": env,
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}, *metrics_container_ports(config)],
        # /healthz answers once the supervisor runs; a start (imports, Triton) may take minutes
        # before that, and liveness waits for it.
        "startupProbe": {"httpGet": {"path": "/healthz", **health}, "periodSeconds": 5, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz", **health}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", **health}, "periodSeconds": 5, "failureThreshold": 2},
    }  # fmt: skip
    resources = operator_resources(op)
    if resources:
        container["resources"] = resources
    if options.image_pull_policy is not None:
        container["imagePullPolicy"] = options.image_pull_policy
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": WORKER_GRACE_S, "enableServiceLinks": False}
    if wait_for is not None:
        init = {
            "name": "wait-for-nats",
            "image": image,
            "command": ["python", "-c", _WAIT_FOR_TCP, wait_for, str(NATS_CLIENT_PORT)],
        }
        if options.image_pull_policy is not None:
            init["imagePullPolicy"] = options.image_pull_policy
        pod["initContainers"] = [init]
    pod["containers"] = [container]
    if op.kind == "triton":
        # Triton takes large inputs through /dev/shm, which a container gets only 64 MiB of.
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(names.operators[op.name], labels, annotations),
        "spec": {
            "replicas": op.workers,
            "selector": {"matchLabels": _selector(labels)},
            "template": {
                "metadata": {"labels": labels, "annotations": {**annotations, **scrape_annotations(config)}},
                "spec": pod,
            },
        },
    }


def to_yaml(objects: Iterable[Manifest], header: str | None = None) -> str:
    """``objects`` as one multi-document YAML stream (multi-line strings as blocks)."""
    documents = [yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False) for obj in objects]
    text = "---\n" + "---\n".join(documents)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    return text


def file_name(index: int, obj: Manifest) -> str:
    """The file one object gets in an output directory; numbered so `kubectl apply -f DIR`
    (which goes by file name) applies them in order."""
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_manifests(objects: Sequence[Manifest], output: Path, header: str | None = None) -> list[Path]:
    """Write ``objects`` to ``output``: one file per object when it is a directory (existing, or
    named without .yaml/.yml), else all in one file. Returns the files written."""
    if output.is_dir() or (not output.exists() and output.suffix not in (".yaml", ".yml")):
        output.mkdir(parents=True, exist_ok=True)
        written = []
        for index, obj in enumerate(objects, 1):
            path = output / file_name(index, obj)
            path.write_text(to_yaml([obj], header))
            written.append(path)
        return written
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(to_yaml(objects, header))
    return [output]


# --- helpers -----------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the nats-server config, the wait script) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _check_options(options: K8sOptions) -> None:
    for what, value in (("namespace", options.namespace), ("NATS Secret", options.nats_secret)):
        if value is not None and not is_dns_label(value):
            raise RunnerError(f"{what} {value!r} is not a valid Kubernetes name (lower case letters, digits, '-')")
    if options.nats_replicas < 1:
        raise RunnerError(f"NATS replicas must be >= 1, got {options.nats_replicas}")
    if not _QUANTITY.match(options.nats_storage):
        raise RunnerError(f"NATS storage {options.nats_storage!r} is not a Kubernetes quantity such as 10Gi")
    if options.image_pull_policy is not None and options.image_pull_policy not in _PULL_POLICIES:
        raise RunnerError(f"image pull policy must be one of {', '.join(_PULL_POLICIES)}, got {options.image_pull_policy!r}")
    if options.nats_url is not None and "@" in options.nats_url:
        raise RunnerError("the NATS URL must not carry credentials: put them in the Secret named by --nats-secret")


def _check_generated_nats(config: DeploymentConfig, options: K8sOptions, source: str) -> None:
    """Errors for what the file asks of NATS that the generated cluster cannot provide."""
    problems = []
    auth, tls = config.request_plane.auth, config.request_plane.tls
    if auth.credentials_file or auth.nkey_seed_file:
        problems.append(
            f"{source}: request_plane.auth uses a credentials or NKey file, which the NATS cluster "
            "runner k8s writes cannot check: run NATS yourself and set request_plane.nats_url (or --nats)"
        )
    if tls.ca_file or tls.cert_file or config.request_plane.embedded.tls_cert_file:
        problems.append(
            f"{source}: TLS towards NATS is asked for, which the NATS cluster runner k8s writes does "
            "not serve: run NATS with TLS yourself and set request_plane.nats_url (or --nats)"
        )
    mode = nats_auth(config, options)
    if mode != "none" and options.nats_secret is None:
        key = TOKEN_ENV if mode == "token" else PASSWORD_ENV
        problems.append(
            f"{source}: request_plane.auth asks NATS for a {'token' if mode == 'token' else 'password'}, "
            f"which must not be written into the manifests: create a Secret with key {key} "
            f"(kubectl create secret generic NAME --from-literal={key}=...) and pass --nats-secret NAME"
        )
    for op in config.operators:
        if op.delivery.replicas > options.nats_replicas:
            problems.append(
                f"{source}: operator {op.name!r} keeps {op.delivery.replicas} copies of its work "
                f"queue (delivery.replicas) but the NATS cluster has {options.nats_replicas} "
                f"members: use --nats-replicas {op.delivery.replicas} or more"
            )
    if problems:
        raise ConfigError(problems)


def ingress_manifests(
    config: DeploymentConfig,
    options: K8sOptions,
    names: _Names,
    path: str,
    nats_url: str,
    wait_for: str | None,
) -> list[Manifest]:
    """The HTTP front door: a Deployment of ``http.workers`` pods, one ingress process each
    (``runner deploy FILE --http-only``), and a Service in front of them.

    A token for ``http.auth.token_env`` comes from the Secret ``<deployment>-http-auth``, under
    the variable's name as key.
    """
    assert config.http is not None
    http = config.http
    labels = _labels(names, "pipeline-runner", INGRESS_COMPONENT)
    name = k8s_name(config.name, INGRESS_COMPONENT)
    image = options.image or DEFAULT_IMAGE
    args = ["deploy", path]
    if "@" not in nats_url:
        args += ["--nats", nats_url]
    args += [
        "--http-only", "--workers", "1",
        # The Service reaches the pod's address; large outputs are fetched by this pod over UCX.
        "--http-host", "0.0.0.0", "--http-port", str(http.port or HTTP_PORT),
        "--data-plane-host", "0.0.0.0", "--log-dir", "-", *metrics_args(config),
    ]  # fmt: skip
    env: list[dict[str, Any]] = [{"name": "PIPELINE_RUNNER_STATE_DIR", "value": STATE_DIR}]
    if options.nats_secret is not None:
        env += [_secret_env(options.nats_secret, key, optional=True) for key in (TOKEN_ENV, USER_ENV, PASSWORD_ENV)]
    if http.auth is not None and http.auth.token_env is not None:
        env.append(_secret_env(k8s_name(config.name, "http-auth"), http.auth.token_env, optional=False))
    port = {"port": "http"}
    container: dict[str, Any] = {
        "name": "ingress",
        "image": image,
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": http.port or HTTP_PORT}, *metrics_container_ports(config)],
        "startupProbe": {"httpGet": {"path": "/v2/health/live", **port}, "periodSeconds": 2, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", **port}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", **port}, "periodSeconds": 5, "failureThreshold": 2},
    }  # fmt: skip
    if options.image_pull_policy is not None:
        container["imagePullPolicy"] = options.image_pull_policy
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": WORKER_GRACE_S, "enableServiceLinks": False}
    if wait_for is not None:
        init = {"name": "wait-for-nats", "image": image, "command": ["python", "-c", _WAIT_FOR_TCP, wait_for, str(NATS_CLIENT_PORT)]}
        if options.image_pull_policy is not None:
            init["imagePullPolicy"] = options.image_pull_policy
        pod["initContainers"] = [init]
    pod["containers"] = [container]
    annotations = {ANNOTATION_PREFIX + "deployment": config.name, ANNOTATION_PREFIX + "component": "http"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, labels, annotations),
        "spec": {
            "replicas": http.workers,
            "selector": {"matchLabels": _selector(labels)},
            "template": {
                "metadata": {"labels": labels, "annotations": {**annotations, **scrape_annotations(config)}},
                "spec": pod,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, labels),
        "spec": {
            "selector": _selector(labels),
            "ports": [{"name": "http", "port": http.port or HTTP_PORT, "targetPort": "http"}],
        },
    }
    return [deployment, service]


def _names(config: DeploymentConfig, source: str) -> _Names:
    base = k8s_name(config.name)
    nats = k8s_name(config.name, "nats", limit=_STATEFULSET_NAME_MAX - len("-headless"))
    operators = {op.name: k8s_name(config.name, op.name) for op in config.operators}
    components = {op.name: k8s_name(op.name) for op in config.operators}
    problems = []
    seen_names: dict[str, str] = {}
    seen_components: dict[str, str] = {}
    for op in config.operators:
        for seen, name in ((seen_names, operators[op.name]), (seen_components, components[op.name])):
            other = seen.setdefault(name, op.name)
            if other != op.name:
                problems.append(
                    f"{source}: operators {other!r} and {op.name!r} both become {name!r} as "
                    "Kubernetes names (lower case, '_' as '-'): rename one of them"
                )
                break
    if config.http is not None and INGRESS_COMPONENT in seen_components:
        problems.append(
            f"{source}: operator {seen_components[INGRESS_COMPONENT]!r} becomes {INGRESS_COMPONENT!r} as a "
            "Kubernetes name, which the HTTP ingress uses: rename it"
        )
    if problems:
        raise ConfigError(problems)
    return _Names(
        deployment=base,
        part_of=label_value(config.name),
        nats=nats,
        nats_headless=f"{nats}-headless",
        nats_config=f"{nats}-config",
        operators=operators,
        components=components,
    )


def _shown(path: Path) -> str:
    # Messages name the file as the user would: relative to the working directory when inside it.
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _labels(names: _Names, app: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": names.part_of,
        "app.kubernetes.io/managed-by": "pipeline-runner",
    }


def _selector(labels: dict[str, str]) -> dict[str, str]:
    # A selector cannot change after creation, so it holds only labels that never will.
    keep = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
    return {key: labels[key] for key in keep}


def _metadata(name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def _secret_env(secret: str, key: str, *, optional: bool) -> dict[str, Any]:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def _quoted(text: str) -> str:
    # nats-server's config takes JSON-style double-quoted strings.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
