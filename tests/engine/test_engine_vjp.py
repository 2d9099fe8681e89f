"""vjp: exactly the vector-Jacobian product of a given output gradient (torch autograd, finite
differences), summed over micro-batches; forward_nodes; bad output gradients named."""

import numpy as np
import pytest

from engine_testing import (
    _torch_op,
    dlrm_spec,
    make_batch,
    make_named_batch,
    mlp,
    norms_close,
    random_params,
    residual_concat_dag,
    torch_inputs,
)
from gradserve_services.engine import Model, dense_gradients, parse_spec
from gradserve_services.engine.vjp import forward_nodes, vjp
from gradserve_services.errors import InvalidArgument

TOLERANCE = {"float32": 1e-6, "float64": 1e-10}


def torch_vjp(spec, params, x, output_gradient, *, train=False, seed=0):
    """<output_gradient, f(x)> differentiated by torch: (param grads, float input grads)."""
    import torch
    import torch.nn.functional as F

    graph = parse_spec(spec)
    weights = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    values = torch_inputs(graph, x, torch)
    float_inputs = [decl for decl in graph.inputs.values() if decl.kind == "float"]
    for decl in float_inputs:
        values[decl.name] = values[decl.name].clone().requires_grad_(True)
    dtype = next(iter(params.values())).dtype
    for node in graph.nodes:
        values[node.name] = _torch_op(node, [values[s] for s in node.inputs], weights, train, seed, 0, dtype, torch, F)
    (values[graph.output] * torch.from_numpy(output_gradient)).sum().backward()
    input_grads = {decl.tensor: values[decl.name].grad.numpy() for decl in float_inputs}
    return {name: w.grad.numpy() for name, w in weights.items()}, input_grads


def assert_close(actual, expected, dtype):
    # Norm-wise (an entry that cancels to ~0 comes out of torch as rounding noise).
    assert norms_close(actual, expected, TOLERANCE[dtype], atol=TOLERANCE[dtype] * 1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", [mlp([6, 8, 4], activation="tanh"), residual_concat_dag()], ids=["mlp", "dag"])
def test_vjp_equals_torch_autograd(spec, dtype):
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    x, _ = make_batch(spec, 12, dtype=dtype)
    rng = np.random.default_rng(1)
    output_gradient = rng.standard_normal((12, model.graph.widths[model.graph.output])).astype(dtype)
    result = vjp(model, params, x, output_gradient, input_gradient=True)
    expected, expected_inputs = torch_vjp(spec, params, x, output_gradient)
    assert list(result.gradients) == list(expected)
    for name, grad in result.gradients.items():
        assert grad.dtype == np.dtype(dtype)
        assert_close(grad, expected[name], dtype)
    assert list(result.input_gradients) == ["x"]
    assert result.input_gradients["x"].shape == x.shape and result.input_gradients["x"].dtype == np.dtype(dtype)
    assert_close(result.input_gradients["x"], expected_inputs["x"], dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vjp_named_inputs_equals_torch(dtype):
    spec = dlrm_spec()
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    tensors, _ = make_named_batch(spec, 10, dtype=dtype)
    output_gradient = np.random.default_rng(2).standard_normal((10, 1)).astype(dtype)
    result = vjp(model, params, tensors, output_gradient, input_gradient=True)
    expected, expected_inputs = torch_vjp(spec, params, tensors, output_gradient)
    for name, grad in dense_gradients(result.gradients).items():
        assert_close(grad, expected[name], dtype)
    assert list(result.input_gradients) == ["dense"]  # ids and bags are not differentiable
    assert_close(result.input_gradients["dense"], expected_inputs["dense"], dtype)


def test_vjp_equals_finite_differences():
    spec = residual_concat_dag()
    model = Model(spec)
    params = random_params(model, dtype="float64")
    x, _ = make_batch(spec, 5, dtype="float64")
    output_gradient = np.random.default_rng(3).standard_normal((5, 3))
    result = vjp(model, params, x, output_gradient, input_gradient=True)

    def scalar(p, inputs):
        return float(np.vdot(output_gradient, model.forward(p, inputs)))

    step = 1e-6
    for index in [(0, 0), (2, 4), (4, 1)]:
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        numeric = (scalar(params, plus) - scalar(params, minus)) / (2 * step)
        assert abs(result.input_gradients["x"][index] - numeric) <= 1e-6 * max(1.0, abs(numeric))
    weight = "fc1.weight"
    for index in [(0, 0), (3, 2)]:
        plus, minus = dict(params), dict(params)
        plus[weight], minus[weight] = params[weight].copy(), params[weight].copy()
        plus[weight][index] += step
        minus[weight][index] -= step
        numeric = (scalar(plus, x) - scalar(minus, x)) / (2 * step)
        assert abs(result.gradients[weight][index] - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_vjp_is_not_averaged_and_micro_batches_sum():
    spec = mlp([6, 8, 4])
    model = Model(spec)
    params = random_params(model)
    x, _ = make_batch(spec, 11)
    output_gradient = np.random.default_rng(4).standard_normal((11, 4))
    whole = vjp(model, params, x, output_gradient, input_gradient=True)
    for micro in (1, 3, 4):
        parts = vjp(model, params, x, output_gradient, input_gradient=True, micro_batch_size=micro)
        for name in whole.gradients:
            assert norms_close(parts.gradients[name], whole.gradients[name], 1e-12)
        assert norms_close(parts.input_gradients["x"], whole.input_gradients["x"], 1e-12)
    # Doubling the batch (the same rows twice) doubles the parameter gradients: a sum, not a mean.
    twice = vjp(model, params, np.concatenate([x, x]), np.concatenate([output_gradient, output_gradient]))
    for name in whole.gradients:
        assert norms_close(twice.gradients[name], 2 * whole.gradients[name], 1e-12)
    assert twice.input_gradients is None


def test_vjp_of_a_mean_loss_gradient_is_loss_and_grad():
    spec = mlp([6, 8, 4], loss="mse")
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, 9)
    out = model.forward(params, x)
    output_gradient = 2 * (out - y) / out.size  # d/d out of mean((out - y)^2)
    result = vjp(model, params, x, output_gradient, train=True)
    _, grads = model.loss_and_grad(params, x, y)
    for name in grads:
        assert norms_close(result.gradients[name], grads[name], 1e-10)


@pytest.mark.parametrize(
    "make_bad, needle",
    [
        (lambda g: g[:, :3], "shape"),
        (lambda g: g.astype(np.float32), "dtype"),
        (lambda g: np.where(np.arange(g.size).reshape(g.shape) == 5, np.nan, g), "NaN"),
        (lambda g: np.where(np.arange(g.size).reshape(g.shape) == 2, np.inf, g), "NaN"),
        (lambda g: g.tolist(), "array"),
    ],
)
def test_bad_output_gradient_is_named(make_bad, needle):
    spec = mlp([6, 8, 4])
    model = Model(spec)
    params = random_params(model)
    x, _ = make_batch(spec, 4)
    with pytest.raises(InvalidArgument) as raised:
        vjp(model, params, x, make_bad(np.ones((4, 4))))
    assert raised.value.field == "output_gradient" and needle in str(raised.value)


def test_forward_nodes():
    spec = residual_concat_dag()
    model = Model(spec)
    params = random_params(model)
    x, _ = make_batch(spec, 3)
    values = forward_nodes(model, params, x, ["fc1", "head"])
    assert list(values) == ["fc1", "head"]
    assert norms_close(values["fc1"], x @ params["fc1.weight"] + params["fc1.bias"], 1e-14)
    assert np.array_equal(values["head"], model.forward(params, x))
    assert list(forward_nodes(model, params, x)) == ["head"]
    with pytest.raises(InvalidArgument) as raised:
        forward_nodes(model, params, x, ["head", "nope"])
    assert raised.value.field == "nodes[1]"
