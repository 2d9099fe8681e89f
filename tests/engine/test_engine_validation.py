"""Every validation error names the node or field at fault."""

import copy

import numpy as np
import pytest

from engine_testing import make_batch, mlp
from gradserve_services.engine import MAX_NODES, MAX_WIDTH, Model
from gradserve_services.errors import InvalidArgument, SpecError

BASE = mlp([4, 3, 2])  # fc1 -> act1 -> fc2


def spec_with(**changes):
    spec = copy.deepcopy(BASE)
    for node_name, fields in changes.items():
        node = next(n for n in spec["nodes"] if n["name"] == node_name)
        node.update(fields)
    return spec


def assert_spec_error(spec, field, match=None):
    with pytest.raises(SpecError, match=match) as raised:
        Model(spec)
    assert raised.value.field == field
    return raised.value


@pytest.mark.parametrize(
    "changes, field, match",
    [
        ({"act1": {"op": "softplus"}}, "act1", "unknown op"),
        ({"act1": {"op": ["relu"]}}, "act1", "unknown op"),
        ({"act1": {"inputs": "fc1"}}, "act1", "list of node names"),
        ({"act1": {"inputs": ["nowhere"]}}, "act1", "not a node"),
        ({"act1": {"inputs": []}}, "act1", "exactly 1"),
        ({"act1": {"inputs": ["fc1", "fc1"]}}, "act1", "exactly 1"),
        ({"fc2": {"units": 0}}, "fc2", "outside"),
        ({"fc2": {"units": MAX_WIDTH + 1}}, "fc2", "outside"),
        ({"fc2": {"units": 2.5}}, "fc2", "integer"),
        ({"fc2": {"units": True}}, "fc2", "int"),
        ({"fc1": {"bias": "yes"}}, "fc1", "bool"),
        ({"fc1": {"stride": 2}}, "fc1", "no attribute"),
        ({"act1": {"op": "leaky_relu", "alpha": float("nan")}}, "act1", "finite"),
        ({"act1": {"op": "dropout", "rate": 1.0}}, "act1", "outside"),
        ({"act1": {"op": "dropout"}}, "act1", "needs attribute 'rate'"),
        ({"act1": {"op": "layernorm", "eps": 0}}, "act1", "outside"),
        ({"fc2": {"name": "input"}}, "input", "reserved"),
        ({"fc2": {"name": "fc1"}}, "fc1", "twice"),
    ],
)
def test_node_errors_name_the_node(changes, field, match):
    assert_spec_error(spec_with(**changes), field, match)


def test_missing_units_and_missing_inputs_key():
    spec = copy.deepcopy(BASE)
    del spec["nodes"][0]["units"]
    assert_spec_error(spec, "fc1", "needs attribute 'units'")
    spec = copy.deepcopy(BASE)
    del spec["nodes"][1]["inputs"]
    assert_spec_error(spec, "act1", "inputs")


def test_cycle_names_a_node_on_the_cycle():
    spec = {
        "input_features": 3,
        "nodes": [
            {"name": "a", "op": "dense", "inputs": ["input"], "units": 2},
            {"name": "b", "op": "add", "inputs": ["a", "d"]},
            {"name": "c", "op": "relu", "inputs": ["b"]},
            {"name": "d", "op": "tanh", "inputs": ["c"]},
            {"name": "out", "op": "dense", "inputs": ["d"], "units": 2},
        ],
        "output": "out",
        "loss": "mse",
    }
    error = assert_spec_error(spec, "b", "cycle")
    assert error.field in {"b", "c", "d"}
    self_loop = spec_with(act1={"inputs": ["act1"]})
    assert_spec_error(self_loop, "act1", "cycle")


def test_shape_mismatch_in_add_names_the_node():
    spec = {
        "input_features": 3,
        "nodes": [
            {"name": "a", "op": "dense", "inputs": ["input"], "units": 2},
            {"name": "sum", "op": "add", "inputs": ["a", "input"]},
        ],
        "output": "sum",
        "loss": "mse",
    }
    assert_spec_error(spec, "sum", "equal width")
    spec["nodes"][1] = {"name": "sum", "op": "add", "inputs": ["a"]}
    assert_spec_error(spec, "sum", "at least 2")


def test_dangling_node_and_top_level_errors():
    spec = copy.deepcopy(BASE)
    spec["nodes"].append({"name": "unused", "op": "relu", "inputs": ["fc1"]})
    assert_spec_error(spec, "unused", "does not feed")
    assert_spec_error({**BASE, "output": "nope"}, "output")
    assert_spec_error({**BASE, "loss": "hinge"}, "loss", "unknown loss")
    assert_spec_error({**BASE, "loss": ["mse"]}, "loss", "unknown loss")
    assert_spec_error({**BASE, "output": ["fc2"]}, "output")
    assert_spec_error({**BASE, "nodes": [{"op": "relu", "inputs": ["input"]}]}, "nodes[0]", "name")
    assert_spec_error({**BASE, "nodes": ["fc1"]}, "nodes[0]", "mapping")
    assert_spec_error({**BASE, "input_features": 0}, "input_features")
    assert_spec_error({**BASE, "input_features": "4"}, "input_features")
    assert_spec_error({**BASE, "nodes": []}, "nodes")
    assert_spec_error({**BASE, "extra": 1}, "extra", "unknown key")
    with pytest.raises(SpecError) as raised:
        Model(["not", "a", "mapping"])
    assert raised.value.field == "spec"


def test_absurd_sizes_are_rejected():
    chain = [{"name": f"n{i}", "op": "relu", "inputs": [f"n{i - 1}" if i else "input"]} for i in range(MAX_NODES + 1)]
    assert_spec_error({"input_features": 2, "nodes": chain, "output": f"n{MAX_NODES}", "loss": "mse"}, "nodes")
    wide = {
        "input_features": 1 << 19,
        "nodes": [{"name": "wide", "op": "concat", "inputs": ["input", "input", "input"]}],
        "output": "wide",
        "loss": "mse",
    }
    assert_spec_error(wide, "wide", "width")
    huge = {
        "input_features": 1 << 20,
        "nodes": [{"name": "big", "op": "dense", "inputs": ["input"], "units": 1 << 12}],
        "output": "big",
        "loss": "mse",
    }
    assert_spec_error(huge, "big", "parameter elements")


@pytest.fixture
def model_params_batch():
    model = Model(BASE)
    params = model.init_parameters(dtype="float32")
    x, y = make_batch(BASE, 5, dtype="float32")
    return model, params, x, y


def assert_invalid(call, field, match=None):
    with pytest.raises(InvalidArgument, match=match) as raised:
        call()
    assert raised.value.field == field
    assert not isinstance(raised.value, SpecError)


def test_parameter_errors_name_the_parameter(model_params_batch):
    model, params, x, y = model_params_batch
    missing = {k: v for k, v in params.items() if k != "fc2.bias"}
    assert_invalid(lambda: model.loss_and_grad(missing, x, y), "parameters.fc2.bias", "missing")
    extra = {**params, "fc3.weight": np.zeros((2, 2), np.float32)}
    assert_invalid(lambda: model.loss_and_grad(extra, x, y), "parameters.fc3.weight", "not a parameter")
    wrong_shape = {**params, "fc1.weight": np.zeros((3, 4), np.float32)}
    assert_invalid(lambda: model.loss_and_grad(wrong_shape, x, y), "parameters.fc1.weight", "shape")
    integer = {**params, "fc1.bias": np.zeros(3, np.int64)}
    assert_invalid(lambda: model.loss_and_grad(integer, x, y), "parameters.fc1.bias", "dtype")
    mixed = {**params, "fc2.weight": params["fc2.weight"].astype(np.float64)}
    assert_invalid(lambda: model.loss_and_grad(mixed, x, y), "parameters.fc2.weight", "differs")
    listed = {**params, "fc2.bias": [0.0, 0.0]}
    assert_invalid(lambda: model.loss_and_grad(listed, x, y), "parameters.fc2.bias", "array")
    assert_invalid(lambda: model.loss_and_grad([1, 2], x, y), "parameters")


def test_non_finite_parameters_are_named(model_params_batch):
    model, params, x, y = model_params_batch
    poisoned = {**params, "fc2.weight": params["fc2.weight"].copy()}
    poisoned["fc2.weight"][1, 0] = np.nan
    assert_invalid(lambda: model.validate_parameters(poisoned), "parameters.fc2.weight", "NaN")
    # The compute path does not scan weights every step, but names them once the loss goes bad.
    assert_invalid(lambda: model.loss_and_grad(poisoned, x, y), "parameters.fc2.weight", "NaN")
    infinite = {**params, "fc1.bias": np.full(3, np.inf, np.float32)}
    assert_invalid(lambda: model.validate_parameters(infinite), "parameters.fc1.bias")


def test_batch_x_errors(model_params_batch):
    model, params, x, y = model_params_batch
    assert_invalid(lambda: model.loss_and_grad(params, x[:, :3], y), "batch.x", "shape")
    assert_invalid(lambda: model.loss_and_grad(params, x[0], y), "batch.x", "shape")
    assert_invalid(lambda: model.loss_and_grad(params, x[:0], y[:0]), "batch.x", "empty")
    assert_invalid(lambda: model.loss_and_grad(params, x.astype(np.float64), y), "batch.x", "differs")
    assert_invalid(lambda: model.loss_and_grad(params, x.astype(np.int32), y), "batch.x", "dtype")
    assert_invalid(lambda: model.loss_and_grad(params, x.tolist(), y), "batch.x", "array")
    bad = x.copy()
    bad[2, 1] = np.inf
    assert_invalid(lambda: model.loss_and_grad(params, bad, y), "batch.x", "NaN or infinity")
    assert_invalid(lambda: model.forward(params, bad), "batch.x")


def test_label_errors(model_params_batch):
    model, params, x, y = model_params_batch
    assert_invalid(lambda: model.loss_and_grad(params, x, y.astype(np.float32)), "batch.y", "integers")
    assert_invalid(lambda: model.loss_and_grad(params, x, np.array([0, 1, 2, 0, 1])), "batch.y", r"\[0, 2\)")
    assert_invalid(lambda: model.loss_and_grad(params, x, np.array([0, 1, -1, 0, 1])), "batch.y", "lie in")
    assert_invalid(lambda: model.loss_and_grad(params, x, y[:4]), "batch.y", "shape")
    assert_invalid(lambda: model.loss_and_grad(params, x, None), "batch.y", "required")


@pytest.mark.parametrize("loss", ["binary_cross_entropy", "mse"])
def test_float_target_errors(loss):
    spec = mlp([4, 3], loss=loss)
    model = Model(spec)
    params = model.init_parameters(dtype="float64")
    x, y = make_batch(spec, 5)
    assert_invalid(lambda: model.loss_and_grad(params, x, y[:, :2]), "batch.y", "shape")
    assert_invalid(lambda: model.loss_and_grad(params, x, (y * 10).astype(np.int64)), "batch.y", "floating")
    bad = y.copy()
    bad[0, 0] = np.nan
    assert_invalid(lambda: model.loss_and_grad(params, x, bad), "batch.y", "NaN")
    if loss == "binary_cross_entropy":
        assert_invalid(lambda: model.loss_and_grad(params, x, y + 1.5), "batch.y", r"\[0, 1\]")


def test_option_and_tangent_errors(model_params_batch):
    model, params, x, y = model_params_batch
    assert_invalid(lambda: model.loss_and_grad(params, x, y, micro_batch_size=0), "micro_batch_size")
    assert_invalid(lambda: model.loss_and_grad(params, x, y, sample_offset=-1), "sample_offset")
    assert_invalid(lambda: model.loss_and_grad(params, x, y, seed="a"), "seed")
    tangent = {k: np.zeros_like(v) for k, v in params.items()}
    del tangent["fc1.bias"]
    assert_invalid(lambda: model.jvp(params, tangent, x, y), "tangent.fc1.bias", "missing")
    tangent64 = {k: np.zeros(v.shape, np.float64) for k, v in params.items()}
    assert_invalid(lambda: model.jvp(params, tangent64, x, y), "tangent", "differs")
    assert_invalid(lambda: model.init_parameters(dtype="float16"), "dtype")


def test_a_protobuf_model_spec_is_read_like_the_dict():
    model_pb2 = pytest.importorskip("gradserve.v1.model_pb2")  # the client SDK's generated messages
    spec = model_pb2.ModelSpec(
        input_features=4,
        nodes=[
            model_pb2.Node(name="fc", op="dense", inputs=["input"], units=3, bias=False),
            model_pb2.Node(name="drop", op="dropout", inputs=["fc"], rate=0.25),
        ],
        output="drop",
        loss="softmax_cross_entropy",
    )
    model = Model(spec)
    assert model.parameter_shapes() == {"fc.weight": (4, 3)}
    assert dict(model.graph.nodes[1].attrs) == {"rate": 0.25}
    spec.nodes[0].ClearField("units")
    assert_spec_error(spec, "fc", "units")


def test_a_model_without_parameters_has_an_empty_gradient():
    spec = {"input_features": 3, "nodes": [{"name": "act", "op": "tanh", "inputs": ["input"]}],
            "output": "act", "loss": "mse"}
    model = Model(spec)
    x, y = make_batch(spec, 4)
    loss, grads = model.loss_and_grad({}, x, y)
    assert grads == {} and loss == pytest.approx(float(np.mean((np.tanh(x) - y) ** 2)))
    assert model.jvp({}, {}, x, y)[1] == 0.0
