"""Counts travel in fields of their own: `timings_ms` holds milliseconds only, and a lost worker's
re-run shows as `retries` / `worker_failures` in ComputeGradients and Step replies."""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradserve_services.cluster import Executor
from gradserve_services.cluster.local import LocalBackend, _Done
from gradserve_services.cluster.worker import GradientWorker
from gradserve_services.gateway import create_server

from .conftest import SPEC, batch, initial_parameters

COMPUTE_PHASES = {"broadcast", "compute", "gather", "reduce", "total"}
STEP_PHASES = {"broadcast", "compute", "gather", "apply", "total", "server_apply"}


class WorkerLost(Exception):
    """Stands for a worker process that died under its call."""


class LosingBackend(LocalBackend):
    """The in-process backend, but the next `losses` shard computations find their worker dead
    (the call never runs); the executor then replaces that worker and re-runs the shard."""

    def __init__(self, num_workers: int):
        super().__init__(num_workers)
        self.losses = 0

    def submit(self, handle, method: str, *args, num_returns: int = 1) -> list:
        if method == "compute" and self.losses > 0:
            self.losses -= 1
            return [_Done(error=WorkerLost()) for _ in range(num_returns)]
        return super().submit(handle, method, *args, num_returns=num_returns)

    def is_lost(self, error: BaseException) -> bool:
        return isinstance(error, WorkerLost)

    def died(self, error: BaseException, handle) -> bool:
        return isinstance(error, WorkerLost)

    def replace_worker(self, position: int, lost):
        self._workers[position] = GradientWorker(limit_threads=False)
        return self._workers[position]


@pytest.fixture(scope="module")
def losing():
    """(backend, client) of a gateway over an executor whose workers can be made to die."""
    backend = LosingBackend(2)
    executor = Executor(backend, 2)
    server, port = create_server(executor)
    try:
        with gradserve.Client(f"127.0.0.1:{port}", timeout=60, retries=0) as client:
            yield backend, client
    finally:
        server.stop(grace=1)
        executor.shutdown()


def test_compute_gradients_counts_a_lost_worker_apart_from_timings(losing):
    backend, client = losing
    params = initial_parameters()
    x, y = batch(rows=20)
    clean = client.compute_gradients(SPEC, params, x, y)
    backend.losses = 1
    faulty = client.compute_gradients(SPEC, params, x, y)
    assert set(clean.timings_ms) == set(faulty.timings_ms) == COMPUTE_PHASES
    assert (clean.retries, clean.worker_failures) == (0, 0)
    assert (faulty.retries, faulty.worker_failures) == (1, 1)
    assert faulty.loss == clean.loss
    for name, gradient in clean.gradients.items():
        np.testing.assert_array_equal(faulty.gradients[name], gradient)


def test_step_counts_a_lost_worker_apart_from_timings(losing):
    backend, client = losing
    session = client.create_session(SPEC, initial_parameters(), optimizer={"name": "sgd", "lr": 0.1},
                                    num_workers=2)
    try:
        clean = client.step(session, *batch(seed=1))
        backend.losses = 1
        faulty = client.step(session, *batch(seed=2))
        assert set(clean.timings_ms) == set(faulty.timings_ms) == STEP_PHASES
        assert (clean.retries, clean.worker_failures) == (0, 0)
        assert (faulty.retries, faulty.worker_failures) == (1, 1)
        assert faulty.version == 2 and faulty.applied
        repeated = client.step(session, *batch(seed=2), step_id=faulty.step_id)
        assert repeated.duplicate and (repeated.retries, repeated.worker_failures) == (1, 1)
    finally:
        client.close_session(session)
