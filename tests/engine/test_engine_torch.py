"""The same graphs in PyTorch autograd: loss and every gradient within 1e-5 relative (float32)."""

import numpy as np
import pytest

from engine_testing import (
    ACTIVATIONS,
    LOSS_NAMES,
    make_batch,
    mlp,
    one_op,
    random_params,
    relative_error,
    residual_concat_dag,
    torch_loss_and_grads,
)
from gradserve_services.engine import Model

TOLERANCE = 1e-5


def compare(spec, rows=16, dtype="float32", **pass_options):
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    x, y = make_batch(spec, rows, dtype=dtype)
    loss, grads = model.loss_and_grad(params, x, y, **pass_options)
    expected_loss, expected_grads = torch_loss_and_grads(spec, params, x, y, **pass_options)
    assert abs(loss - expected_loss) <= TOLERANCE * abs(expected_loss)
    assert list(grads) == list(expected_grads)
    for name, grad in grads.items():
        assert grad.dtype == params[name].dtype and grad.shape == params[name].shape
        assert relative_error(grad, expected_grads[name]) <= TOLERANCE, name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_match_torch(activation):
    compare(one_op(activation))


def test_layernorm_and_leaky_relu_attributes_match_torch():
    compare(one_op("layernorm", eps=1e-3))
    compare(one_op("leaky_relu", alpha=0.2))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_losses_match_torch(loss):
    compare(mlp([6, 8, 4], activation="relu", loss=loss))


@pytest.mark.parametrize("train", [True, False])
def test_dag_with_residual_concat_and_dropout_matches_torch(train):
    compare(residual_concat_dag(dropout_rate=0.3), train=train, seed=5, sample_offset=100)


def test_benchmark_sized_mlp_matches_torch():
    compare(mlp([784, 128, 10]), rows=64)


def test_float64_matches_torch_closely():
    spec = residual_concat_dag()
    model = Model(spec)
    params = random_params(model, dtype="float64")
    x, y = make_batch(spec, 9, dtype="float64")
    loss, grads = model.loss_and_grad(params, x, y)
    expected_loss, expected_grads = torch_loss_and_grads(spec, params, x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for name in grads:
        assert relative_error(grads[name], expected_grads[name]) <= 1e-12


def test_extreme_logits_stay_finite_like_torch():
    """Fused, stable losses: logits of +-1e4 give finite losses and gradients, no log(0)."""
    for loss_name in LOSS_NAMES:
        spec = mlp([3, 4], loss=loss_name)
        model = Model(spec)
        params = {"fc1.weight": np.full((3, 4), 1e3, np.float32), "fc1.bias": np.zeros(4, np.float32)}
        params["fc1.weight"][:, 1] = -1e3
        x = np.array([[5.0, 5.0, -3.0], [-4.0, 1.0, 2.0]], np.float32)
        y = np.array([1, 0]) if loss_name == "softmax_cross_entropy" else np.array([[0, 1, 0, 1], [1, 0, 1, 0]], np.float32)
        with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
            loss, grads = model.loss_and_grad(params, x, y)
        expected_loss, expected_grads = torch_loss_and_grads(spec, params, x, y)
        assert np.isfinite(loss) and loss == pytest.approx(expected_loss, rel=1e-5)
        for name in grads:
            assert np.all(np.isfinite(grads[name]))
            assert relative_error(grads[name], expected_grads[name]) <= 1e-5
