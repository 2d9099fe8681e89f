"""Named inputs: spec errors name the input or node; batch errors name the tensor `batch.<tensor>`,
and a rejected batch leaves the parameters as they were."""

import copy

import numpy as np
import pytest

from engine_testing import dlrm_spec, make_named_batch, mlp, random_params
from gradserve_services.engine import Batch, Model, SparseRows
from gradserve_services.errors import InvalidArgument, SpecError

SPEC = dlrm_spec()  # inputs: dense (float 3), cats (ids, 2 fields: tables of 7 and 5), tags (weighted bag, 6), items (bag, 9)


def assert_spec_error(spec, field, match):
    with pytest.raises(SpecError, match=match) as raised:
        Model(spec)
    assert raised.value.field == field


def changed(inputs=None, **node_changes):
    spec = copy.deepcopy(SPEC)
    for index, fields in (inputs or {}).items():
        spec["inputs"][index].update(fields)
    for name, fields in node_changes.items():
        next(node for node in spec["nodes"] if node["name"] == name).update(fields)
    return spec


@pytest.mark.parametrize(
    "spec, field, match",
    [
        (changed({0: {"kind": "dense"}}), "dense", "unknown input kind"),
        (changed({0: {"features": 0}}), "dense", "outside"),
        (changed({1: {"fields": "2"}}), "cats", "integer"),
        (changed({2: {"weighted": 1}}), "tags", "bool"),
        (changed({1: {"features": 2}}), "cats", "no key 'features'"),
        (changed({0: {"name": "a.b"}}), "inputs[0]", "without '.'"),
        (changed({0: {"name": "input"}}), "input", "reserved"),
        (changed({1: {"name": "dense"}}), "dense", "twice"),
        (changed(bot1={"inputs": ["cats"]}), "bot1", "reads float inputs; 'cats' holds ids"),
        (changed(emb0={"inputs": ["bot2"]}), "emb0", "reads ids inputs; 'bot2' holds float"),
        (changed(bag_sum={"inputs": ["cats"]}), "bag_sum", "reads bag inputs"),
        (changed(emb1={"field": 2}), "emb1", "outside the input's 2 fields"),
        (changed(emb1={"rows": 0}), "emb1", "outside"),
        (changed(bag_sum={"mode": "mean"}), "bag_sum", "weighted bag"),
        (changed(bag_mean={"mode": "max"}), "bag_mean", "one of sum, mean"),
        (changed(inter={"dim": 3}), "inter", "multiple of dim"),
        (changed(top1={"name": "cats"}), "cats", "batch input"),
    ],
)
def test_spec_errors_name_the_input_or_node(spec, field, match):
    assert_spec_error(spec, field, match)


def test_top_level_input_errors():
    assert_spec_error({**SPEC, "input_features": 3}, "input_features", "either")
    assert_spec_error({**SPEC, "inputs": []}, "inputs", "non-empty")
    assert_spec_error({**SPEC, "inputs": ["dense"]}, "inputs[0]", "mapping")
    unused = copy.deepcopy(SPEC)
    unused["inputs"].append({"name": "spare", "kind": "float", "features": 2})
    assert_spec_error(unused, "spare", "unused input")
    single = {"inputs": [{"name": "a", "kind": "float", "features": 4}],
              "nodes": [{"name": "inter", "op": "dot_interaction", "inputs": ["a"]}], "output": "inter", "loss": "mse"}
    assert_spec_error(single, "inter", "at least two vectors")


def test_tables_are_listed_in_the_graph():
    graph = Model(SPEC).graph
    assert dict(graph.tables) == {
        "emb0.weight": (7, 4), "emb1.weight": (5, 4), "bag_sum.weight": (6, 4), "bag_mean.weight": (9, 4)
    }
    assert list(graph.inputs) == ["dense", "cats", "tags", "items"]
    assert graph.inputs["tags"].tensor_names() == ("tags.values", "tags.offsets", "tags.weights")


@pytest.fixture
def setup():
    model = Model(SPEC)
    params = random_params(model, dtype="float32")
    x, y = make_named_batch(SPEC, 6, dtype="float32")
    return model, params, x, y


def with_tensor(x, name, value):
    return {**x, name: value}


def bad_batches(x):
    """(batch, field, match) for each way a tensor can be wrong."""
    ids = x["cats"]
    offsets = x["items.offsets"]
    n_items = len(x["items.values"])
    yield with_tensor(x, "cats", np.where(ids == ids.max(), -1, ids)), "batch.cats", "non-negative"
    yield with_tensor(x, "cats", np.array(ids) + np.array([[0, 5]])), "batch.cats", r"field 1 must lie in \[0, 5\)"
    yield with_tensor(x, "cats", ids.astype(np.float32)), "batch.cats", "int64"
    yield with_tensor(x, "cats", ids.astype(np.int32)), "batch.cats", "int64"
    yield with_tensor(x, "cats", ids[:, :1]), "batch.cats", r"shape must be \(batch, 2\)"
    yield with_tensor(x, "items.values", np.full(n_items, 9, np.int64)), "batch.items.values", r"\[0, 9\)"
    yield with_tensor(x, "items.values", np.full(n_items, -2, np.int64)), "batch.items.values", "non-negative"
    yield with_tensor(x, "items.values", x["items.values"].astype(np.float64)), "batch.items.values", "int64"
    yield with_tensor(x, "items.values", x["items.values"].reshape(-1, 1)), "batch.items.values", "1-D"
    yield with_tensor(x, "items.offsets", offsets + 1), "batch.items.offsets", "start at 0"
    yield with_tensor(x, "items.offsets", np.array([0, 3, 2, 4, 4, 5], np.int64)), "batch.items.offsets", "not decrease"
    yield with_tensor(x, "items.offsets", np.array([0, 0, 0, 0, 0, n_items + 1], np.int64)), "batch.items.offsets", "past the end"
    yield with_tensor(x, "items.offsets", offsets[:5]), "batch.items.offsets", "5 rows but batch.dense has 6"
    yield with_tensor(x, "items.offsets", offsets.astype(np.int32)), "batch.items.offsets", "int64"
    yield with_tensor(x, "tags.weights", x["tags.weights"][:-1]), "batch.tags.weights", "values' shape"
    yield with_tensor(x, "tags.weights", x["tags.weights"].astype(np.float64)), "batch.tags.weights", "differs"
    nan_weights = x["tags.weights"].copy()
    nan_weights[0] = np.nan
    yield with_tensor(x, "tags.weights", nan_weights), "batch.tags.weights", "NaN"
    yield with_tensor(x, "dense", x["dense"][:, :2]), "batch.dense", r"shape must be \(batch, 3\)"
    yield with_tensor(x, "dense", x["dense"].tolist()), "batch.dense", "array"
    yield with_tensor(x, "clicks", x["dense"]), "batch.clicks", "not an input"
    yield with_tensor(x, "tags", x["tags.values"]), "batch.tags", "not an input"
    yield {k: v for k, v in x.items() if k != "tags.offsets"}, "batch.tags.offsets", "missing"
    yield x["dense"], "batch", "mapping"


def test_bad_batches_name_the_tensor_and_change_nothing(setup):
    model, params, x, y = setup
    before = {name: value.copy() for name, value in params.items()}
    for bad, field, match in bad_batches(x):
        for call in (lambda: model.loss_and_grad(params, bad, y), lambda: model.forward(params, bad)):
            with pytest.raises(InvalidArgument, match=match) as raised:
                call()
            assert raised.value.field == field, (field, raised.value)
    for name, value in params.items():
        np.testing.assert_array_equal(value, before[name])
    model.loss_and_grad(params, x, y)  # the model still works


def test_empty_batch_and_targets(setup):
    model, params, x, y = setup
    empty = {
        "dense": x["dense"][:0], "cats": x["cats"][:0], "tags.values": x["tags.values"][:0],
        "tags.offsets": x["tags.offsets"][:0], "tags.weights": x["tags.weights"][:0],
        "items.values": x["items.values"][:0], "items.offsets": x["items.offsets"][:0],
    }
    with pytest.raises(InvalidArgument, match="empty") as raised:
        model.loss_and_grad(params, empty, y[:0])
    assert raised.value.field == "batch.dense"
    with pytest.raises(InvalidArgument, match="shape") as raised:
        model.loss_and_grad(params, x, y[:4])
    assert raised.value.field == "batch.y"


def test_a_single_input_spec_still_takes_one_array_as_batch_x():
    model = Model(mlp([3, 2]))
    params = model.init_parameters()
    with pytest.raises(InvalidArgument) as raised:
        model.forward(params, {"x": np.zeros((2, 3), np.float32)})
    assert raised.value.field == "batch.x"


def test_validate_batch_returns_a_batch_that_slices_by_rows(setup):
    model, params, x, y = setup
    batch, targets = model.validate_batch(x, y, dtype=np.dtype("float32"))
    assert isinstance(batch, Batch) and batch.rows == 6 and targets.shape == (6, 1)
    part = batch.slice(np, 2, 5)
    offsets, values = x["items.offsets"], x["items.values"]
    np.testing.assert_array_equal(part.feeds["items"].values, values[offsets[2] : offsets[5]])
    np.testing.assert_array_equal(part.feeds["items"].offsets, offsets[2:5] - offsets[2])
    np.testing.assert_array_equal(part.feeds["cats"], x["cats"][2:5])


def test_table_rows_missing_from_given_rows_name_the_table(setup):
    model, params, x, y = setup
    ids = np.unique(x["cats"][:, 0])[1:]  # one row the batch reads is left out
    partial = {**params, "emb0.weight": SparseRows(ids, params["emb0.weight"][ids], (7, 4))}
    with pytest.raises(InvalidArgument, match="not among the rows given") as raised:
        model.loss_and_grad(partial, x, y)
    assert raised.value.field == "parameters.emb0.weight"
    unsorted = {**params, "emb0.weight": SparseRows(ids[::-1].copy(), params["emb0.weight"][ids[::-1]], (7, 4))}
    with pytest.raises(InvalidArgument, match="sorted") as raised:
        model.loss_and_grad(unsorted, x, y)
    assert raised.value.field == "parameters.emb0.weight"
    wrong_table = {**params, "emb0.weight": SparseRows(ids, params["emb0.weight"][ids], (8, 4))}
    with pytest.raises(InvalidArgument, match="shape") as raised:
        model.loss_and_grad(wrong_table, x, y)
    assert raised.value.field == "parameters.emb0.weight"
