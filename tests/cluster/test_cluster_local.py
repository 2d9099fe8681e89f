"""LocalExecutor: the coordinator's rules in process (sharding, exactly-once, staleness, state)."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, InvalidArgument

from .helpers import MLP_SPEC, batches, classification_data, relative_error


@pytest.fixture
def params():
    return Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4])
def test_shards_give_the_full_batch_gradient(params, num_workers):
    x, y = classification_data(37)
    loss, grads = Model(MLP_SPEC).loss_and_grad(params, x, y)
    with LocalExecutor(num_workers) as executor:
        result = executor.compute_gradients(MLP_SPEC, params, x, y, micro_batch_size=5)
    assert result["count"] == 37 and result["loss"] == pytest.approx(loss, rel=1e-12)
    for name, grad in grads.items():
        assert relative_error(result["grads"][name], grad) < 1e-10


def test_jvp_is_the_gradient_along_the_tangent(params):
    x, y = classification_data(20)
    tangent = {k: np.random.default_rng(5).standard_normal(v.shape) for k, v in params.items()}
    _, grads = Model(MLP_SPEC).loss_and_grad(params, x, y)
    expected = sum(float(np.vdot(grads[k], tangent[k])) for k in grads)
    with LocalExecutor(3) as executor:
        result = executor.compute_gradients(MLP_SPEC, params, x, y, tangent=tangent)
    assert result["grads"] is None and result["jvp"] == pytest.approx(expected, rel=1e-9)


def _train(params, steps=8, **config):
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(
            TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, **config), params)
        results = [trainer.step(i, x, y) for i, (x, y) in enumerate(batches(steps, 30))]
        return trainer.parameters(), results


def test_sync_result_does_not_depend_on_worker_or_server_count(params):
    (version_one, one), _ = _train(params, num_workers=1, ps_shards=1)
    (version_three, three), _ = _train(params, num_workers=3, ps_shards=2)
    assert version_one == version_three == 8
    for name in one:
        np.testing.assert_allclose(three[name], one[name], rtol=1e-12, atol=1e-15)


def test_repeated_step_id_applies_nothing(params):
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        x, y = classification_data(16)
        first = trainer.step(1, x, y)
        version, before = trainer.parameters()
        again = trainer.step("1", x * 2, y)
        assert again.duplicate and not first.duplicate
        assert (again.loss, again.version) == (first.loss, first.version)
        assert trainer.parameters()[0] == version == 1
        for name, value in trainer.parameters()[1].items():
            np.testing.assert_array_equal(value, before[name])


def test_bounded_staleness_drops_and_counts(params):
    _, results = _train(params, consistency="bounded", staleness=1, num_workers=3)
    assert all(r.staleness == (0, 1, 2) for r in results)
    assert all(r.updates_dropped == 1 and r.updates_applied == 2 for r in results)


def test_state_restores_into_a_new_trainer(params):
    data = batches(6, 24)
    config = TrainerConfig(MLP_SPEC, {"name": "momentum", "lr": 0.1}, num_workers=2)
    with LocalExecutor() as executor:
        straight = executor.create_trainer(config, params)
        for i, (x, y) in enumerate(data):
            straight.step(i, x, y)
        resumed = executor.create_trainer(config, params)
        for i, (x, y) in enumerate(data[:3]):
            resumed.step(i, x, y)
        arrays, meta = resumed.state()
        fresh = executor.create_trainer(config, params)
        fresh.restore(arrays, meta)
        assert fresh.step(2, *data[2]).duplicate
        for i, (x, y) in list(enumerate(data))[3:]:
            fresh.step(i, x, y)
        for name, value in straight.parameters()[1].items():
            np.testing.assert_array_equal(fresh.parameters()[1][name], value)


def test_bad_inputs_name_their_field(params):
    with LocalExecutor() as executor:
        with pytest.raises(InvalidArgument) as raised:
            executor.create_trainer(TrainerConfig(MLP_SPEC, consistency="eventual"), params)
        assert raised.value.field == "config.consistency"
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        with pytest.raises(InvalidArgument) as raised:
            trainer.step(1, np.zeros((4, 5)), np.zeros(4, dtype=np.int64))
        assert raised.value.field == "batch.x"
        trainer.close()
        with pytest.raises(FailedPrecondition):
            trainer.step(2, *classification_data(4))
