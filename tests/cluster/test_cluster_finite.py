"""Updates that would make parameters non-finite are refused whole and change nothing: in the
optimizer, in a parameter-server table, across parameter-server shards, and for a loss that
overflows on a batch (in process; tests/cluster/test_cluster_gateway_ray.py runs them over gRPC and
Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.cluster.parameter_server import ParameterTable
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, InvalidArgument
from gradserve_services.optim import OPTIMIZER_NAMES, Optimizer, all_finite
from gradserve_services.optim.finite import provably_finite

from .helpers import MLP_SPEC, assert_step_refused_changing_nothing, classification_data

LARGEST = float(np.finfo(np.float64).max)
MSE_SPEC = {"input_features": 4, "nodes": [{"name": "out", "op": "dense", "inputs": ["input"], "units": 2}],
            "output": "out", "loss": "mse"}


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((40_000,)), "b": rng.standard_normal((3, 5))}


def _snapshot(optimizer: Optimizer, params):
    return ({k: v.copy() for k, v in params.items()},
            {k: {s: v.copy() for s, v in slots.items()} for k, slots in optimizer.state.items()},
            optimizer.update_count)


def _assert_unchanged(optimizer, params, snapshot):
    before_params, before_state, before_count = snapshot
    assert optimizer.update_count == before_count
    for name, value in params.items():
        np.testing.assert_array_equal(value, before_params[name], err_msg=name)
        for slot, state in optimizer.state[name].items():
            np.testing.assert_array_equal(state, before_state[name][slot], err_msg=f"{name}/{slot}")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_an_overflowing_update_is_refused_and_changes_nothing(name):
    params = _arrays()
    optimizer = Optimizer({"name": name, "lr": 1e-2}, params)
    optimizer.step(params, [_arrays(1)])  # a normal update first: state is not all zeros
    absurd = Optimizer({"name": name, "lr": 1e308}, params)
    absurd.state = optimizer.state
    absurd.update_count = optimizer.update_count
    grads = {k: v * 10 for k, v in _arrays(2).items()}  # lr * |grad| > the largest float64
    snapshot = _snapshot(absurd, params)
    for attempt in (absurd.check, absurd.step):
        with pytest.raises(FailedPrecondition) as refused:
            attempt(params, [grads])
        assert refused.value.field in ("parameters.w", "parameters.b")
        assert "non-finite" in refused.value.message and "1e+308" in refused.value.message
        _assert_unchanged(absurd, params, snapshot)


def test_a_non_finite_gradient_is_refused_naming_it():
    params = _arrays()
    optimizer = Optimizer({"name": "adam", "lr": 1e-3}, params)
    grads = _arrays(1)
    grads["b"][2, 4] = np.inf
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(FailedPrecondition) as refused:
        optimizer.step(params, [_arrays(2), grads])
    assert refused.value.field == "gradients.b"
    _assert_unchanged(optimizer, params, snapshot)


def test_huge_but_finite_values_pass_the_check():
    # squares of these overflow, so the quick sum-of-squares test cannot decide: the exact one does
    params = {"w": np.full(8, 1e300)}
    before = params["w"].copy()
    Optimizer({"name": "sgd", "lr": 1.0}, params).step(params, [{"w": np.full(8, 1e299)}])
    np.testing.assert_array_equal(params["w"], before - 1e299)
    assert all_finite(np.array([LARGEST, -LARGEST])) and not all_finite(np.array([1.0, np.nan]))
    assert not all_finite(np.array([np.inf])) and all_finite(np.array([]))


def test_a_refused_table_update_keeps_its_version_and_log():
    params = _arrays()
    table = ParameterTable(params, {"name": "sgd", "lr": 1e308})
    part = {"kind": "dense", "grads": {k: v * 10 for k, v in _arrays(1).items()}}
    with pytest.raises(FailedPrecondition):
        table.check([part], 1, 0)
    with pytest.raises(FailedPrecondition):
        table.apply("1", [part], 1, 0)
    assert table.version == 0 and len(table.log) == 0
    np.testing.assert_array_equal(table.params["w"], params["w"])
    small = {"kind": "dense", "grads": {k: v * 1e-310 for k, v in _arrays(1).items()}}
    assert table.apply("1", [small], 1, 0)["version"] == 1  # the same key, now finite: applied


def test_a_learning_rate_beyond_float32_is_refused_at_creation():
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float32")
    with LocalExecutor() as executor:
        with pytest.raises(InvalidArgument) as refused:
            executor.create_trainer(TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 1e308}), params)
        assert refused.value.field == "optimizer.lr" and "float32" in refused.value.message


def _overflowing_bias_params():
    """Parameters whose `logits.bias` sits next to the largest float64: an lr of 1e300 pushes the
    target class's bias past it, while every other parameter's update stays finite."""
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    params["logits.bias"][:] = LARGEST
    return params


@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_no_server_shard_applies_unless_all_stay_finite(consistency):
    x, y = classification_data(24)
    config = TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 1e300}, num_workers=2, ps_shards=2,
                           consistency=consistency)
    with LocalExecutor(num_workers=2) as executor:
        trainer = executor.create_trainer(config, _overflowing_bias_params())
        # the shards split the parameters: fc1.weight (finite update) is not with logits.bias
        assert ["fc1.weight"] in trainer._partition and trainer._partition != [["fc1.weight"]]
        assert_step_refused_changing_nothing(trainer, 1, x, y, "parameters.logits.bias")
        assert trainer.version == 0
        trainer.close()


@pytest.mark.parametrize("ps_shards", [1, 2])
def test_a_loss_that_overflows_is_refused_and_the_next_step_is_the_undisturbed_one(ps_shards):
    params = Model(MSE_SPEC).init_parameters(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    good = [(rng.standard_normal((16, 4)), rng.standard_normal((16, 2))) for _ in range(2)]
    huge = (np.full((16, 4), 1e200), np.zeros((16, 2)))  # finite; its squared error is not
    config = TrainerConfig(MSE_SPEC, {"name": "adam", "lr": 1e-2}, num_workers=2, ps_shards=ps_shards)
    with LocalExecutor(num_workers=2) as executor:
        trainer = executor.create_trainer(config, params)
        trainer.step(1, *good[0])
        with pytest.raises(FailedPrecondition) as refused:
            trainer.step(2, *huge)
        assert refused.value.field == "loss" and "not finite" in refused.value.message
        assert trainer.version == 1
        assert trainer.step(3, *good[1]).version == 2
        _, after = trainer.parameters()

        undisturbed = executor.create_trainer(config, params)
        undisturbed.step(1, *good[0])
        undisturbed.step(3, *good[1])
        for name, value in undisturbed.parameters()[1].items():
            np.testing.assert_array_equal(after[name], value, err_msg=name)
        trainer.close()
        undisturbed.close()


def test_top_k_refuses_an_overflow_before_it_enters_the_residual():
    params = Model(MSE_SPEC).init_parameters(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    good = [(rng.standard_normal((16, 4)), rng.standard_normal((16, 2))) for _ in range(2)]
    config = TrainerConfig(MSE_SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1, compression="topk",
                           topk_fraction=0.5)
    with LocalExecutor(num_workers=1) as executor:
        trainer = executor.create_trainer(config, params)
        trainer.step(1, *good[0])  # leaves residuals: what top-k did not send
        with pytest.raises(FailedPrecondition) as refused:
            trainer.step(2, np.full((16, 4), 1e200), np.zeros((16, 2)))
        assert refused.value.field == "loss"
        residuals = [value for worker in executor._backend.workers(1)
                     for feedback in worker._feedback.values() for value in feedback.residuals.values()]
        assert residuals and all(all_finite(value) for value in residuals)
        assert trainer.step(3, *good[1]).version == 2
        trainer.close()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_bound_that_skips_the_dry_run_never_lets_an_overflow_through(name, dtype):
    """The check skips its dry run where a norm bound proves every value stays finite: wherever it
    does, the real update must come out finite, and near the dtype's edge it must defer."""
    largest = float(np.finfo(dtype).max)
    rng = np.random.default_rng(1)
    proved, deferred = 0, 0
    for trial in range(200):
        exponent = rng.uniform(-6, np.log10(largest))
        params = {"w": (rng.standard_normal(64) * 10.0 ** rng.uniform(-3, np.log10(largest) - 2)).astype(dtype)}
        grads = {"w": (rng.standard_normal(64) * 10.0 ** exponent).astype(dtype)}
        config = {"name": name, "lr": float(10.0 ** rng.uniform(-4, 2)), "weight_decay": float(rng.choice([0.0, 0.1]))}
        optimizer = Optimizer(config, params)
        for _ in range(int(rng.integers(0, 3))):  # some state to bound as well
            with np.errstate(all="ignore"):
                try:
                    optimizer.step(params, [{"w": (grads["w"] * 1e-3).astype(dtype)}])
                except FailedPrecondition:
                    pass
        plan = optimizer._plan([grads], 1.0, None)
        if not provably_finite(optimizer.config, params["w"], [grads["w"]], optimizer.state["w"], plan):
            deferred += 1
            continue
        proved += 1
        optimizer.step(params, [grads])
        assert all_finite(params["w"]), (trial, config)
        assert all(all_finite(value) for value in optimizer.state["w"].values()), (trial, config)
    assert proved > 20 and deferred > 20, (proved, deferred)  # both sides of the bound were exercised
