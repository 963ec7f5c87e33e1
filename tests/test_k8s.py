"""`runner k8s FILE`: Kubernetes manifests that run a deployment file.

Every object is checked against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an
unknown field is an error), and the tests below read the YAML back and check what it means.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from pipeline_runner.cli import _parser, main
from pipeline_runner.k8s import k8s_name
from pipeline_runner.nats_server import find_nats_server

from .conftest import REPO_ROOT

HELLO_WORLD = REPO_ROOT / "deployments" / "hello_world.yaml"
HELLO_WORLD_PYTHON = REPO_ROOT / "deployments" / "hello_world_python.yaml"
# The oldest and newest Kubernetes versions whose schemas kubernetes-validate ships.
K8S_VERSIONS = sorted({all_versions()[0], kubernetes_validate.latest_version()})
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LEAKS = ("pw-MUST-NOT-LEAK-1234", "tok-MUST-NOT-LEAK-5678", "url-MUST-NOT-LEAK-9012")

# GPU and CPU resources, device auto, an external NATS and names Kubernetes does not take as they are.
MIXED = """\
name: Mixed_Pipeline
working_dir: ..
request_plane:
  nats_url: nats://nats.infra.svc:4222
operators:
  - name: pre_process
    implementation: operators/ops.py:Pre
    workers: 3
    resources: {cpu: 500m, memory: 1Gi}
  - name: big_model
    implementation: operators/ops.py:Model
    device: gpu
    workers: 2
    resources: {cpu: "4", memory: 16Gi}
  - name: maybe_gpu
    implementation: operators/ops.py:Maybe
    device: auto
"""

PLAIN = """\
name: plain
working_dir: ..
operators:
  - name: echo
    implementation: operators/ops.py:Echo
"""

SECURE_USER = f"""\
name: secure
working_dir: ..
request_plane:
  auth: {{user: pipelines, password: {LEAKS[0]}}}
operators:
  - name: echo
    implementation: operators/ops.py:Echo
"""

SECURE_TOKEN = f"""\
name: secure
working_dir: ..
request_plane:
  auth: {{token: {LEAKS[1]}}}
operators:
  - name: echo
    implementation: operators/ops.py:Echo
"""

SECURE_URL = f"""\
name: secure
working_dir: ..
request_plane:
  nats_url: nats://alice:{LEAKS[2]}@nats.example:4222
operators:
  - name: echo
    implementation: operators/ops.py:Echo
"""


def deployment_file(root: Path, text: str, name: str = "pipeline.yaml") -> Path:
    """``text`` as deployments/NAME in a repository at ``root`` with the operator file it names."""
    (root / "operators").mkdir(parents=True, exist_ok=True)
    (root / "operators" / "ops.py").write_text("class Pre: ...\nclass Model: ...\nclass Maybe: ...\nclass Echo: ...\n")
    (root / "pyproject.toml").write_text("")
    path = root / "deployments" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def render(capsys: pytest.CaptureFixture[str], file: Path, *options: str) -> list[dict[str, Any]]:
    """The objects `runner k8s FILE OPTIONS` prints, read back from its YAML."""
    assert main(["k8s", str(file), *options]) == 0
    return [obj for obj in yaml.safe_load_all(capsys.readouterr().out) if obj is not None]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def worker_deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments of operators (not the HTTP ingress's)."""
    return [d for d in of_kind(objects, "Deployment") if "pipeline-runner/operator" in d["metadata"]["annotations"]]


def ingress_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The HTTP ingress's Deployment and Service."""
    return [o for o in objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == "http-ingress"]


def workers_by_operator(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each operator's Deployment, by the operator's name as written in the file."""
    return {d["metadata"]["annotations"]["pipeline-runner/operator"]: d for d in worker_deployments(objects)}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def deploy_args(workload: dict[str, Any]) -> Any:
    """The worker container's arguments to the image's entrypoint (`tini -- runner`), parsed by
    the real `runner` command line."""
    worker = container(workload)
    assert "command" not in worker  # the entrypoint stays: tini forwards signals and reaps
    assert worker["args"][0] == "deploy"
    return _parser().parse_args(worker["args"])


def nats_routes(objects: list[dict[str, Any]]) -> list[str]:
    (config_map,) = of_kind(objects, "ConfigMap")
    block = re.search(r"routes: \[(.*?)\]", config_map["data"]["nats.conf"], re.S)
    assert block, "the nats-server config has no routes"
    return block.group(1).split()


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    return deployment_file(tmp_path, MIXED, "mixed.yaml")


# --- valid Kubernetes ------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", ["hello_world", "hello_world_python", "mixed", "secure", "one_nats_member"])
def test_every_object_is_valid_kubernetes(
    case: str, version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, options = {
        "hello_world": lambda: (HELLO_WORLD, ["--namespace", "ml"]),
        "hello_world_python": lambda: (HELLO_WORLD_PYTHON, ["--nats-storage-class", "fast", "--image-pull-policy", "IfNotPresent"]),
        "mixed": lambda: (deployment_file(tmp_path, MIXED), []),
        "secure": lambda: (deployment_file(tmp_path, SECURE_USER), ["--nats-secret", "nats-auth"]),
        "one_nats_member": lambda: (HELLO_WORLD_PYTHON, ["--nats-replicas", "1"]),
    }[case]()
    objects = render(capsys, file, *options)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
        assert DNS_LABEL.match(obj["metadata"]["name"]), obj["metadata"]["name"]


def test_the_validation_rejects_an_unknown_field(capsys: pytest.CaptureFixture[str]) -> None:
    """Strict mode is on: a misspelt field would not slip through the test above."""
    deployment = worker_deployments(render(capsys, HELLO_WORLD))[0]
    container(deployment)["livenessProbes"] = container(deployment).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# --- workers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("file", [HELLO_WORLD, HELLO_WORLD_PYTHON])
def test_each_operator_gets_a_deployment_with_a_pod_per_worker(file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline_runner.config_loader import load_deployment

    config = load_deployment(file)
    workers = workers_by_operator(render(capsys, file))
    assert set(workers) == {op.name for op in config.operators}
    for op in config.operators:
        assert workers[op.name]["spec"]["replicas"] == op.workers


def test_each_pod_runs_one_worker_of_its_own_operator(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--image", "registry.example/pipeline-runner:1.2")
    services = [s for s in of_kind(objects, "Service") if s not in ingress_objects(objects)]
    (client_service,) = [s for s in services if s["spec"].get("clusterIP") != "None"]
    for operator, deployment in workers_by_operator(objects).items():
        args = deploy_args(deployment)
        assert args.func.__name__ == "_cmd_deploy"
        assert Path(args.file) == Path("/app/deployments/hello_world.yaml")
        assert args.only == [operator]
        assert args.workers == 1
        assert args.nats == f"nats://{client_service['metadata']['name']}:4222"
        assert args.data_plane_host == "0.0.0.0"
        assert container(deployment)["image"] == "registry.example/pipeline-runner:1.2"


def test_gpu_operators_run_the_gpu_image(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The defaults are the tags containers/build.sh gives its cpu and gpu variants."""
    images = {op: container(d)["image"] for op, d in workers_by_operator(render(capsys, mixed)).items()}
    assert images == {"pre_process": "pipeline-runner:cpu", "big_model": "pipeline-runner:gpu", "maybe_gpu": "pipeline-runner:cpu"}
    images = {op: container(d)["image"] for op, d in workers_by_operator(render(capsys, mixed, "--image", "r/p:1")).items()}
    assert set(images.values()) == {"r/p:1"}
    split = workers_by_operator(render(capsys, mixed, "--image", "r/p:1", "--gpu-image", "r/p:1-gpu"))
    assert container(split["big_model"])["image"] == "r/p:1-gpu"
    assert container(split["pre_process"])["image"] == "r/p:1"


def test_probes_ask_the_workers_health_endpoints(capsys: pytest.CaptureFixture[str]) -> None:
    for deployment in worker_deployments(render(capsys, HELLO_WORLD_PYTHON)):
        worker = container(deployment)
        args = deploy_args(deployment)
        assert args.health_host == "0.0.0.0"  # the kubelet probes the pod's address
        ports = {port["name"]: port["containerPort"] for port in worker["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            get = worker[probe]["httpGet"]
            assert get["path"] == path, probe
            assert ports.get(get["port"], get["port"]) == args.health_port, probe


def test_the_http_front_door_is_its_own_deployment_behind_a_service_probed_on_v2_health(
    capsys: pytest.CaptureFixture[str],
) -> None:
    objects = render(capsys, HELLO_WORLD)
    deployment, service = ingress_objects(objects)
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    assert deployment["spec"]["replicas"] == 1  # http.workers
    args = deploy_args(deployment)
    assert args.http_only and args.workers == 1 and args.only is None
    assert (args.http_host, args.http_port) == ("0.0.0.0", 8000)
    assert args.nats.startswith("nats://") and args.data_plane_host == "0.0.0.0"
    ingress = container(deployment)
    assert ingress["ports"] == [{"name": "http", "containerPort": 8000}, {"name": "metrics", "containerPort": 9464}]
    for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready"), ("startupProbe", "/v2/health/live")):
        assert ingress[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(service["spec"]["selector"], labels)
    assert not any(matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]) for w in worker_deployments(objects))


def test_every_pod_serves_metrics_on_a_named_port_its_scrape_annotations_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    objects = render(capsys, HELLO_WORLD)
    pods = [*worker_deployments(objects), ingress_objects(objects)[0]]
    assert len(pods) == 4  # encoder, decoder, encoder_decoder, the HTTP ingress
    for workload in pods:
        args = deploy_args(workload)
        assert (args.metrics_host, args.metrics_port) == ("0.0.0.0", 9464)  # Prometheus reaches the pod
        ports = {port["name"]: port["containerPort"] for port in container(workload)["ports"]}
        assert ports["metrics"] == 9464
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9464"
        assert annotations["prometheus.io/path"] == "/metrics"


def test_metrics_off_in_the_file_leave_no_port_and_no_scrape_annotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = deployment_file(
        tmp_path, "name: quiet\nworking_dir: ..\nmetrics: {enabled: false}\noperators:\n  - {name: echo, implementation: operators/ops.py:Echo}\n"
    )
    (workload,) = worker_deployments(render(capsys, file))
    assert deploy_args(workload).metrics_port is None
    assert [port["name"] for port in container(workload)["ports"]] == ["health"]
    assert not any(key.startswith("prometheus.io/") for key in workload["spec"]["template"]["metadata"]["annotations"])


def test_the_http_token_comes_from_a_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = deployment_file(tmp_path, PLAIN + "http:\n  auth: {token_env: PIPELINE_RUNNER_HTTP_TOKEN}\n")
    (deployment, _service) = ingress_objects(render(capsys, file))
    env = {e["name"]: e for e in container(deployment)["env"]}
    assert env["PIPELINE_RUNNER_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "plain-http-auth", "key": "PIPELINE_RUNNER_HTTP_TOKEN", "optional": False,
    }  # fmt: skip


def test_workers_have_longer_to_stop_than_a_drain_takes(capsys: pytest.CaptureFixture[str]) -> None:
    for deployment in of_kind(render(capsys, HELLO_WORLD), "Deployment"):
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_gpu_operators_ask_for_one_gpu_and_the_others_for_none(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workers = workers_by_operator(render(capsys, mixed))
    gpu = container(workers["big_model"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    for operator in ("pre_process", "maybe_gpu"):  # device auto asks for none: see portability_warnings()
        resources = container(workers[operator]).get("resources", {})
        assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
    assert capsys.readouterr().err == ""  # render() already took stderr; the warning is tested below


def test_device_auto_and_host_gpu_numbers_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = deployment_file(tmp_path, MIXED.replace("device: gpu", "device: gpu\n    gpus: [2]"))
    assert main(["k8s", str(file)]) == 0
    err = capsys.readouterr().err
    assert "warning: operator 'maybe_gpu': device 'auto'" in err
    assert "warning: operator 'big_model': gpus [2]" in err


def test_cpu_and_memory_are_requests_and_memory_also_the_limit(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workers = workers_by_operator(render(capsys, mixed))
    assert container(workers["pre_process"])["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"memory": "1Gi"},
    }
    big = container(workers["big_model"])["resources"]
    assert big["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert big["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}
    assert "resources" not in container(workers["maybe_gpu"])


def test_names_are_dns_labels_and_commands_keep_the_operator_names(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, mixed)
    workers = workers_by_operator(objects)
    assert workers["pre_process"]["metadata"]["name"] == "mixed-pipeline-pre-process"
    assert deploy_args(workers["pre_process"]).only == ["pre_process"]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "Mixed_Pipeline"
        assert DNS_LABEL.match(labels["app.kubernetes.io/component"])


def test_operators_that_become_one_kubernetes_name_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = deployment_file(tmp_path, MIXED.replace("name: maybe_gpu", "name: pre-process"))
    assert main(["k8s", str(file)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "operators 'pre_process' and 'pre-process' both become 'mixed-pipeline-pre-process'" in err


def test_long_names_are_cut_to_63_characters_and_stay_distinct() -> None:
    a, b = k8s_name("d" * 64, "x" * 63 + "a"), k8s_name("d" * 64, "x" * 63 + "b")
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert DNS_LABEL.match(a) and DNS_LABEL.match(b)
    assert k8s_name("Hello_World-", limit=63) == "hello-world"


def test_selectors_pick_only_their_own_pods(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD)
    workloads = of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads}
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        chosen = {name for name, labels in pods.items() if matches(selector, labels)}
        assert chosen == {workload["metadata"]["name"]}
    (statefulset,) = of_kind(objects, "StatefulSet")
    (ingress, _) = ingress_objects(objects)
    for service in of_kind(objects, "Service"):
        chosen = {name for name, labels in pods.items() if matches(service["spec"]["selector"], labels)}
        front = service in ingress_objects(objects)
        assert chosen == {(ingress if front else statefulset)["metadata"]["name"]}


# --- NATS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [3, 5])
def test_the_nats_cluster_routes_to_every_member(replicas: int, capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--nats-replicas", str(replicas))
    (statefulset,) = of_kind(objects, "StatefulSet")
    (headless,) = [s for s in of_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert statefulset["spec"]["replicas"] == replicas
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["publishNotReadyAddresses"] is True
    # A StatefulSet's pod i is <name>-i, with a DNS name under its headless Service.
    members = {f"nats://{statefulset['metadata']['name']}-{i}.{headless['metadata']['name']}:6222" for i in range(replicas)}
    assert set(nats_routes(objects)) == members


def test_nats_members_keep_jetstream_on_their_own_volume(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--nats-storage", "50Gi")
    (statefulset,) = of_kind(objects, "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    mounts = {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    conf = of_kind(objects, "ConfigMap")[0]["data"]["nats.conf"]
    assert f"store_dir: {mounts[claim['metadata']['name']]}" in conf
    monitor = {p["name"]: p["containerPort"] for p in container(statefulset)["ports"]}["monitor"]
    assert "http_port: %d" % monitor in conf
    assert container(statefulset)["livenessProbe"]["httpGet"] == {"path": "/healthz?js-enabled-only=true", "port": "monitor"}


def test_one_nats_member_has_no_cluster_and_no_disruption_budget(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--nats-replicas", "1")
    assert "cluster {" not in of_kind(objects, "ConfigMap")[0]["data"]["nats.conf"]
    assert of_kind(objects, "PodDisruptionBudget") == []


def test_work_queue_replicas_need_as_many_nats_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = deployment_file(tmp_path, PLAIN + "    delivery: {replicas: 3}\n")
    assert main(["k8s", str(file), "--nats-replicas", "1"]) == 2
    assert "use --nats-replicas 3 or more" in capsys.readouterr().err
    assert main(["k8s", str(file), "--nats-replicas", "3"]) == 0


def test_nats_server_accepts_the_config_and_needs_its_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real nats-server parses the config; without the Secret's token it refuses to start."""
    file = deployment_file(tmp_path, SECURE_TOKEN)
    objects = render(capsys, file, "--nats-secret", "nats-auth")
    conf = tmp_path / "nats.conf"
    conf.write_text(of_kind(objects, "ConfigMap")[0]["data"]["nats.conf"])
    env = {"POD_NAME": "secure-nats-0", "PIPELINE_RUNNER_NATS_TOKEN": "t"}
    check = [find_nats_server(), "-c", str(conf), "-t"]
    ok = subprocess.run(check, capture_output=True, text=True, env=env, timeout=30)
    assert ok.returncode == 0, ok.stderr
    del env["PIPELINE_RUNNER_NATS_TOKEN"]
    refused = subprocess.run(check, capture_output=True, text=True, env=env, timeout=30)
    assert refused.returncode != 0
    assert "PIPELINE_RUNNER_NATS_TOKEN" in refused.stderr


def test_an_external_nats_url_replaces_the_cluster(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, mixed)
    assert {obj["kind"] for obj in objects} == {"Deployment"}
    for deployment in of_kind(objects, "Deployment"):
        assert deploy_args(deployment).nats == "nats://nats.infra.svc:4222"
        assert "initContainers" not in deployment["spec"]["template"]["spec"]


def test_the_nats_option_replaces_the_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--nats", "nats://shared-nats.infra:4222")
    assert {obj["kind"] for obj in objects if obj not in ingress_objects(objects)} == {"Deployment"}
    assert {deploy_args(d).nats for d in of_kind(objects, "Deployment")} == {"nats://shared-nats.infra:4222"}


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [(SECURE_USER, "PIPELINE_RUNNER_NATS_PASSWORD"), (SECURE_TOKEN, "PIPELINE_RUNNER_NATS_TOKEN")])
def test_nats_credentials_come_from_the_secret_and_never_appear(
    text: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = deployment_file(tmp_path, text)
    assert main(["k8s", str(file), "--nats-secret", "nats-auth"]) == 0
    out, err = capsys.readouterr()
    assert not any(leak in out or leak in err for leak in LEAKS)
    objects = list(yaml.safe_load_all(out))
    conf = of_kind(objects, "ConfigMap")[0]["data"]["nats.conf"]
    assert f"${key}" in conf  # nats-server reads it from its environment
    server_env = {e["name"]: e for e in container(of_kind(objects, "StatefulSet")[0])["env"]}
    assert server_env[key]["valueFrom"]["secretKeyRef"] == {"name": "nats-auth", "key": key, "optional": False}
    worker_env = {e["name"]: e for e in container(of_kind(objects, "Deployment")[0])["env"]}
    assert worker_env[key]["valueFrom"]["secretKeyRef"]["name"] == "nats-auth"


@pytest.mark.parametrize("text", [SECURE_USER, SECURE_TOKEN])
def test_nats_credentials_without_a_secret_are_refused(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", str(deployment_file(tmp_path, text))]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "--nats-secret" in err
    assert not any(leak in err for leak in LEAKS)


def test_a_secret_alone_makes_the_cluster_require_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--nats-secret", "nats-auth")
    assert "token: $PIPELINE_RUNNER_NATS_TOKEN" in of_kind(objects, "ConfigMap")[0]["data"]["nats.conf"]


def test_a_nats_url_with_credentials_stays_out_of_the_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = deployment_file(tmp_path, SECURE_URL)
    assert main(["k8s", str(file)]) == 0
    out = capsys.readouterr().out
    assert LEAKS[2] not in out
    (deployment,) = of_kind(list(yaml.safe_load_all(out)), "Deployment")
    assert deploy_args(deployment).nats is None  # the worker takes the URL from the file in the image
    assert main(["k8s", str(file), "--nats", f"nats://bob:{LEAKS[2]}@elsewhere:4222"]) == 1
    assert LEAKS[2] not in "".join(capsys.readouterr())


def test_tls_towards_nats_needs_an_external_nats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = deployment_file(tmp_path, PLAIN.replace("operators:", "request_plane:\n  tls: {ca_file: ca.pem}\noperators:"))
    assert main(["k8s", str(file)]) == 2
    assert "TLS towards NATS" in capsys.readouterr().err


# --- command line ----------------------------------------------------------------------------


def test_namespace_is_set_on_every_object(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD, "--namespace", "inference")
    assert {obj["metadata"].get("namespace") for obj in objects} == {"inference"}
    assert main(["k8s", str(HELLO_WORLD), "--namespace", "Not_A_Name"]) == 1


def test_output_to_a_directory_or_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objects = render(capsys, HELLO_WORLD)
    assert main(["k8s", str(HELLO_WORLD), "-o", str(tmp_path / "manifests")]) == 0
    files = sorted((tmp_path / "manifests").iterdir())
    assert [yaml.safe_load(f.read_text()) for f in files] == objects  # one per object, in apply order
    assert main(["k8s", str(HELLO_WORLD), "-o", str(tmp_path / "all.yaml")]) == 0
    assert list(yaml.safe_load_all((tmp_path / "all.yaml").read_text())) == objects


def test_the_file_path_in_the_image_follows_the_repository(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (deployment, *_) = of_kind(render(capsys, mixed), "Deployment")
    assert Path(deploy_args(deployment).file) == Path("/app/deployments/mixed.yaml")
    (deployment, *_) = of_kind(render(capsys, mixed, "--file-in-image", "/srv/pipelines/mixed.yaml"), "Deployment")
    assert Path(deploy_args(deployment).file) == Path("/srv/pipelines/mixed.yaml")


def test_the_command_prints_yaml_and_fails_cleanly(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "pipeline_runner.cli", "k8s"]
    ok = subprocess.run([*run, str(HELLO_WORLD)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert {obj["kind"] for obj in yaml.safe_load_all(ok.stdout)} >= {"StatefulSet", "Deployment"}
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\noperators:\n  - name: a\n    workers: two\n")
    bad = subprocess.run([*run, str(broken)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert bad.returncode == 2
    assert "workers" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stdout == ""
