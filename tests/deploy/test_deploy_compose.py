"""docker-compose.yml: valid for the Compose spec schema and for Debian's docker-compose (the two
validations CI can run without a Docker engine), and wired the way deploy/README.md describes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.dashboard import REPO_ROOT

COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
IMAGE = "gradserve:0.1.0"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())


def command_text(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_compose_spec_schema():
    check_jsonschema = Path(sys.executable).parent / "check-jsonschema"
    completed = subprocess.run(
        [str(check_jsonschema), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_PATH)],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_docker_compose_config():
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose not found (make system-deps installs it)"
    completed = subprocess.run(
        [binary, "-f", str(COMPOSE_PATH), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_services_and_roles():
    services = compose()["services"]
    assert set(services) == {"ray-head", "ray-worker", "gateway", "prometheus", "grafana"}
    for role in ("ray-head", "ray-worker", "gateway"):
        assert services[role]["image"] == IMAGE
        assert services[role]["build"]["dockerfile"] == "deploy/Dockerfile"
    head = command_text(services["ray-head"])
    assert "ray start --head --block" in head and "--port=6379" in head
    # The Ray dashboard is not published: no 8265 mapping and bound to the container's loopback.
    assert "--dashboard-host=127.0.0.1" in head
    assert not any("8265" in str(port) for port in services["ray-head"].get("ports", []))
    worker = services["ray-worker"]
    assert "--address=ray-head:6379" in command_text(worker)
    assert worker["deploy"]["replicas"] >= 2
    assert worker["shm_size"]


def test_gateway_command_health_and_checkpoints():
    services = compose()["services"]
    gateway = services["gateway"]
    command = command_text(gateway)
    assert re.search(r"gradserve serve --host 0\.0\.0\.0 --port 50051\s+--ray-address ray-head:6379 --metrics-port 9100", command)
    assert gateway["healthcheck"]["test"][:3] == ["CMD", "gradserve-healthcheck", "127.0.0.1:50051"]
    assert gateway["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "checkpoints:/checkpoints" in gateway["volumes"]
    assert "checkpoints" in compose()["volumes"]
    # Services others wait on (depends_on: service_healthy) must define a health check.
    awaited = set()
    for service in services.values():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, dict):   # the list form carries no condition
            awaited |= {name for name, how in depends_on.items() if how.get("condition") == "service_healthy"}
    assert awaited == {"ray-head", "prometheus"}
    assert all("healthcheck" in services[name] for name in awaited)


def test_prometheus_scrapes_the_gateway_metrics_port():
    services = compose()["services"]
    prometheus_service = services["prometheus"]
    mounts = prometheus_service["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    for mount in mounts:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (REPO_ROOT / source).exists(), source
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (gradserve_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gradserve"]
    assert gradserve_job["static_configs"][0]["targets"] == ["gateway:9100"]
    assert "--metrics-port 9100" in command_text(services["gateway"])
    flags = prometheus_service["command"]
    assert "--web.console.templates=/usr/share/prometheus/consoles" in flags
    assert "--web.console.libraries=/usr/share/prometheus/console_libraries" in flags


def test_published_ports_are_loopback_and_documented():
    readme = (REPO_ROOT / "deploy" / "README.md").read_text()
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            host_ip, host_port, _container_port = str(mapping).split(":")
            assert host_ip == "127.0.0.1", (name, mapping)
            assert f"| {host_port} |" in readme, f"port {host_port} of {name} not in deploy/README.md"
