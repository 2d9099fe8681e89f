"""deploy/k8s: the KubeRay RayCluster and the gateway Deployment/Service parse and agree with the
pinned Ray, the image, the ports and the gRPC health probes."""

from __future__ import annotations

import re
import tomllib

import ray
import yaml

from tests.support.dashboard import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
IMAGE = "gradserve:0.1.0"


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def pinned_ray_version() -> str:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (pin,) = [dep for dep in pyproject["project"]["optional-dependencies"]["server"] if dep.startswith("ray")]
    return re.fullmatch(r"ray==([\w.]+)", pin).group(1)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kinds_and_api_versions():
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in documents()}
    assert kinds == {
        ("ray.io/v1", "RayCluster"), ("apps/v1", "Deployment"), ("v1", "Service"),
        ("v1", "PersistentVolumeClaim"),
    }


def test_ray_version_matches_the_pin_and_the_installed_ray():
    (cluster,) = by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"] == pinned_ray_version() == ray.__version__


def test_every_container_runs_the_project_image_as_non_root():
    (cluster,) = by_kind("RayCluster")
    (deployment,) = by_kind("Deployment")
    templates = [cluster["spec"]["headGroupSpec"]["template"], deployment["spec"]["template"]]
    templates += [group["template"] for group in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in containers(template):
            assert container["image"] == IMAGE, container["name"]
            assert container.get("readinessProbe") and container.get("livenessProbe"), container["name"]


def test_ray_cluster_shape():
    (cluster,) = by_kind("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    head_ports = {port["containerPort"] for port in containers(head["template"])[0]["ports"]}
    assert 6379 in head_ports and 8265 not in head_ports
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]


def test_gateway_joins_the_cluster_and_probes_grpc_health():
    (cluster,) = by_kind("RayCluster")
    (deployment,) = by_kind("Deployment")
    (gateway,) = containers(deployment["spec"]["template"])
    command = " ".join(gateway["command"])
    head_service = f"{cluster['metadata']['name']}-head-svc:6379"   # KubeRay's naming
    assert f"ray start --address={head_service}" in command
    assert f"--ray-address {head_service}" in command
    assert "--port 50051" in command and "--metrics-port 9100" in command
    container_ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert container_ports == {"grpc": 50051, "metrics": 9100}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["grpc"]["port"] == 50051, probe
    mounts = {mount["name"]: mount["mountPath"] for mount in gateway["volumeMounts"]}
    assert mounts["checkpoints"] == "/checkpoints"
    (claim,) = by_kind("PersistentVolumeClaim")
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_service_selects_the_gateway_and_targets_its_ports():
    (deployment,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {port["name"] for port in containers(deployment["spec"]["template"])[0]["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == port_names
    assert {port["port"] for port in service["spec"]["ports"]} == {50051, 9100}
