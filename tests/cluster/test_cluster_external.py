"""RayExecutor attached to a separate Ray cluster started with `ray start --head` (its own
processes), stopped by process group in a finally, bounded in time."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model

from tests.support.ray_cluster import running_cluster

from .helpers import MLP_SPEC, batches

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def ray_cluster():
    """A separate `ray start --head` cluster (2 CPUs, loopback, its own auth token), stopped by
    process group in the helper's finally; this process drives it with the cluster's env."""
    with running_cluster(num_cpus=2) as cluster:
        saved = {name: os.environ.get(name) for name in cluster.env}
        os.environ.update(cluster.env)
        try:
            yield cluster
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def test_training_on_an_existing_cluster(ray_cluster):
    import ray

    params = Model(MLP_SPEC).init_parameters(seed=1, dtype="float64")
    data = batches(4, 30)
    config = TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, num_workers=2)
    executor = RayExecutor(address=ray_cluster.address, num_workers=2)
    try:
        assert ray.get_runtime_context().gcs_address == ray_cluster.address
        trainer = executor.create_trainer(config, params)
        results = [trainer.step(i, x, y) for i, (x, y) in enumerate(data)]
        version, remote = trainer.parameters()
        pids = {executor._backend.get(w.pid.remote()) for w in executor._backend.workers(2)}
    finally:
        executor.shutdown()
    assert not ray.is_initialized()
    assert version == 4 and all(r.samples == 30 for r in results)
    assert len(pids) == 2 and os.getpid() not in pids
    with LocalExecutor(2) as local:
        trainer = local.create_trainer(config, params)
        for i, (x, y) in enumerate(data):
            trainer.step(i, x, y)
        _, expected = trainer.parameters()
    for name, value in expected.items():
        np.testing.assert_allclose(remote[name], value, rtol=1e-12, atol=1e-15)
