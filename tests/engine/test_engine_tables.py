"""Tables and the ops over named inputs: embedding, embedding_bag, dot_interaction.

Every op against central finite differences (float64) and torch autograd (nn.Embedding,
nn.EmbeddingBag and DLRM's own interaction code), with repeated ids, empty bags and ids at both
ends of a table; table gradients as the touched rows summed per id; a DLRM-shaped model end to end.
"""

import numpy as np
import pytest

from engine_testing import (
    dlrm_spec,
    lookup_spec,
    make_batch,
    make_named_batch,
    random_params,
    relative_error,
    torch_dot_interaction,
    torch_loss_and_grads,
)
from gradserve_services.engine import Model, SparseRows, dense_gradients, gradcheck, table_rows

FLOAT32, FLOAT64 = 1e-6, 1e-10

IDS = {"name": "cats", "kind": "ids", "fields": 3}
BAG = {"name": "tags", "kind": "bag"}
WEIGHTED_BAG = {"name": "tags", "kind": "bag", "weighted": True}

LOOKUPS = {
    "embedding-field": lookup_spec("embedding", IDS, rows=6, dim=3, field=1),
    "embedding-all-fields": lookup_spec("embedding", IDS, rows=6, dim=3),
    "bag-sum": lookup_spec("embedding_bag", BAG, rows=6, dim=3),
    "bag-mean": lookup_spec("embedding_bag", BAG, rows=6, dim=3, mode="mean"),
    "bag-weighted": lookup_spec("embedding_bag", WEIGHTED_BAG, rows=6, dim=3),
}


def interaction_spec(**attrs) -> dict:
    """Three learnable inputs to dot_interaction: two vectors of 3 and a block of two more."""
    return {
        "input_features": 4,
        "nodes": [
            {"name": "a", "op": "dense", "inputs": ["input"], "units": 3},
            {"name": "b", "op": "dense", "inputs": ["input"], "units": 3},
            {"name": "c", "op": "dense", "inputs": ["input"], "units": 6},
            {"name": "inter", "op": "dot_interaction", "inputs": ["a", "b", "c", "b"], "dim": 3, **attrs},
            {"name": "head", "op": "dense", "inputs": ["inter"], "units": 2},
        ],
        "output": "head",
        "loss": "mse",
    }


def check_against_torch(spec, dtype, tolerance, rows=9):
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    x, y = make_named_batch(spec, rows, dtype=dtype) if "inputs" in spec else make_batch(spec, rows, dtype=dtype)
    loss, grads = model.loss_and_grad(params, x, y)
    expected_loss, expected_grads = torch_loss_and_grads(spec, params, x, y)
    assert abs(loss - expected_loss) <= tolerance * abs(expected_loss)
    assert list(grads) == list(expected_grads)
    for name, grad in dense_gradients(grads).items():
        assert grad.dtype == np.dtype(dtype) and grad.shape == params[name].shape
        assert relative_error(grad, expected_grads[name]) <= tolerance, name
    return grads


@pytest.mark.parametrize("case", list(LOOKUPS))
def test_lookup_gradients_match_finite_differences(case):
    spec = LOOKUPS[case]
    model = Model(spec)
    params = random_params(model)
    x, y = make_named_batch(spec, 8)
    report = gradcheck(model, params, x, y)
    assert report.ok, report.worst
    table = report.analytic["lookup.weight"]
    assert np.abs(table[0]).sum() > 0 and np.abs(table[5]).sum() > 0  # both ends of the table


@pytest.mark.parametrize("attrs", [{}, {"self_interaction": True}, {"concat_first": False}], ids=str)
def test_dot_interaction_gradients_match_finite_differences(attrs):
    spec = interaction_spec(**attrs)
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, 6)
    report = gradcheck(model, params, x, y)
    assert report.ok, report.worst


@pytest.mark.parametrize("dtype, tolerance", [("float32", FLOAT32), ("float64", FLOAT64)])
@pytest.mark.parametrize("case", list(LOOKUPS))
def test_lookups_match_torch(case, dtype, tolerance):
    check_against_torch(LOOKUPS[case], dtype, tolerance)


@pytest.mark.parametrize("dtype, tolerance", [("float32", FLOAT32), ("float64", FLOAT64)])
@pytest.mark.parametrize("attrs", [{}, {"self_interaction": True}, {"concat_first": False}], ids=str)
def test_dot_interaction_matches_dlrm_torch_code(attrs, dtype, tolerance):
    check_against_torch(interaction_spec(**attrs), dtype, tolerance)


def test_dot_interaction_output_is_the_lower_triangle_row_by_row():
    spec = interaction_spec()
    model = Model(spec)
    spec_without_head = {**spec, "nodes": spec["nodes"][:-1], "output": "inter"}
    inner = Model(spec_without_head)
    params = random_params(model)
    del params["head.weight"], params["head.bias"]
    x, _ = make_batch(spec, 5)
    out = inner.forward(params, x)
    a, b, c = (x @ params[f"{n}.weight"] + params[f"{n}.bias"] for n in "abc")
    vectors = [a, b, c[:, :3], c[:, 3:], b]
    expected = [a] + [np.sum(vectors[i] * vectors[j], axis=1, keepdims=True) for i in range(5) for j in range(i)]
    np.testing.assert_allclose(out, np.concatenate(expected, axis=1), rtol=1e-12, atol=1e-12)
    assert out.shape == (5, 3 + 10)


@pytest.mark.parametrize("dtype, tolerance", [("float32", FLOAT32), ("float64", FLOAT64)])
@pytest.mark.parametrize("shared_table", [False, True], ids=["table-per-field", "shared-table"])
def test_dlrm_shaped_model_matches_torch(shared_table, dtype, tolerance):
    check_against_torch(dlrm_spec(shared_table=shared_table), dtype, tolerance, rows=16)


def test_dlrm_shaped_model_matches_finite_differences():
    spec = dlrm_spec()
    model = Model(spec)
    params = random_params(model)
    x, y = make_named_batch(spec, 7)
    report = gradcheck(model, params, x, y)
    assert report.ok, report.worst


@pytest.mark.parametrize("dtype, tolerance", [("float32", FLOAT32), ("float64", FLOAT64)])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_table_gradient_equals_torch_embedding_bag_sparse_gradient(mode, weighted, dtype, tolerance):
    """nn.EmbeddingBag(sparse=True): its coalesced gradient is exactly (unique ids, summed rows)."""
    torch = pytest.importorskip("torch")
    source = WEIGHTED_BAG if weighted else BAG
    spec = lookup_spec("embedding_bag", source, rows=11, dim=4, mode=mode)
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    x, y = make_named_batch(spec, 12, dtype=dtype, max_bag=5)
    loss, grads = model.loss_and_grad(params, x, y)

    bag = torch.nn.EmbeddingBag.from_pretrained(torch.tensor(params["lookup.weight"]), freeze=False, mode=mode, sparse=True)
    head = torch.tensor(params["head.weight"], requires_grad=True)
    weights = torch.from_numpy(x["tags.weights"]) if weighted else None
    pooled = bag(torch.from_numpy(x["tags.values"]), torch.from_numpy(x["tags.offsets"]), per_sample_weights=weights)
    expected_loss = torch.nn.functional.mse_loss(pooled @ head + torch.from_numpy(params["head.bias"]), torch.from_numpy(y))
    expected_loss.backward()
    expected = bag.weight.grad.coalesce()

    table = grads["lookup.weight"]
    assert isinstance(table, SparseRows) and table.shape == (11, 4)
    assert table.ids.dtype == np.int64 and np.all(np.diff(table.ids) > 0)
    np.testing.assert_array_equal(table.ids, expected.indices()[0].numpy())
    np.testing.assert_array_equal(table.ids, np.unique(x["tags.values"]))
    assert relative_error(table.rows, expected.values().numpy()) <= tolerance
    expected_loss = float(expected_loss.detach())
    assert abs(loss - expected_loss) <= tolerance * abs(expected_loss)


@pytest.mark.parametrize("dtype, tolerance", [("float32", FLOAT32), ("float64", FLOAT64)])
def test_embedding_per_field_matches_torch_nn_embedding(dtype, tolerance):
    torch = pytest.importorskip("torch")
    spec = lookup_spec("embedding", IDS, rows=6, dim=3, field=2)
    model = Model(spec)
    params = random_params(model, dtype=dtype)
    x, y = make_named_batch(spec, 10, dtype=dtype)
    _, grads = model.loss_and_grad(params, x, y)
    embedding = torch.nn.Embedding.from_pretrained(torch.tensor(params["lookup.weight"]), freeze=False, sparse=True)
    rows = embedding(torch.from_numpy(x["cats"][:, 2]))
    out = rows @ torch.from_numpy(params["head.weight"]) + torch.from_numpy(params["head.bias"])
    torch.nn.functional.mse_loss(out, torch.from_numpy(y)).backward()
    expected = embedding.weight.grad.coalesce()
    np.testing.assert_array_equal(grads["lookup.weight"].ids, expected.indices()[0].numpy())
    assert relative_error(grads["lookup.weight"].rows, expected.values().numpy()) <= tolerance


def test_an_id_seen_k_times_gets_the_sum_of_its_k_row_gradients():
    spec = lookup_spec("embedding", {"name": "cats", "kind": "ids", "fields": 1}, rows=50, dim=2)
    model = Model(spec)
    params = random_params(model)
    x = {"cats": np.array([[7], [3], [7], [49], [7], [0]], np.int64)}
    y = np.random.default_rng(1).standard_normal((6, 2))
    _, grads = model.loss_and_grad(params, x, y)
    # d(mean loss)/d(row of sample i) for the head dense(2) and mse over 2 outputs:
    rows = params["lookup.weight"][x["cats"][:, 0]]
    out = rows @ params["head.weight"] + params["head.bias"]
    per_sample = (2 * (out - y) / (6 * 2)) @ params["head.weight"].T
    table = grads["lookup.weight"]
    np.testing.assert_array_equal(table.ids, [0, 3, 7, 49])
    np.testing.assert_allclose(table.rows[2], per_sample[[0, 2, 4]].sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(table.rows[[0, 1, 3]], per_sample[[5, 1, 3]], rtol=1e-12)


def test_a_batch_of_only_empty_bags_gives_zeros_and_an_empty_gradient():
    spec = lookup_spec("embedding_bag", BAG, rows=6, dim=3, mode="mean")
    model = Model(spec)
    params = random_params(model)
    x = {"tags.values": np.zeros(0, np.int64), "tags.offsets": np.zeros(4, np.int64)}
    y = np.zeros((4, 2))
    loss, grads = model.loss_and_grad(params, x, y)
    out = model.forward(params, x)
    np.testing.assert_allclose(out, np.broadcast_to(params["head.bias"], (4, 2)))
    assert grads["lookup.weight"].ids.shape == (0,) and grads["lookup.weight"].rows.shape == (0, 3)
    assert not np.any(dense_gradients(grads)["lookup.weight"])


def test_models_without_tables_keep_dense_gradients():
    spec = interaction_spec()
    model = Model(spec)
    assert dict(model.graph.tables) == {}
    _, grads = model.loss_and_grad(random_params(model), *make_batch(spec, 4))
    assert all(isinstance(grad, np.ndarray) for grad in grads.values())


# ----- accumulation: micro-batches, shards, forward mode --------------------------------------


@pytest.fixture
def dlrm():
    spec = dlrm_spec()
    model = Model(spec)
    params = random_params(model)
    x, y = make_named_batch(spec, 21, seed=3)
    return model, params, x, y


def test_micro_batches_sum_table_gradients_over_the_union_of_ids(dlrm):
    model, params, x, y = dlrm
    full_loss, full = model.loss_and_grad(params, x, y)
    for micro_batch_size in (1, 4, 21):
        loss, grads = model.loss_and_grad(params, x, y, micro_batch_size=micro_batch_size)
        assert loss == pytest.approx(full_loss, rel=FLOAT64)
        for name, grad in grads.items():
            if isinstance(grad, SparseRows):
                np.testing.assert_array_equal(grad.ids, full[name].ids)
                assert relative_error(grad.rows, full[name].rows) <= FLOAT64, name
            else:
                assert relative_error(grad, full[name]) <= FLOAT64, name


def test_shards_of_a_validated_batch_sum_to_the_full_batch(dlrm):
    """What a parameter server does: shard sums added (tables: union of ids), divided once."""
    model, params, x, y = dlrm
    full_loss, full = model.loss_and_grad(params, x, y)
    batch, y = model.validate_batch(x, y, dtype=np.dtype("float64"))
    bounds = [0, 1, 8, 13, 21]
    shards = [
        model.loss_and_grad_sum(params, batch.slice(np, a, b), y[a:b], micro_batch_size=3)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    assert sum(shard.count for shard in shards) == 21
    assert sum(shard.loss_sum for shard in shards) / 21 == pytest.approx(full_loss, rel=FLOAT64)
    for name in full:
        total = sum(shard.grad_sum[name] for shard in shards) / 21
        expected = full[name]
        if isinstance(expected, SparseRows):
            np.testing.assert_array_equal(total.ids, expected.ids)
            total, expected = total.rows, expected.rows
        assert relative_error(total, expected) <= FLOAT64, name


def test_jvp_equals_the_gradient_dotted_with_the_tangent(dlrm):
    model, params, x, y = dlrm
    loss, grads = model.loss_and_grad(params, x, y)
    tangent = random_params(model, seed=8)
    jvp_loss, derivative = model.jvp(params, tangent, x, y, micro_batch_size=5)
    expected = sum(float(np.vdot(grad, tangent[name])) for name, grad in dense_gradients(grads).items())
    assert jvp_loss == pytest.approx(loss, rel=FLOAT64)
    assert derivative == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ----- tables given as some of their rows; initial rows -------------------------------------


def test_a_table_given_as_the_rows_the_batch_reads_computes_like_the_whole_table(dlrm):
    model, params, x, y = dlrm
    loss, grads = model.loss_and_grad(params, x, y)
    bag_ids = np.unique(x["tags.values"])
    partial = {**params, "bag_sum.weight": SparseRows(bag_ids, params["bag_sum.weight"][bag_ids], (6, 4))}
    partial_loss, partial_grads = model.loss_and_grad(partial, x, y)
    assert partial_loss == loss
    np.testing.assert_array_equal(partial_grads["bag_sum.weight"].rows, grads["bag_sum.weight"].rows)


def test_initial_table_rows_are_a_function_of_seed_table_and_row():
    model = Model(dlrm_spec())
    params = model.init_parameters(seed=4, dtype="float32")
    table = params["emb0.weight"]
    assert table.shape == (7, 4) and table.dtype == np.float32
    assert np.all(np.abs(table) <= np.sqrt(1 / 7)) and len(np.unique(table)) == table.size
    some = table_rows(np, 4, "emb0.weight", np.array([6, 2], np.int64), (7, 4), "float32")
    np.testing.assert_array_equal(some, table[[6, 2]])
    assert not np.array_equal(model.init_parameters(seed=5)["emb0.weight"], table)
    assert not np.array_equal(params["emb1.weight"][:5], table[:5])  # another table, other rows


# ----- SparseRows itself ----------------------------------------------------------------------


def test_sparse_rows_from_lookups_sum_per_id_like_add_at():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=200)
    rows = rng.standard_normal((200, 3))
    summed = SparseRows.from_lookups(np, ids, rows, (20, 3))
    expected = np.zeros((20, 3))
    np.add.at(expected, ids, rows)
    np.testing.assert_array_equal(summed.ids, np.unique(ids))
    np.testing.assert_allclose(summed.dense(), expected, rtol=1e-12, atol=1e-12)
    twice = summed + SparseRows.from_lookups(np, ids[:50], rows[:50], (20, 3))
    np.add.at(expected, ids[:50], rows[:50])
    np.testing.assert_allclose(twice.dense(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose((twice * 2 / 4).dense(), expected / 2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="table"):
        summed + SparseRows.empty(np, (21, 3), np.float64)


def test_sparse_rows_from_positions_equals_from_lookups_bitwise():
    """The backward's sum by positions among a SparseRows table's ids: the same ids and the very
    same float32 sums as sorting the looked-up ids, with repeats, unused rows and no lookups."""
    rng = np.random.default_rng(4)
    table_ids = np.unique(rng.integers(0, 1000, 300))
    positions = rng.integers(0, table_ids.shape[0] - 5, 2000)  # the last rows never looked up
    rows = rng.standard_normal((2000, 4)).astype(np.float32)
    got = SparseRows.from_positions(np, table_ids, positions, rows, (1000, 4))
    want = SparseRows.from_lookups(np, table_ids[positions], rows, (1000, 4))
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.rows, want.rows)
    assert got.ids.shape[0] < table_ids.shape[0]
    none = SparseRows.from_positions(np, table_ids, positions[:0], rows[:0], (1000, 4))
    assert none.ids.shape == (0,) and none.rows.shape == (0, 4)


@pytest.mark.parametrize("slots", [False, True], ids=["search", "slots"])
def test_row_positions_find_every_id_and_name_a_missing_one(slots):
    """With a slot array holding another table's positions (as a reused workspace does) as with a
    binary search: every id's position, and InvalidArgument naming the field for an id not given."""
    from gradserve_services.engine.sparse_rows import row_positions
    from gradserve_services.errors import InvalidArgument

    rng = np.random.default_rng(5)
    table = SparseRows(np.unique(rng.integers(0, 500, 120)), np.zeros((0, 2)), (500, 2))
    ids = rng.choice(table.ids, 700)
    scratch = None
    if slots:
        scratch = rng.integers(-(1 << 30), 1 << 30, 500).astype(np.int32)  # stale contents
        row_positions(np, SparseRows(np.arange(0, 500, 3), None, (500, 2)), np.arange(0, 500, 3), "x", scratch)
    positions = row_positions(np, table, ids, "parameters.t.weight", scratch)
    np.testing.assert_array_equal(table.ids[positions], ids)
    absent = int(np.setdiff1d(np.arange(500), table.ids)[0])
    with pytest.raises(InvalidArgument, match=f"row {absent} ") as raised:
        row_positions(np, table, np.concatenate([ids, [absent]]), "parameters.t.weight", scratch)
    assert raised.value.field == "parameters.t.weight"


def test_sorted_unique_is_numpys_unique():
    from gradserve_services.engine.lookups import sorted_unique

    rng = np.random.default_rng(6)
    for ids in (rng.integers(0, 50, 400), rng.integers(0, 1 << 40, 300), np.zeros(0, np.int64), np.array([7])):
        np.testing.assert_array_equal(sorted_unique(np, ids), np.unique(ids))
