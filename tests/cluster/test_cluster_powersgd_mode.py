"""PowerSGD through the sync trainer: the update of each step is the full-batch gradient's rank-r
PowerSGD (with error feedback) for the matrix, the exact gradient for the rest; 1 and 3 workers
give the same parameters; bytes sent shrink; bad ranks are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.cluster.powersgd import initial_q, orthonormal
from gradserve_services.engine import Model
from gradserve_services.errors import InvalidArgument

SPEC = {
    "input_features": 64,
    "nodes": [{"name": "fc1", "op": "dense", "inputs": ["input"], "units": 96},
              {"name": "act", "op": "tanh", "inputs": ["fc1"]},
              {"name": "out", "op": "dense", "inputs": ["act"], "units": 4}],
    "output": "out",
    "loss": "softmax_cross_entropy",
}
RANK, LR, STEPS = 3, 0.2, 5


def _data(steps=STEPS, rows=45):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((rows, 64)), rng.integers(0, 4, rows)) for _ in range(steps)]


def _train(workers: int, **overrides):
    params = Model(SPEC).init_parameters(seed=0, dtype="float64")
    executor = LocalExecutor(num_workers=workers)
    config = TrainerConfig(SPEC, {"name": "sgd", "lr": LR}, num_workers=workers,
                           compression="powersgd", powersgd_rank=RANK, **overrides)
    trainer = executor.create_trainer(config, params)
    try:
        results = [trainer.step(index, x, y) for index, (x, y) in enumerate(_data())]
        return results, trainer.parameters()[1], params
    finally:
        trainer.close()
        executor.shutdown()


def test_each_update_is_the_full_batch_gradients_powersgd_with_error_feedback():
    _, ours, params = _train(workers=2)
    model = Model(SPEC)
    expected = {name: value.copy() for name, value in params.items()}
    q = initial_q(0, "fc1.weight", (64, 96), RANK, np.float64)
    residual = np.zeros((64, 96))
    for x, y in _data():
        _, grads = model.loss_and_grad(expected, x, y)
        m = grads["fc1.weight"] + residual
        p_hat = orthonormal(m @ q)
        q = m.T @ p_hat
        approx = p_hat @ q.T
        residual = m - approx
        for name, grad in grads.items():
            expected[name] -= LR * (approx if name == "fc1.weight" else grad)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-10, atol=1e-12)


def test_one_and_three_workers_give_the_same_parameters_and_fewer_bytes_are_sent():
    results_one, one, _ = _train(workers=1)
    results_three, three, _ = _train(workers=3)
    for name, value in one.items():
        np.testing.assert_allclose(three[name], value, rtol=1e-10, atol=1e-12)
    for result in results_one:
        # P (64x3) + Q (96x3) instead of 64x96, the vectors and the small matrix as they are
        matrix_sent = (64 + 96) * RANK * 8
        assert result.bytes_compressed == matrix_sent + (96 + 96 * 4 + 4) * 8
        assert result.bytes_raw == (64 * 96 + 96 + 96 * 4 + 4) * 8
    assert all(r.bytes_compressed < r.bytes_raw / 5 for r in results_three)


@pytest.mark.parametrize("rank", [0, 65])
def test_a_rank_of_zero_or_above_a_matrix_side_is_refused_naming_the_field(rank):
    params = Model(SPEC).init_parameters(seed=0, dtype="float64")
    executor = LocalExecutor(num_workers=1)
    try:
        with pytest.raises(InvalidArgument) as refused:
            executor.create_trainer(TrainerConfig(SPEC, num_workers=1, compression="powersgd",
                                                  powersgd_rank=rank), params)
    finally:
        executor.shutdown()
    assert refused.value.field == "config.powersgd_rank"


@pytest.mark.integration
def test_on_ray_with_the_shared_memory_lane_equals_in_process():
    from gradserve_services.cluster import RayExecutor

    _, expected, params = _train(workers=2)
    executor = RayExecutor(num_workers=2, num_cpus=2, object_store_memory=128 * 1024 * 1024)
    config = TrainerConfig(SPEC, {"name": "sgd", "lr": LR}, num_workers=2, compression="powersgd",
                           powersgd_rank=RANK)
    try:
        trainer = executor.create_trainer(config, params)
        try:
            for index, (x, y) in enumerate(_data()):
                trainer.step(index, x, y)
            _, ours = trainer.parameters()
        finally:
            trainer.close()
    finally:
        executor.shutdown()
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-10, atol=1e-12)
