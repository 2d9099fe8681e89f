"""Concurrency cap, deadlines, checkpoints without a directory."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gradserve
from gradserve import mlp
from gradserve_services.engine import Model
from gradserve_services.gateway import create_server

from .conftest import SPEC, batch, initial_parameters

SLOW_SPEC = mlp(512, [1024, 1024], 10)  # a step of a few hundred ms on this machine


def slow_batch(rows=1024):
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, 512)).astype(np.float32), (np.arange(rows) % 10).astype(np.int64)


def test_concurrency_cap_answers_resource_exhausted(executor):
    server, port = create_server(executor, max_concurrent_calls=1)
    params = Model(SLOW_SPEC).init_parameters(seed=0)
    outcomes = []

    def call():
        with gradserve.Client(f"127.0.0.1:{port}", retries=0) as client:
            try:
                client.compute_gradients(SLOW_SPEC, params, *slow_batch())
                outcomes.append("ok")
            except gradserve.ResourceExhausted:
                outcomes.append("exhausted")

    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert "ok" in outcomes and "exhausted" in outcomes, outcomes
        assert set(outcomes) <= {"ok", "exhausted"}
    finally:
        server.stop(grace=1)


def test_step_that_cannot_meet_its_deadline_is_not_applied(client):
    params = Model(SLOW_SPEC).init_parameters(seed=0)
    session = client.create_session(SLOW_SPEC, params, num_workers=1)
    try:
        x, y = slow_batch()
        first = client.step(session, x, y)
        assert first.version == 1
        with pytest.raises(gradserve.DeadlineExceeded):
            client.step(session, x, y, step_id=2, timeout=first.timings_ms["total"] / 1e3 / 4)
        version, _ = client.pull_parameters(session)
        assert version == 1
        # the same step id goes through once there is time: it was never applied before
        assert client.step(session, x, y, step_id=2).version == 2
    finally:
        client.close_session(session)


def test_checkpoints_need_a_directory(executor):
    server, port = create_server(executor)
    try:
        with gradserve.Client(f"127.0.0.1:{port}", retries=0) as client:
            session = client.create_session(SPEC, initial_parameters(), num_workers=1)
            with pytest.raises(gradserve.FailedPrecondition):
                client.save_checkpoint(session)
            with pytest.raises(gradserve.FailedPrecondition) as caught:
                client.create_session(SPEC, checkpoint_every_steps=5)
            assert caught.value.field == "config.checkpoint_every_steps"
    finally:
        server.stop(grace=1)


def test_checkpoint_every_n_steps_and_restore_by_name(client):
    session = client.create_session(SPEC, initial_parameters(), num_workers=1, checkpoint_every_steps=2)
    try:
        for _ in range(4):
            client.step(session, *batch())
        restored = client.restore_checkpoint(session, "v000000000002.npz")
        assert restored.version == 2 and client.pull_parameters(session)[0] == 2
        # steps 3 and 4 are no longer in the restored step log: they apply again
        assert client.step(session, *batch(), step_id=3).version == 3
        for bad in ("../../etc/passwd", "v1.npz"):
            with pytest.raises(gradserve.InvalidArgument):
                client.restore_checkpoint(session, bad)
        with pytest.raises(gradserve.NotFound):
            client.restore_checkpoint(session, "v000000000009.npz")
    finally:
        client.close_session(session)
