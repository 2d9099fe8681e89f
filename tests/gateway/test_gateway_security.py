"""Bearer tokens, session ownership on every RPC, TLS with a self-signed certificate."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve_services import errors
from gradserve_services.gateway import create_server, parse_tokens

from .conftest import SPEC, TOKENS, batch, initial_parameters

ALICE, BOB = list(TOKENS)


@pytest.fixture(scope="module")
def secured(executor, tmp_path_factory):
    server, port = create_server(executor, auth_tokens=TOKENS,
                                 checkpoint_dir=str(tmp_path_factory.mktemp("secured")))
    yield f"127.0.0.1:{port}"
    server.stop(grace=1)


def test_missing_or_unknown_token_is_unauthenticated(secured):
    for token in (None, "not-a-token-of-anyone-at-all"):
        with gradserve.Client(secured, token=token, retries=0) as stranger:
            with pytest.raises(gradserve.Unauthenticated):
                stranger.list_sessions()
            with pytest.raises(gradserve.Unauthenticated):
                stranger.compute_gradients(SPEC, initial_parameters(), *batch())


def test_health_needs_no_token(secured):
    with grpc.insecure_channel(secured) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_other_identity_sees_nothing_on_every_rpc(secured):
    with gradserve.Client(secured, token=ALICE, retries=0) as alice, \
            gradserve.Client(secured, token=BOB, retries=0) as bob:
        session = alice.create_session(SPEC, initial_parameters(), num_workers=1)
        alice.step(session, *batch())
        alice.save_checkpoint(session)
        x, y = batch(seed=2)
        attempts = [
            lambda: bob.step(session, x, y, step_id=2),
            lambda: list(bob.stream_steps(session, [(2, x, y)])),
            lambda: bob.pull_parameters(session),
            lambda: bob.save_checkpoint(session),
            lambda: bob.restore_checkpoint(session),
            lambda: bob.close_session(session),
        ]
        for attempt in attempts:
            with pytest.raises(gradserve.NotFound):
                attempt()
        assert session not in {s.session_id for s in bob.list_sessions()}
        assert session in {s.session_id for s in alice.list_sessions()}
        version, _ = alice.pull_parameters(session)
        assert version == 1 and alice.step(session, x, y, step_id=2).version == 2
        alice.close_session(session)


def test_session_ids_are_unguessable(secured):
    with gradserve.Client(secured, token=ALICE) as alice:
        ids = [alice.create_session(SPEC, num_workers=1) for _ in range(3)]
        assert len(set(ids)) == 3 and all(len(i) >= 32 for i in ids)
        for session in ids:
            alice.close_session(session)


def test_sessions_per_owner_limit(executor):
    from gradserve_services.gateway import SessionLimits

    server, port = create_server(executor, auth_tokens=TOKENS, limits=SessionLimits(sessions_per_owner=2))
    try:
        with gradserve.Client(f"127.0.0.1:{port}", token=ALICE) as alice, \
                gradserve.Client(f"127.0.0.1:{port}", token=BOB) as bob:
            alice.create_session(SPEC, num_workers=1)
            alice.create_session(SPEC, num_workers=1)
            with pytest.raises(gradserve.ResourceExhausted):
                alice.create_session(SPEC, num_workers=1)
            bob.create_session(SPEC, num_workers=1)  # limits are per identity
            with pytest.raises(gradserve.ResourceExhausted) as caught:
                bob.create_session(SPEC, num_workers=1000)
            assert caught.value.field == "config.num_workers"
    finally:
        server.stop(grace=1)


def test_token_file_format():
    assert parse_tokens("# comment\nalice:abcdefghijklmnop1\n\nbob:abcdefghijklmnop2", "f") == {
        "abcdefghijklmnop1": "alice", "abcdefghijklmnop2": "bob"}
    with pytest.raises(errors.InvalidArgument):
        parse_tokens("alice:short", "f")


def test_tls_with_self_signed_certificate(executor, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server, port = create_server(executor, tls=(cert.read_bytes(), key.read_bytes()), auth_tokens=TOKENS)
    try:
        with gradserve.Client(f"localhost:{port}", token=ALICE, tls=cert.read_bytes()) as alice:
            result = alice.compute_gradients(SPEC, initial_parameters(), *batch())
            assert np.isfinite(result.loss)
        with gradserve.Client(f"localhost:{port}", token=ALICE, retries=0, timeout=5) as plaintext:
            with pytest.raises(gradserve.Unavailable):
                plaintext.list_sessions()
    finally:
        server.stop(grace=1)
