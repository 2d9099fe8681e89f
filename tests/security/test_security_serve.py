"""Security of the `gradserve serve` process as deployed: auth cannot be left off by accident, tokens
come from the environment, TLS from the command line (with a certificate made here), the API and the
metrics exporter listen on loopback only, and the embedded Ray runs without its dashboard."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve import mlp
from gradserve_services import procfs

from tests.support.serve_process import serve_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRADSERVE = str(Path(sys.executable).with_name("gradserve"))
ALICE, BOB = "env-alice-token-5d2c9e17a4", "env-bob-token-0b7f3a8e61"
SPEC = mlp(4, [8], 2)
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost and 127.0.0.1, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def listening_sockets() -> dict[int, list[tuple[str, int]]]:
    """{pid: [(address, port)]} of every listening TCP socket on this machine, from /proc."""
    by_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                raw_address, raw_port = fields[1].split(":")
                by_inode[fields[9]] = (_address(raw_address), int(raw_port, 16))
    sockets: dict[int, list] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in by_inode:
                sockets.setdefault(int(entry), []).append(by_inode[inode])
    return sockets


def _address(raw: str) -> str:
    packed = bytes.fromhex(raw)
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed[::-1]))
    words = b"".join(packed[i:i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return f"::ffff:{address.ipv4_mapped}" if address.ipv4_mapped else str(address)


def test_serve_refuses_to_start_without_tokens_unless_told(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "GRADSERVE_AUTH_TOKENS"}
    for extra_env in ({}, {"GRADSERVE_AUTH_TOKENS": ""}, {"GRADSERVE_AUTH_TOKENS": "alice:short"}):
        run = subprocess.run([GRADSERVE, "serve", "--port", "0", "--metrics-port", "0"],
                             env={**env, **extra_env}, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stderr
        assert "--no-auth" in run.stderr  # the one way to run without auth is named, not taken
    missing = subprocess.run([GRADSERVE, "serve", "--auth-tokens-file", str(tmp_path / "none")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2


def test_env_tokens_tls_loopback_binding_and_no_dashboard(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    env = {"GRADSERVE_AUTH_TOKENS": f"alice:{ALICE},bob:{BOB}"}
    with serve_process(tmp_path / "serve.log", ["--tls-cert", str(cert), "--tls-key", str(key), "--workers", "1"],
                       env=env) as server:
        assert server.serving["host"] == "127.0.0.1"
        port = server.serving["port"]
        target = f"localhost:{port}"
        roots = cert.read_bytes()

        # TLS: plaintext gets nowhere; a client trusting the certificate works, with a token only
        with gradserve.Client(target, token=ALICE, retries=0, timeout=10) as plaintext:
            with pytest.raises(gradserve.Unavailable):
                plaintext.list_sessions()
        with gradserve.Client(target, tls=roots, retries=0, timeout=60) as anonymous:
            with pytest.raises(gradserve.Unauthenticated):
                anonymous.list_sessions()
        with gradserve.Client(target, token=ALICE, tls=roots, timeout=120) as alice, \
                gradserve.Client(target, token=BOB, tls=roots, retries=0, timeout=60) as bob:
            session = alice.create_session(SPEC, num_workers=1)
            x = np.ones((4, 4), np.float32)
            assert alice.step(session, x, np.array([0, 1, 0, 1])).version == 1
            with pytest.raises(gradserve.NotFound):  # tokens from the environment carry identities
                bob.pull_parameters(session)
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(roots)) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        # the API and the metrics exporter listen on loopback only
        sockets = listening_sockets()
        own = dict((listen_port, address) for address, listen_port in sockets.get(server.pid, []))
        assert own[port] in LOOPBACK and own[server.serving["metrics_port"]] in LOOPBACK, own

        # the embedded Ray was started with include_dashboard=False: Ray still runs its dashboard
        # head process, but without the web frontend, and nothing in the server's process tree
        # serves the dashboard port
        tree = procfs.descendants(server.pid)
        dashboards = [procfs.cmdline(pid) for pid in tree if "dashboard/dashboard.py" in procfs.cmdline(pid)]
        for command in dashboards:
            assert "--disable-frontend" in command or "--minimal" in command, command
        dashboard_ports = {int(m) for command in dashboards for m in re.findall(r"--port=(\d+)", command)} or {8265}
        for pid in [server.pid, *tree]:
            for _, listen_port in sockets.get(pid, []):
                assert listen_port not in dashboard_ports, (pid, procfs.cmdline(pid), listen_port)


def test_default_serve_keeps_every_embedded_ray_listener_on_loopback(tmp_path):
    env = {"GRADSERVE_AUTH_TOKENS": f"alice:{ALICE}"}
    with serve_process(tmp_path / "serve.log", ["--workers", "2"], env=env) as server:
        # a session and a step bring up everything a step needs: workers, parameter servers
        with gradserve.Client(server.target, token=ALICE, timeout=120) as alice:
            session = alice.create_session(SPEC, num_workers=2)
            assert alice.step(session, np.ones((4, 4), np.float32), np.array([0, 1, 0, 1])).version == 1
            sockets = listening_sockets()
            tree = [server.pid, *procfs.descendants(server.pid)]
        listeners = {pid: sockets[pid] for pid in tree if pid in sockets}
        commands = {pid: procfs.cmdline(pid) for pid in listeners}
    log = (tmp_path / "serve.log").read_text(errors="replace")

    # Ray's own servers are among them (the test sees what it claims to check) ...
    for part in ("gcs_server", "raylet", "ray::"):
        assert any(part in command for command in commands.values()), (part, commands)
    assert server.serving["port"] in {port for address, port in listeners[server.pid]}
    # ... and every one of them listens on loopback only
    exposed = [(pid, commands[pid][:80], address, port) for pid, found in listeners.items()
               for address, port in found if address not in LOOPBACK]
    assert exposed == [], exposed
    # gradserve says in one line that the embedded runtime starts, where it listens and its auth
    # mode; Ray's own notice about token authentication is not printed
    announcements = [line for line in log.splitlines() if "starting the embedded Ray runtime" in line]
    assert len(announcements) == 1, log
    assert "gradserve.ray" in announcements[0] and "127.0.0.1 only" in announcements[0]
    assert "token authentication" in announcements[0]
    assert "Token authentication is enabled" not in log and "RAY_AUTH_MODE" not in log


def test_ray_listen_all_opens_the_embedded_runtime_only_when_asked(tmp_path):
    env = {"GRADSERVE_AUTH_TOKENS": f"alice:{ALICE}"}
    with serve_process(tmp_path / "serve.log", ["--workers", "1", "--ray-listen", "all"], env=env) as server:
        sockets = listening_sockets()
        tree = [server.pid, *procfs.descendants(server.pid)]
        exposed = {procfs.cmdline(pid) for pid in tree for address, _ in sockets.get(pid, [])
                   if address not in LOOPBACK}
        # the gateway itself still binds --host (loopback); Ray's servers now face the network
        assert all(address in LOOPBACK for address, port in sockets[server.pid]
                   if port in (server.serving["port"], server.serving["metrics_port"]))
    assert any("gcs_server" in command or "raylet" in command for command in exposed), exposed
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "listening on all interfaces" in log and "Token authentication is enabled" not in log
