"""The "local" consistency mode through the trainer: rounds equal PyTorch's inner AdamW steps per
worker and outer Nesterov on the sample-weighted mean delta; a round applies exactly once; bad
settings are INVALID_ARGUMENT naming the field; on Ray, a worker SIGKILLed mid-round has its inner
steps re-run and the round's result is the fault-free one."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.cluster.config import OUTER_OPTIMIZER
from gradserve_services.cluster.local_round import round_ranges
from gradserve_services.engine import Model
from gradserve_services.errors import InvalidArgument

from .helpers import MLP_SPEC, classification_data
from .test_cluster_local_round import INNER, _torch_round

H = 4


def _config(**overrides):
    settings = dict(consistency="local", local_steps=H, inner_optimizer=INNER, num_workers=2)
    settings.update(overrides)
    return TrainerConfig(MLP_SPEC, settings.pop("optimizer", OUTER_OPTIMIZER), **settings)


def _torch_rounds(params, rounds, workers):
    reference = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    outer = torch.optim.SGD(list(reference.values()), lr=0.7, momentum=0.9, nesterov=True)
    for x, y in rounds:
        ranges = round_ranges(x.shape[0], H, workers)
        finals = []
        for worker_ranges in ranges:
            _torch_round({n: t.detach().numpy().copy() for n, t in reference.items()}, x, y,
                         worker_ranges, finals)
        counts = [sum(b - a for a, b in worker_ranges) for worker_ranges in ranges]
        outer.zero_grad()
        for name, tensor in reference.items():
            tensor.grad = torch.tensor(sum((tensor.detach().numpy() - final[name]) * count
                                           for final, count in zip(finals, counts)) / sum(counts))
        outer.step()
    return {name: tensor.detach().numpy() for name, tensor in reference.items()}


@pytest.mark.parametrize("workers", [1, 3])
def test_rounds_through_the_trainer_equal_torch(workers):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    rounds = [classification_data(37, seed=s) for s in range(3)]
    executor = LocalExecutor(num_workers=workers)
    trainer = executor.create_trainer(_config(num_workers=workers), params)
    try:
        results = [trainer.step(index, x, y) for index, (x, y) in enumerate(rounds)]
        version, ours = trainer.parameters()
    finally:
        trainer.close()
        executor.shutdown()
    assert version == 3 and all(r.mode == "local" and r.samples == 37 for r in results)
    expected = _torch_rounds(params, rounds, workers)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-9, atol=1e-12)


def test_a_repeated_round_id_applies_nothing_and_returns_the_recorded_result():
    params = Model(MLP_SPEC).init_parameters(seed=1, dtype="float64")
    executor = LocalExecutor(num_workers=2)
    trainer = executor.create_trainer(_config(), params)
    try:
        first = trainer.step(7, *classification_data(40, seed=1))
        _, after_first = trainer.parameters()
        again = trainer.step(7, *classification_data(40, seed=2))
        version, after_again = trainer.parameters()
    finally:
        trainer.close()
        executor.shutdown()
    assert again.duplicate and not first.duplicate and again.loss == first.loss and version == 1
    for name, value in after_first.items():
        np.testing.assert_array_equal(after_again[name], value)


@pytest.mark.parametrize("overrides, field", [
    ({"local_steps": 0}, "config.local_steps"),
    ({"optimizer": {"name": "nesterov", "lr": 0.0}}, "optimizer.lr"),
    ({"optimizer": {"name": "nesterov", "lr": -0.7}}, "optimizer.lr"),
    ({"inner_optimizer": {"name": "adamw", "lr": -1.0}}, "config.inner_optimizer.lr"),
    ({"compression": "zstd"}, "config.compression"),
    ({"compression": "powersgd"}, "config.compression"),  # sync only
])
def test_bad_settings_are_refused_naming_the_field(overrides, field):
    with pytest.raises(InvalidArgument) as refused:
        _config(**overrides).validated()
    assert refused.value.field == field


def test_a_round_with_fewer_rows_than_inner_steps_is_refused_and_applies_nothing():
    params = Model(MLP_SPEC).init_parameters(seed=1, dtype="float64")
    executor = LocalExecutor(num_workers=2)
    trainer = executor.create_trainer(_config(), params)
    try:
        with pytest.raises(InvalidArgument) as refused:
            trainer.step(0, *classification_data(H - 1, seed=1))
        version, unchanged = trainer.parameters()
    finally:
        trainer.close()
        executor.shutdown()
    assert refused.value.field == "batch.x" and version == 0
    for name, value in params.items():
        np.testing.assert_array_equal(unchanged[name], value)


SLOW_SPEC = {
    "input_features": 32,
    "nodes": [{"name": "fc1", "op": "dense", "inputs": ["input"], "units": 512},
              {"name": "act", "op": "tanh", "inputs": ["fc1"]},
              {"name": "out", "op": "dense", "inputs": ["act"], "units": 4}],
    "output": "out",
    "loss": "softmax_cross_entropy",
}


@pytest.mark.integration
def test_worker_killed_mid_round_has_its_inner_steps_rerun_and_the_round_is_unchanged():
    """SIGKILL a real worker process while it runs its inner steps (one-row micro-batches make
    them take seconds); the round completes with exactly the fault-free parameters."""
    params = Model(SLOW_SPEC).init_parameters(seed=3, dtype="float64")
    rng = np.random.default_rng(4)
    data = [(rng.standard_normal((rows, 32)), rng.integers(0, 4, rows)) for rows in (16, 24000)]
    config = TrainerConfig(SLOW_SPEC, OUTER_OPTIMIZER, consistency="local", local_steps=2,
                           num_workers=2, micro_batch_size=1)
    executor = RayExecutor(num_workers=2, num_cpus=3, object_store_memory=256 * 1024 * 1024)

    def run(kill: bool):
        trainer = executor.create_trainer(config, params)
        try:
            trainer.step(0, *data[0])
            if not kill:
                return trainer.step(1, *data[1]), trainer.parameters()
            victim = executor._backend.workers(2)[0]
            pid = executor._backend.get(victim.pid.remote())
            outcome = {}
            stepper = threading.Thread(target=lambda: outcome.update(r=trainer.step(1, *data[1])))
            stepper.start()
            time.sleep(0.5)  # inside the inner steps (6000 one-row micro-batches each)
            os.kill(pid, signal.SIGKILL)
            stepper.join(timeout=480)  # a loaded machine stretches the two shards' times
            assert not stepper.is_alive()
            return outcome["r"], trainer.parameters()
        finally:
            trainer.close()

    try:
        clean, (clean_version, clean_params) = run(kill=False)
        faulty, (faulty_version, faulty_params) = run(kill=True)
    finally:
        executor.shutdown()
    assert min(clean.worker_compute_ms) > 800, "the round must outlast the kill delay"
    assert faulty.worker_failures == 1 and faulty.retries >= 1 and clean.retries == 0
    assert faulty.loss == clean.loss and faulty_version == clean_version == 2
    for name, value in clean_params.items():
        np.testing.assert_array_equal(faulty_params[name], value)


@pytest.mark.parametrize("compression, shrink", [("fp16", 2.0), ("int8", 3.0), ("topk", 10.0)])
def test_compressed_deltas_train_and_send_fewer_bytes(compression, shrink):
    params = Model(MLP_SPEC).init_parameters(seed=2, dtype="float32")
    executor = LocalExecutor(num_workers=2)
    trainer = executor.create_trainer(
        _config(compression=compression, topk_fraction=0.02,
                inner_optimizer={"name": "adamw", "lr": 0.02}), params)
    x, y = classification_data(96, seed=4, dtype="float32")
    try:
        results = [trainer.step(index, x, y) for index in range(4)]
        _, trained = trainer.parameters()
    finally:
        trainer.close()
        executor.shutdown()
    assert results[-1].loss < results[0].loss
    assert all(r.bytes_raw >= shrink * r.bytes_compressed for r in results)
    assert all(np.isfinite(value).all() for value in trained.values())
