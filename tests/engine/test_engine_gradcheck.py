"""Every op, every loss and a DAG with fan-out against central finite differences (float64)."""

import pytest

from engine_testing import ACTIVATIONS, LOSS_NAMES, make_batch, mlp, one_op, random_params, residual_concat_dag
from gradserve_services.engine import Model, gradcheck


def check(spec, rows=6, **pass_options):
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, rows)
    report = gradcheck(model, params, x, y, **pass_options)
    assert report.ok, report.worst
    return report


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_gradients_match_finite_differences(activation):
    check(one_op(activation))


def test_leaky_relu_with_a_large_slope():
    check(one_op("leaky_relu", alpha=0.3))


def test_layernorm_gradients_match_finite_differences():
    check(one_op("layernorm", eps=1e-3))


def test_dense_without_bias():
    spec = one_op("tanh")
    spec["nodes"][0]["bias"] = False
    report = check(spec)
    assert "fc1.bias" not in report.analytic


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_loss_gradients_match_finite_differences(loss):
    check(mlp([4, 5, 3], activation="tanh", loss=loss))


def test_dag_with_residual_add_and_concat_reusing_a_node_three_times():
    check(residual_concat_dag())


def test_add_and_concat_of_the_same_input():
    spec = {
        "input_features": 3,
        "nodes": [
            {"name": "fc", "op": "dense", "inputs": ["input"], "units": 2},
            {"name": "twice", "op": "add", "inputs": ["fc", "fc", "fc"]},
            {"name": "cat", "op": "concat", "inputs": ["twice", "fc", "twice"]},
            {"name": "head", "op": "dense", "inputs": ["cat"], "units": 2},
        ],
        "output": "head",
        "loss": "mse",
    }
    check(spec)


@pytest.mark.parametrize("train", [True, False])
def test_dropout_with_its_fixed_mask_and_in_eval_mode(train):
    check(one_op("dropout", rate=0.4), rows=8, train=train, seed=7)
    check(residual_concat_dag(dropout_rate=0.5), rows=8, train=train, seed=3)


def test_dropout_in_training_changes_the_loss_and_eval_does_not():
    spec = one_op("dropout", rate=0.5)
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, 8)
    train_a = model.loss_and_grad(params, x, y, train=True, seed=1)[0]
    train_b = model.loss_and_grad(params, x, y, train=True, seed=2)[0]
    eval_loss = model.loss_and_grad(params, x, y, train=False, seed=1)[0]
    assert train_a != train_b
    assert eval_loss == model.loss_and_grad(params, x, y, train=False, seed=2)[0]
