"""deploy/grpc_healthcheck.py (the image's `gradserve-healthcheck`) against a real gRPC server with
the standard health service: exit 0 only while it reports SERVING."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support.dashboard import REPO_ROOT

HEALTHCHECK = REPO_ROOT / "deploy" / "grpc_healthcheck.py"


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer, server
    finally:
        server.stop(grace=None)


def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30)


def test_serving_is_healthy(health_server):
    port, servicer, _server = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    completed = run_healthcheck(f"127.0.0.1:{port}")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "SERVING"


def test_not_serving_is_unhealthy(health_server):
    port, servicer, _server = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    completed = run_healthcheck(f"127.0.0.1:{port}")
    assert completed.returncode == 1
    assert "NOT_SERVING" in completed.stderr


def test_unknown_service_and_stopped_server_are_unhealthy(health_server):
    port, servicer, server = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    completed = run_healthcheck(f"127.0.0.1:{port}", "--service", "gradserve.v1.NoSuchService")
    assert completed.returncode == 1 and "NOT_FOUND" in completed.stderr
    server.stop(grace=None).wait(5)
    completed = run_healthcheck(f"127.0.0.1:{port}", "--timeout", "1")
    assert completed.returncode == 1 and "unhealthy" in completed.stderr
