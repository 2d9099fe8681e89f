"""describe_model and the catalogues: every op and loss described, parameter names and shapes as
the model makes them, the documented layouts true of the forward pass, FLOPs and bytes counted."""

import math

import numpy as np
import pytest

from engine_testing import dlrm_spec, mlp, residual_concat_dag
from gradserve_services.engine import LOSSES, OPS, Model
from gradserve_services.engine.describe import (
    LOSS_TARGETS,
    PARAMETER_LAYOUTS,
    describe_model,
    loss_catalogue,
    op_catalogue,
)
from gradserve_services.errors import SpecError


@pytest.mark.parametrize("spec", [mlp([6, 8, 4]), residual_concat_dag(dropout_rate=0.2), dlrm_spec()],
                         ids=["mlp", "dag", "dlrm"])
def test_parameters_are_the_models_in_its_order(spec):
    model = Model(spec)
    described = describe_model(spec, "float64")
    assert [(p["name"], p["shape"]) for p in described["parameters"]] == list(model.parameter_shapes().items())
    assert described["parameter_count"] == sum(math.prod(s) for s in model.parameter_shapes().values())
    assert described["parameter_bytes"] == 8 * described["parameter_count"]
    assert {p["name"] for p in described["parameters"] if p["table"]} == set(model.graph.tables)
    assert [n["name"] for n in described["nodes"]] == [node.name for node in model.graph.nodes]
    assert described["output_width"] == model.graph.widths[model.graph.output]


def test_every_op_and_loss_is_described():
    catalogue = {op["name"]: op for op in op_catalogue()}
    assert list(catalogue) == list(OPS)
    assert [loss["name"] for loss in loss_catalogue()] == list(LOSSES) == list(LOSS_TARGETS)
    assert {kind for kind, _ in PARAMETER_LAYOUTS} <= set(OPS)
    dense = catalogue["dense"]
    units = next(a for a in dense["attributes"] if a["name"] == "units")
    assert units["required"] and units["low"] == 1 and units["type"] == "int"
    rate = next(a for a in catalogue["dropout"]["attributes"] if a["name"] == "rate")
    assert rate["high"] == 1 and not rate["high_inclusive"]
    mode = next(a for a in catalogue["embedding_bag"]["attributes"] if a["name"] == "mode")
    assert mode["choices"] == ["sum", "mean"] and mode["default"] == "sum"
    assert catalogue["add"]["max_inputs"] == 0 and catalogue["add"]["min_inputs"] == 2


def test_every_parameter_every_op_makes_has_a_layout_and_a_flop_count():
    """A spec per op (the catalogue's own test specs) describes without a missing table entry."""
    for spec in (mlp([4, 5, 3], activation=name) for name in ("relu", "tanh", "sigmoid", "gelu", "leaky_relu")):
        assert describe_model(spec)["forward_flops_per_row"] > 0
    for spec in (residual_concat_dag(dropout_rate=0.1), dlrm_spec()):
        described = describe_model(spec)
        assert all(p["layout"] for p in described["parameters"])
    layernorm = {"input_features": 3, "nodes": [{"name": "ln", "op": "layernorm", "inputs": ["input"]}],
                 "output": "ln", "loss": "mse"}
    assert [p["layout"] for p in describe_model(layernorm)["parameters"]] == [
        PARAMETER_LAYOUTS["layernorm", "weight"], PARAMETER_LAYOUTS["layernorm", "bias"]]


def test_dense_layout_is_what_the_forward_computes():
    """The documented layout: out = x @ weight + bias with weight (in, units)."""
    spec = mlp([5, 3])
    model = Model(spec)
    params = model.init_parameters(seed=3, dtype="float64")
    (name, weight), (_, bias) = [(p["name"], params[p["name"]]) for p in describe_model(spec)["parameters"]]
    assert weight.shape == (5, 3)
    x = np.random.default_rng(0).standard_normal((4, 5))
    np.testing.assert_allclose(model.forward(params, x), x @ weight + bias, rtol=1e-12)


def test_flops_and_activation_bytes_of_an_mlp():
    described = describe_model(mlp([64, 128, 10]), "float32")
    assert described["forward_flops_per_row"] == (2 * 64 * 128 + 128) + 128 + (2 * 128 * 10 + 10)
    # dense layers: dL/dw (as many FLOPs as the forward product); dL/dx only past the first layer
    assert described["backward_flops_per_row"] == (2 * 64 * 128 + 128) + 2 * 128 + (2 * 128 * 10 + 10) \
        + 2 * 128 * 10
    assert described["activation_bytes_per_row"] == 4 * (64 + 128 + 128 + 10)
    assert described["loss_targets"].startswith("int64")


def test_a_bad_spec_is_named():
    with pytest.raises(SpecError) as refused:
        describe_model({"input_features": 3, "nodes": [{"name": "a", "op": "dense", "inputs": ["input"]}],
                        "output": "a", "loss": "mse"})
    assert refused.value.field == "a"
