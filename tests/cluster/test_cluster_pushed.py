"""Gradients pushed in buckets during backward (gradient_push.py, pushed_updates.py) on a real
embedded Ray runtime: the same updates, bitwise in float64, as the path where each worker returns
its sums when done; refusals on both paths (several server shards agree by dependency,
ParameterShards.update); and the servers' collection of pushes on its own (in this process)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.cluster.pushed_updates import PushedUpdates, sum_into
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, Unavailable
from gradserve_services.optim.blocks import sum_block

from .helpers import MLP_SPEC, assert_step_refused_changing_nothing, batches, classification_data

DEEP_SPEC = {  # five parameter-holding nodes: several buckets when buckets are small
    "input_features": 6,
    "nodes": [
        {"name": "fc1", "op": "dense", "inputs": ["input"], "units": 32},
        {"name": "act1", "op": "tanh", "inputs": ["fc1"]},
        {"name": "fc2", "op": "dense", "inputs": ["act1"], "units": 24},
        {"name": "norm", "op": "layernorm", "inputs": ["fc2"]},
        {"name": "act2", "op": "relu", "inputs": ["norm"]},
        {"name": "fc3", "op": "dense", "inputs": ["act2"], "units": 16},
        {"name": "act3", "op": "tanh", "inputs": ["fc3"]},
        {"name": "logits", "op": "dense", "inputs": ["act3"], "units": 3},
    ],
    "output": "logits",
    "loss": "softmax_cross_entropy",
}


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=3, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


def _train(executor, data, **config):
    params = Model(DEEP_SPEC).init_parameters(seed=5, dtype="float64")
    trainer = executor.create_trainer(TrainerConfig(DEEP_SPEC, **config), params)
    try:
        results = [trainer.step(i, x, y) for i, (x, y) in enumerate(data)]
        return trainer.parameters()[1], results
    finally:
        trainer.close()


@pytest.mark.integration
@pytest.mark.parametrize("workers,ps_shards,optimizer,micro_batch_size,bucket_bytes", [
    (2, 1, {"name": "sgd", "lr": 0.1}, None, 1),
    (3, 1, {"name": "adam", "lr": 0.01, "clip_norm": 0.5}, 4, 1),
    (3, 1, {"name": "momentum", "lr": 0.05}, None, 1 << 20),
    (2, 2, {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}, None, 1),
    (3, 2, {"name": "adam", "lr": 0.01, "clip_norm": 0.05}, 5, 600),
])
def test_pushed_buckets_update_bitwise_as_returned_sums(executor, workers, ps_shards, optimizer,
                                                        micro_batch_size, bucket_bytes):
    # 37 rows: uneven shards; signals every 2nd step, so steps with per-part products come too
    data = batches(6, 37)
    config = dict(num_workers=workers, ps_shards=ps_shards, optimizer=optimizer,
                  micro_batch_size=micro_batch_size, signals_every=2, bucket_bytes=bucket_bytes)
    returned, returned_results = _train(executor, data, push_gradients=False, **config)
    pushed, pushed_results = _train(executor, data, push_gradients=True, **config)
    # the paths really differ: only pushed steps report the servers' summing of buckets
    assert all("reduced" in r.timings for r in pushed_results)
    assert not any("reduced" in r.timings for r in returned_results)
    for name, value in returned.items():
        np.testing.assert_array_equal(pushed[name], value, err_msg=name)
    for a, b in zip(returned_results, pushed_results):
        assert (a.loss, a.grad_norm, a.version) == (b.loss, b.grad_norm, b.version)
        assert a.bytes_raw == b.bytes_raw
        assert a.noise_scale == b.noise_scale or (np.isnan(a.noise_scale) and np.isnan(b.noise_scale))


MSE_SPEC = {"input_features": 4, "nodes": [{"name": "out", "op": "dense", "inputs": ["input"], "units": 2}],
            "output": "out", "loss": "mse"}


@pytest.mark.integration
@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("ps_shards", [1, 2])
def test_an_overflowing_update_is_refused_by_the_servers_and_changes_nothing(executor, ps_shards, push):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    params["logits.bias"][:] = np.finfo(np.float64).max  # an lr of 1e300 pushes one past it
    x, y = classification_data(24)
    trainer = executor.create_trainer(TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 1e300}, num_workers=2,
                                                    ps_shards=ps_shards, bucket_bytes=1,
                                                    push_gradients=push), params)
    try:
        assert_step_refused_changing_nothing(trainer, 1, x, y, "parameters.logits.bias")
        assert trainer.version == 0
    finally:
        trainer.close()


@pytest.mark.integration
@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("ps_shards", [1, 2])
def test_a_shard_refusing_its_loss_changes_nothing_and_the_step_again_is_undisturbed(executor, ps_shards, push):
    params = Model(MSE_SPEC).init_parameters(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    good = [(rng.standard_normal((16, 4)), rng.standard_normal((16, 2))) for _ in range(2)]
    huge = (np.full((16, 4), 1e200), np.zeros((16, 2)))  # finite; its squared error is not
    config = dict(optimizer={"name": "adam", "lr": 1e-2}, num_workers=2, ps_shards=ps_shards,
                  push_gradients=push)

    def run(refused_between: bool):
        trainer = executor.create_trainer(TrainerConfig(MSE_SPEC, **config), params)
        try:
            trainer.step(1, *good[0])
            if refused_between:
                with pytest.raises(FailedPrecondition) as refused:
                    trainer.step(2, *huge)
                assert refused.value.field == "loss" and trainer.version == 1
            # the same step id again (a client's retry): the refused attempt's pushes stay out of it
            result = trainer.step(2, *good[1])
            return result, trainer.parameters()
        finally:
            trainer.close()

    clean, (clean_version, clean_params) = run(False)
    disturbed, (version, after) = run(True)
    assert ("reduced" in disturbed.timings) == push and version == clean_version == 2
    for name, value in clean_params.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


# ----- the collection on its own -------------------------------------------------------------

def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(70000), "b": rng.standard_normal(5)}


def test_sum_into_adds_as_the_update_loop_does():
    parts = [np.random.default_rng(k).standard_normal(100003).astype(np.float32) for k in range(4)]
    out = sum_into(np.empty_like(parts[0]), parts)
    for start in range(0, parts[0].size, 1 << 15):
        np.testing.assert_array_equal(out[start:start + (1 << 15)], sum_block(parts, start, start + (1 << 15), None))


def test_buckets_before_the_expectation_duplicates_and_completion():
    pushes = PushedUpdates()
    shard_grads = [_grads(0), _grads(1)]
    # shard 1 pushes both buckets before the trainer's expectation arrives; a re-run repeats one
    pushes.push("t", "k", 1, 0, None, {"w": shard_grads[1]["w"]})
    pushes.push("t", "k", 1, 1, 2, {"b": shard_grads[1]["b"]})
    collection = pushes.expect("t", "k", "1", 2, (40, 0, None), True)
    assert not collection.complete()
    pushes.push("t", "k", 0, 0, None, {"w": shard_grads[0]["w"]})
    assert 0 in collection.summed and not collection.complete()
    pushes.push("t", "k", 1, 0, None, {"w": np.zeros(70000)})  # a repeat: ignored
    pushes.push("t", "k", 0, 1, 2, {"b": shard_grads[0]["b"]})
    assert collection.complete()
    (part,) = collection.parts(["w", "b"])  # every bucket summed: one part, the sums
    for name in ("w", "b"):
        np.testing.assert_array_equal(part["grads"][name], shard_grads[0][name] + shard_grads[1][name])


def test_measured_steps_keep_the_parts():
    pushes = PushedUpdates()
    collection = pushes.expect("t", "k", "1", 2, ([20, 20], 0, None), True)  # counts per part
    for shard in range(2):
        pushes.push("t", "k", shard, 0, 1, _grads(shard))
    assert collection.complete() and not collection.summed
    parts = collection.parts(["w", "b"])
    assert len(parts) == 2
    np.testing.assert_array_equal(parts[1]["grads"]["w"], _grads(1)["w"])


def test_abandon_wakes_the_wait_with_an_error():
    pushes = PushedUpdates()
    collection = pushes.collection("t", "k")
    raised = []

    def wait():
        try:
            PushedUpdates.wait(collection, 60)
        except Unavailable as error:
            raised.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    pushes.abandon("t", "k", Unavailable("the update was abandoned", "gradients"))
    waiter.join(timeout=60)
    assert not waiter.is_alive() and raised and "abandoned" in str(raised[0])
    with pytest.raises(Unavailable, match="did not all arrive"):
        PushedUpdates.wait(pushes.collection("t", "other"), 0.01)


def test_a_table_keeps_a_few_open_updates_at_most():
    pushes = PushedUpdates()
    first = pushes.collection("t", "k0")
    for index in range(1, 6):
        pushes.collection("t", f"k{index}")
    with pytest.raises(Unavailable, match="given up"):
        PushedUpdates.wait(first, 1)


def test_a_closed_attempt_stays_closed_to_late_calls():
    pushes = PushedUpdates()
    made = pushes.expect("t", "made", "1", 1, (40, 0, None), True)
    pushes.push("t", "made", 0, 0, 1, _grads(0))
    assert made.complete()
    pushes.finish("t", "made", made, outcome=("published", {"key": "1"}))
    # a wait that starts after the update was made reads its outcome at once, not a new collection
    assert PushedUpdates.wait(pushes.collection("t", "made"), 0.01) == ("published", {"key": "1"})
    assert not made.buckets  # closed: its gradients are freed

    # abandoned before its expectation and its buckets arrived (they come on other threads)
    pushes.abandon("t", "late", Unavailable("the update was abandoned", "gradients"))
    late = pushes.expect("t", "late", "1", 1, (40, 0, None), True)
    pushes.push("t", "late", 0, 0, 1, _grads(0))
    assert not late.buckets and not late.complete()
    with pytest.raises(Unavailable, match="abandoned"):
        PushedUpdates.wait(pushes.collection("t", "late"), 0.01)

    # another attempt at the same update is a collection of its own
    again = pushes.expect("t", "again", "1", 1, (40, 0, None), True)
    assert again is not late and not again.done.is_set()
