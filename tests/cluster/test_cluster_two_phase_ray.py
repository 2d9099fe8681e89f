"""Two-phase steps on a real embedded Ray runtime (workers and parameter servers as actors, the
shared-memory lane on): the updates equal the in-process executor's and a Step with that loss,
with two server shards, in sync and async mode; a repeated backward applies nothing."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model

from .helpers import MLP_SPEC, batches
from .test_cluster_two_phase import DROPOUT_SPEC, mean_softmax_cross_entropy, two_phase

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=2, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


@pytest.mark.parametrize("consistency, ps_shards", [("sync", 2), ("async", 1)])
def test_two_phase_steps_on_ray_equal_steps_with_that_loss(executor, consistency, ps_shards):
    spec = DROPOUT_SPEC
    params = Model(spec).init_parameters(seed=0, dtype="float64")
    config = TrainerConfig(spec, {"name": "adam", "lr": 0.01}, consistency=consistency, ps_shards=ps_shards,
                           num_workers=2)
    client_loss = executor.create_trainer(config, params)
    try:
        with LocalExecutor(2) as local:
            reference = local.create_trainer(config, params)
            for step_id, (x, y) in enumerate(batches(4, 20), start=1):
                result = two_phase(client_loss, step_id, x, y)
                local_result = two_phase(reference, step_id, x, y)
                assert result.version == local_result.version and result.applied
                assert result.loss == pytest.approx(local_result.loss, rel=1e-12)
            again = client_loss.backward_step(4, np.zeros((20, 3)), 0.0)
            assert again.duplicate and again.version == result.version
            (_, want), (_, got) = reference.parameters(), client_loss.parameters()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)
        if consistency == "sync":  # and the same as a Step on the cluster with the built-in loss
            stepped = executor.create_trainer(config, params)
            try:
                for step_id, (x, y) in enumerate(batches(4, 20), start=1):
                    stepped.step(step_id, x, y)
                _, by_steps = stepped.parameters()
            finally:
                stepped.close()
            for name in by_steps:
                np.testing.assert_allclose(got[name], by_steps[name], rtol=1e-10, atol=1e-13)
    finally:
        client_loss.close()


def test_a_forward_at_published_parameters_survives_the_next_update(executor):
    """The held forward's parameters are its own copy: an update the servers apply between the
    forward and the backward (async mode allows one) does not change the gradient pulled back."""
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    config = TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 0.1}, consistency="async", num_workers=2)
    trainer = executor.create_trainer(config, params)
    try:
        (x, y), (x2, y2) = batches(2, 16)
        phase = trainer.forward_step(1, x)
        trainer.step(2, x2, y2)
        _, between = trainer.parameters()
        loss, gradient = mean_softmax_cross_entropy(phase.output, y)
        trainer.backward_step(1, gradient, loss)
        _, after = trainer.parameters()
    finally:
        trainer.close()
    expected = Model(MLP_SPEC).loss_and_grad(params, x, y, train=True, seed=0)[1]
    for name in params:
        np.testing.assert_allclose(after[name], between[name] - 0.1 * expected[name], rtol=1e-10, atol=1e-13)
