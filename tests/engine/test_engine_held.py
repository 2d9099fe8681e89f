"""Held forwards: the backward pass of a kept forward equals torch autograd's vector-Jacobian
product, survives other passes of the same model, uses the training-mode dropout masks, and
refuses bad output gradients by name."""

import numpy as np
import pytest

from engine_testing import make_batch, mlp, random_params, residual_concat_dag
from gradserve_services.engine import Model
from gradserve_services.engine.held import backward_held, hold_forward
from gradserve_services.errors import InvalidArgument
from test_engine_vjp import assert_close, torch_vjp


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", [mlp([6, 8, 4], activation="tanh"), residual_concat_dag(dropout_rate=0.3)],
                         ids=["mlp", "dag-dropout"])
def test_backward_of_a_held_forward_equals_torch(spec, dtype):
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    x, _ = make_batch(spec, 12, dtype=dtype)
    held = hold_forward(model, params, x, train=True, seed=7)
    # Other passes of the same model in between overwrite its shared workspace, never the held one.
    other_x, other_y = make_batch(spec, 12, dtype=dtype, seed=5)
    model.forward(params, other_x)
    model.loss_and_grad_sum(params, other_x, other_y)
    output_gradient = np.random.default_rng(1).standard_normal(held.output.shape).astype(dtype)
    answer = backward_held(model, held, output_gradient, input_gradient=True)
    grads = answer.gradients
    expected, expected_inputs = torch_vjp(spec, params, x, output_gradient, train=True, seed=7)
    assert list(grads) == list(expected)
    for name, grad in grads.items():
        assert grad.dtype == np.dtype(dtype)
        assert_close(grad, expected[name], dtype)
    assert list(answer.input_gradients) == ["x"]
    assert_close(answer.input_gradients["x"], expected_inputs["x"], dtype)
    assert backward_held(model, hold_forward(model, params, x), output_gradient).input_gradients is None


def test_held_output_is_the_training_forward():
    spec = residual_concat_dag(dropout_rate=0.5)
    model = Model(spec)
    params = random_params(model)
    x, _ = make_batch(spec, 9)
    held = hold_forward(model, params, x, train=True, seed=3)
    assert np.array_equal(held.output, model.forward(params, x, train=True, seed=3))
    assert not np.array_equal(held.output, model.forward(params, x))  # dropout was on
    assert held.nbytes >= held.output.nbytes + x.nbytes  # activations of every row are kept


def test_softmax_gradient_through_a_held_forward_is_the_step_gradient():
    """dL/d logits of the summed softmax cross-entropy, pulled back through a held forward, is the
    engine's fused-loss gradient sum (itself checked against torch in test_engine_torch)."""
    spec = mlp([5, 7, 3])
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, 10)
    held = hold_forward(model, params, x, train=True, seed=0)
    logits = held.output
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    probabilities[np.arange(10), y] -= 1.0
    grads = backward_held(model, held, probabilities).gradients
    expected = model.loss_and_grad_sum(params, x, y, train=True, seed=0).grad_sum
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 2)), "shape"),
    (np.zeros((4, 3), dtype=np.float32), "dtype"),
    (np.full((4, 3), np.nan), "NaN"),
    (np.full((4, 3), np.inf), "NaN"),
])
def test_bad_output_gradient_is_named(bad, message):
    spec = mlp([5, 3])
    model = Model(spec)
    params = random_params(model)
    x, _ = make_batch(spec, 4)
    held = hold_forward(model, params, x)
    with pytest.raises(InvalidArgument, match=message) as raised:
        backward_held(model, held, bad)
    assert raised.value.field == "output_gradient"
