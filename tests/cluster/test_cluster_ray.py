"""The cluster on a real embedded Ray runtime: sharding, sync equivalence, staleness, exactly-once,
worker SIGKILL recovery, resize, parameter-server sharding, compression."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model

from .helpers import MLP_SPEC, batches, classification_data, relative_error

pytestmark = pytest.mark.integration  # hangs are caught by the suite-wide timeout (pyproject)


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


@pytest.fixture
def params():
    return Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")


def _train(executor, params, data, **config):
    config.setdefault("optimizer", {"name": "adam", "lr": 0.01})
    trainer = executor.create_trainer(TrainerConfig(MLP_SPEC, **config), params)
    try:
        results = [trainer.step(i, x, y) for i, (x, y) in enumerate(data)]
        return trainer.parameters(), results
    finally:
        trainer.close()


def _accuracy(params, rows=400):
    x, y = classification_data(rows, seed=99)
    logits = Model(MLP_SPEC).forward(params, x)
    return float(np.mean(np.argmax(logits, axis=1) == y))


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4])
def test_uneven_shards_give_the_full_batch_gradient(executor, params, num_workers):
    x, y = classification_data(37)  # 37 rows: shards of 19/18, 13/12/12, 10/9/9/9
    loss, grads = Model(MLP_SPEC).loss_and_grad(params, x, y)
    result = executor.compute_gradients(MLP_SPEC, params, x, y, micro_batch_size=4,
                                        num_workers=num_workers)
    assert result["count"] == 37 and result["loss"] == pytest.approx(loss, rel=1e-12)
    for name, grad in grads.items():
        assert relative_error(result["grads"][name], grad) < 1e-10


def test_sync_steps_with_one_and_three_workers_agree(executor, params):
    data = batches(6, 41)
    (version_one, one), _ = _train(executor, params, data, num_workers=1, micro_batch_size=7)
    (version_three, three), results = _train(executor, params, data, num_workers=3)
    assert version_one == version_three == 6
    assert all(r.updates_applied == 1 and r.staleness == (0,) for r in results)
    for name in one:
        np.testing.assert_allclose(three[name], one[name], rtol=1e-12, atol=1e-15)
    # and the in-process executor computes the same trajectory
    with LocalExecutor(2) as local:
        (_, reference), _ = _train(local, params, data, num_workers=2)
    for name in one:
        np.testing.assert_allclose(reference[name], one[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("consistency,staleness,policy", [
    ("async", 0, "drop"), ("bounded", 1, "drop"), ("bounded", 0, "downweight")])
def test_on_arrival_modes_converge_and_count_stale_updates(executor, params, consistency,
                                                           staleness, policy):
    before = _accuracy(params)
    (_, trained), results = _train(executor, params, batches(25, 60), num_workers=3,
                                   consistency=consistency, staleness=staleness,
                                   stale_policy=policy, optimizer={"name": "sgd", "lr": 0.3})
    assert _accuracy(trained) > max(0.8, before + 0.2)
    assert all(sorted(r.staleness) == [0, 1, 2] for r in results)
    dropped = sum(r.updates_dropped for r in results)
    if consistency == "bounded" and policy == "drop":
        assert dropped == len(results)  # the shard two versions behind, every step
    else:
        assert dropped == 0 and all(r.updates_applied == 3 for r in results)


def test_repeated_step_id_returns_recorded_result_and_applies_nothing(executor, params):
    trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
    try:
        x, y = classification_data(16)
        first = trainer.step(7, x, y)
        version, before = trainer.parameters()
        again = trainer.step("7", x[::-1].copy(), y[::-1].copy())
        assert again.duplicate and not first.duplicate
        assert (again.loss, again.version, again.timings) == (first.loss, first.version,
                                                              first.timings)
        after_version, after = trainer.parameters()
        assert after_version == version == 1
        for name, value in after.items():
            np.testing.assert_array_equal(value, before[name])
    finally:
        trainer.close()


SLOW_SPEC = {
    "input_features": 32,
    "nodes": [{"name": "fc1", "op": "dense", "inputs": ["input"], "units": 1024},
              {"name": "act", "op": "tanh", "inputs": ["fc1"]},
              {"name": "out", "op": "dense", "inputs": ["act"], "units": 4}],
    "output": "out",
    "loss": "softmax_cross_entropy",
}


def test_worker_killed_mid_step_is_rerun_and_result_unchanged(executor):
    """SIGKILL the real worker process while it computes its shard (tiny micro-batches make the
    shard take a second or two); the step completes and matches a fault-free run exactly."""
    params = Model(SLOW_SPEC).init_parameters(seed=3, dtype="float64")
    rng = np.random.default_rng(4)
    data = [(rng.standard_normal((rows, 32)), rng.integers(0, 4, rows)) for rows in (64, 48000)]
    config = TrainerConfig(SLOW_SPEC, {"name": "momentum", "lr": 0.05}, num_workers=2,
                           micro_batch_size=1)

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
            time.sleep(0.4)  # inside the shard's compute (24000 one-row micro-batches)
            os.kill(pid, signal.SIGKILL)
            stepper.join(timeout=480)  # a loaded machine stretches the two shard times
            assert not stepper.is_alive()
            return outcome["r"], trainer.parameters()
        finally:
            trainer.close()

    clean, (clean_version, clean_params) = run(kill=False)
    faulty, (faulty_version, faulty_params) = run(kill=True)
    assert min(clean.worker_compute_ms) > 600, "the shard must outlast the kill delay"
    assert faulty.worker_failures == 1 and faulty.retries >= 1 and clean.retries == 0
    assert faulty.loss == clean.loss and faulty_version == clean_version == 2
    for name, value in clean_params.items():
        np.testing.assert_array_equal(faulty_params[name], value)
    # the pool replaced the dead worker: the next trainer runs normally on both
    (_, _), after = _train(executor, Model(MLP_SPEC).init_parameters(dtype="float64"),
                           batches(2, 20), num_workers=2)
    assert all(r.retries == 0 for r in after)


def test_resize_between_steps_keeps_the_sync_trajectory(executor, params):
    data = batches(6, 40)
    (_, fixed), _ = _train(executor, params, data, num_workers=2)
    trainer = executor.create_trainer(
        TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, num_workers=1), params)
    try:
        for i, (x, y) in enumerate(data):
            trainer.resize([1, 3, 2][i % 3])
            trainer.step(i, x, y)
        assert trainer.num_workers == 2
        _, resized = trainer.parameters()
    finally:
        trainer.close()
    for name, value in fixed.items():
        np.testing.assert_allclose(resized[name], value, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("clip_norm", [None, 0.05])
def test_two_server_shards_equal_one(executor, params, clip_norm):
    data = batches(5, 32)
    optimizer = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "clip_norm": clip_norm}
    (_, one), one_results = _train(executor, params, data, ps_shards=1, optimizer=optimizer)
    (_, two), two_results = _train(executor, params, data, ps_shards=2, optimizer=optimizer)
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-12, atol=1e-15)
    for a, b in zip(one_results, two_results):
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-12)


def test_compression_saves_bytes_and_topk_with_error_feedback_converges(executor, params):
    data = batches(40, 60)
    (_, fp16), fp16_results = _train(executor, params, data[:5], compression="fp16")
    assert all(r.bytes_saved > 0 and r.bytes_compressed * 2 <= r.bytes_raw + 64
               for r in fp16_results)
    (_, topk), topk_results = _train(executor, params, data, compression="topk",
                                     topk_fraction=0.1, optimizer={"name": "sgd", "lr": 0.5})
    assert all(r.bytes_compressed < r.bytes_raw / 3 for r in topk_results)
    assert _accuracy(topk) > max(0.8, _accuracy(params) + 0.2)
