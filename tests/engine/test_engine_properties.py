"""Property-based: random layer sizes, batch sizes and DAGs against PyTorch and finite differences."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_testing import (
    ACTIVATIONS,
    LOSS_NAMES,
    make_batch,
    mlp,
    random_params,
    norms_close,
    torch_loss_and_grads,
)
from gradserve_services.engine import Model, gradcheck

UNARY = ("dense",) + ACTIVATIONS + ("layernorm", "dropout")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def dag_specs(draw):
    """A random DAG: each node reads earlier nodes (or the input); everything left unconsumed is
    concatenated into the head, so every node feeds the output."""
    input_features = draw(st.integers(1, 6))
    widths = {"input": input_features}
    nodes, consumed = [], set()
    for index in range(draw(st.integers(1, 7))):
        name = f"n{index}"
        op = draw(st.sampled_from(UNARY + ("add", "concat")))
        sources = list(widths)
        if op == "concat":
            inputs = draw(st.lists(st.sampled_from(sources), min_size=2, max_size=4))
            width = sum(widths[s] for s in inputs)
        elif op == "add":
            first = draw(st.sampled_from(sources))
            same = [s for s in sources if widths[s] == widths[first]]
            inputs = [first] + draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
            width = widths[first]
        else:
            inputs = [draw(st.sampled_from(sources))]
            width = widths[inputs[0]]
        node = {"name": name, "op": op, "inputs": inputs}
        if op == "dense":
            node["units"] = width = draw(st.integers(1, 6))
        elif op == "dropout":
            node["rate"] = draw(st.sampled_from([0.0, 0.3, 0.6]))
        elif op == "leaky_relu":
            node["alpha"] = draw(st.sampled_from([0.01, 0.2]))
        nodes.append(node)
        consumed.update(inputs)
        widths[name] = width
    sinks = [n["name"] for n in nodes if n["name"] not in consumed]
    head_input = sinks[0]
    if len(sinks) > 1:
        nodes.append({"name": "sinks", "op": "concat", "inputs": sinks})
        head_input = "sinks"
    outputs = draw(st.integers(1, 4))
    nodes.append({"name": "head", "op": "dense", "inputs": [head_input], "units": outputs})
    loss = draw(st.sampled_from(LOSS_NAMES))
    nodes = draw(st.permutations(nodes))  # listed order must not matter
    return {"input_features": input_features, "nodes": nodes, "output": "head", "loss": loss}


@FAST
@given(
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=5),
    rows=st.integers(1, 20),
    activation=st.sampled_from(ACTIVATIONS),
    loss=st.sampled_from(LOSS_NAMES),
)
def test_random_mlps_match_torch(sizes, rows, activation, loss):
    spec = mlp(sizes, activation=activation, loss=loss)
    model = Model(spec)
    params = random_params(model, seed=rows)
    x, y = make_batch(spec, rows, seed=len(sizes))
    mean_loss, grads = model.loss_and_grad(params, x, y)
    expected_loss, expected = torch_loss_and_grads(spec, params, x, y)
    assert abs(mean_loss - expected_loss) <= 1e-10 * max(abs(expected_loss), 1e-12)
    for name in grads:
        assert norms_close(grads[name], expected[name], rtol=1e-9), name


@FAST
@given(spec=dag_specs(), rows=st.integers(1, 9), train=st.booleans(), seed=st.integers(0, 5))
def test_random_dags_match_torch_and_accumulate_exactly(spec, rows, train, seed):
    model = Model(spec)
    params = random_params(model, seed=seed)
    x, y = make_batch(spec, rows, seed=seed)
    options = dict(train=train, seed=seed, sample_offset=3)
    mean_loss, grads = model.loss_and_grad(params, x, y, **options)
    expected_loss, expected = torch_loss_and_grads(spec, params, x, y, **options)
    assert abs(mean_loss - expected_loss) <= 1e-9 * max(abs(expected_loss), 1e-9)
    for name in grads:
        assert norms_close(grads[name], expected[name], rtol=1e-8), name
    summed = model.loss_and_grad_sum(params, x, y, micro_batch_size=2, **options)
    for name in grads:
        assert norms_close(summed.grad_sum[name] / rows, grads[name], rtol=1e-10)
    tangent = random_params(model, seed=seed + 1)
    _, derivative = model.jvp(params, tangent, x, y, micro_batch_size=3, **options)
    expected_derivative = sum(float(np.vdot(grads[n], tangent[n])) for n in grads)
    assert abs(derivative - expected_derivative) <= 1e-9 * max(1.0, abs(expected_derivative))


@settings(max_examples=20, deadline=None)
@given(spec=dag_specs(), rows=st.integers(1, 5), seed=st.integers(0, 3))
def test_random_dags_match_finite_differences(spec, rows, seed):
    model = Model(spec)
    params = random_params(model, seed=seed)
    x, y = make_batch(spec, rows, seed=seed)
    report = gradcheck(model, params, x, y, train=True, seed=seed, rtol=1e-4, atol=1e-7)
    assert report.ok, report.worst
