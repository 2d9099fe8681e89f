"""Tables on the parameter servers: per-row optimizers against torch's sparse optimizers, the
lazily materialised row store, and the placement of rows over shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradserve_services.cluster.row_placement import RowPlacement
from gradserve_services.cluster.shard_tables import ShardTables
from gradserve_services.engine import table_rows
from gradserve_services.errors import FailedPrecondition, InvalidArgument
from gradserve_services.optim.rows import TableOptimizerConfig, default_table_optimizer

ROWS, DIM, STEPS, SEED = 61, 5, 25, 3
CONFIGS = [
    {"name": "sgd", "lr": 0.3},
    {"name": "adagrad", "lr": 0.2},
    {"name": "adagrad", "lr": 0.1, "eps": 1e-6, "initial_accumulator_value": 0.1},
    {"name": "sparse_adam", "lr": 0.05},
    {"name": "sparse_adam", "lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
]


def _torch_optimizer(config, params):
    config = TableOptimizerConfig.from_dict(config)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.name == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, eps=config.epsilon,
                                   initial_accumulator_value=config.initial_accumulator_value)
    return torch.optim.SparseAdam(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.epsilon)


def _layout(config, shard, shards, dtype="float32"):
    return {"tables": {"t": [ROWS, DIM]}, "dtype": dtype, "seed": SEED, "shard": shard,
            "shards": shards, "optimizer": config}


def _pushes(rng, workers):
    """Per worker: ids looked up (repeats, both ends of the table) and their gradient rows."""
    out = []
    for _ in range(workers):
        ids = rng.integers(0, ROWS, size=9)
        ids[:2] = [0, ROWS - 1]
        out.append((ids, rng.standard_normal((ids.shape[0], DIM)).astype(np.float32)))
    return out


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_rows_follow_torch_sparse_optimizers(config, shards):
    """Two workers push summed rows to each shard; the shards' tables equal an nn.Embedding with
    sparse gradients stepped by the torch optimizer, to 1e-6 (float32), over 25 steps."""
    placement = RowPlacement(shards)
    tables = [ShardTables(_layout(config, k, shards)) for k in range(shards)]
    initial = table_rows(np, SEED, "t", np.arange(ROWS), (ROWS, DIM), np.float32)
    embedding = torch.nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(initial))
    optimizer = _torch_optimizer(config, embedding.parameters())
    rng = np.random.default_rng(0)
    count = 7  # samples the step's gradient is averaged over
    for _ in range(STEPS):
        pushes = _pushes(rng, 2)
        optimizer.zero_grad()
        loss = sum((embedding(torch.from_numpy(ids)) * torch.from_numpy(rows)).sum() for ids, rows in pushes) / count
        loss.backward()
        optimizer.step()
        for shard, table in enumerate(tables):
            shard_pushes = []
            for ids, rows in pushes:  # a worker dedups and sums its rows, then cuts them by shard
                unique, inverse = np.unique(ids, return_inverse=True)
                sums = np.zeros((unique.shape[0], DIM), np.float32)
                np.add.at(sums, inverse, rows)
                mine = placement.split(unique)[shard]
                shard_pushes.append({"t": (unique[mine], sums[mine])})
            writes, _, _ = table.plan(shard_pushes, 1.0 / count)
            table.write(writes)
    got = np.empty((ROWS, DIM), np.float32)
    for shard, table in enumerate(tables):
        got[shard::shards] = table.dense("t")
    np.testing.assert_allclose(got, embedding.weight.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, initial)


def test_rows_are_stored_only_once_updated():
    table = ShardTables(_layout({"name": "sparse_adam", "lr": 0.1}, 0, 1))
    ids = np.array([2, 7, 40])
    before = table.pull({"t": ids})["t"]
    np.testing.assert_array_equal(before, table_rows(np, SEED, "t", ids, (ROWS, DIM), np.float32))
    assert table.stored()[0] == 0
    writes, squared, updated = table.plan([{"t": (ids, np.ones((3, DIM), np.float32))}], 0.5)
    assert updated == 3 and squared == pytest.approx(3 * DIM * 0.25)
    assert table.stored()[0] == 0  # planning writes nothing
    table.write(writes)
    assert table.stored()[0] == 3
    after = table.pull({"t": np.array([2, 3])})["t"]
    assert not np.allclose(after[0], before[0])
    np.testing.assert_array_equal(after[1], table_rows(np, SEED, "t", np.array([3]), (ROWS, DIM), np.float32)[0])


def test_state_moves_between_shard_counts():
    """A checkpoint of 2 shards loads into 3: every row and its moments where placement puts it."""
    config = {"name": "sparse_adam", "lr": 0.1}
    two = [ShardTables(_layout(config, k, 2)) for k in range(2)]
    rng = np.random.default_rng(1)
    for _ in range(3):
        ids = np.unique(rng.integers(0, ROWS, 12))
        grad = rng.standard_normal((ids.shape[0], DIM)).astype(np.float32)
        for k, table in enumerate(two):
            mine = RowPlacement(2).split(ids)[k]
            table.write(table.plan([{"t": (ids[mine], grad[mine])}], 1.0)[0])
    merged, meta = {}, None
    for table in two:
        arrays, meta = table.state()
        for key, value in arrays.items():
            merged[key] = np.concatenate([merged[key], value]) if key in merged else value
    three = [ShardTables(_layout(config, k, 3)) for k in range(3)]
    for table in three:
        table.load(merged, meta)
    everything = np.arange(ROWS)
    want = np.empty((ROWS, DIM), np.float32)
    for k, table in enumerate(two):
        want[k::2] = table.dense("t")
    for k, table in enumerate(three):
        np.testing.assert_array_equal(table.dense("t"), want[k::3])
    moments = three[1].read_state("t", everything[1::3])["exp_avg"]
    assert np.abs(moments).sum() > 0
    assert sum(t.stored()[0] for t in three) == sum(t.stored()[0] for t in two)
    assert all(t.updates("t") == 3 for t in three)


def test_non_finite_update_is_refused_whole():
    table = ShardTables(_layout({"name": "sgd", "lr": 1.0}, 0, 1))
    bad = np.full((2, DIM), np.inf, np.float32)
    with pytest.raises(FailedPrecondition) as caught:
        table.plan([{"t": (np.array([1, 2]), bad)}], 1.0)
    assert caught.value.field == "gradients.t"
    huge = np.full((1, DIM), 3e38, np.float32)
    with pytest.raises(FailedPrecondition) as caught:
        table.plan([{"t": (np.array([1]), huge)}, {"t": (np.array([1]), huge)}], 1.0)
    assert caught.value.field in ("gradients.t", "parameters.t")
    assert table.stored()[0] == 0


def test_modulo_placement_balances_zipf_ids():
    """Zipf ids (hot ranks small) spread over 4 shards within 10 % of even, where contiguous
    ranges would give shard 0 over 80 % of them."""
    rng = np.random.default_rng(2)
    rows = 1 << 20
    ids = np.unique(np.minimum(rng.zipf(1.2, 50_000) - 1, rows - 1))
    per_shard = [len(part) for part in RowPlacement(4).split(ids)]
    assert max(per_shard) <= 1.1 * len(ids) / 4
    contiguous = np.bincount(ids // (rows // 4), minlength=4)
    assert contiguous[0] > 0.8 * len(ids)


def test_config_errors_name_the_field():
    with pytest.raises(InvalidArgument) as caught:
        TableOptimizerConfig.from_dict({"name": "adam"})
    assert caught.value.field == "table_optimizer.name"
    with pytest.raises(InvalidArgument) as caught:
        TableOptimizerConfig.from_dict({"name": "adagrad", "lr": -1})
    assert caught.value.field == "table_optimizer.lr"
    with pytest.raises(InvalidArgument) as caught:
        TableOptimizerConfig.from_dict({"lr": 0.1, "momentum": 0.9})
    assert caught.value.field == "table_optimizer.momentum"
    assert default_table_optimizer({"name": "adam", "lr": 0.01}).name == "sparse_adam"
    assert default_table_optimizer({"name": "momentum", "lr": 0.2}) == TableOptimizerConfig("sgd", 0.2)


def test_tables_sharing_a_store_follow_torch_each():
    """Tables of one width share a store (one pass for all of them), another width has its own:
    each still equals its own nn.Embedding stepped by SparseAdam, on 2 shards."""
    shapes = {"a": (23, 4), "b": (9, 4), "c": (17, 3)}
    config = {"name": "sparse_adam", "lr": 0.05}
    layout = {"tables": {name: list(shape) for name, shape in shapes.items()}, "dtype": "float32", "seed": 1,
              "shards": 2, "optimizer": config}
    tables = [ShardTables({**layout, "shard": k}) for k in range(2)]
    assert len(tables[0].stores) == 2
    embeddings = {}
    for name, shape in shapes.items():
        embeddings[name] = torch.nn.Embedding(*shape, sparse=True)
        with torch.no_grad():
            embeddings[name].weight.copy_(torch.from_numpy(table_rows(np, 1, name, np.arange(shape[0]), shape, np.float32)))
    optimizer = torch.optim.SparseAdam([e.weight for e in embeddings.values()], lr=0.05)
    rng = np.random.default_rng(3)
    for _ in range(10):
        grads = {name: (np.unique(rng.integers(0, shape[0], 6)), None) for name, shape in shapes.items()}
        grads = {name: (ids, rng.standard_normal((ids.shape[0], shapes[name][1])).astype(np.float32))
                 for name, (ids, _) in grads.items()}
        optimizer.zero_grad()
        sum((embeddings[name](torch.from_numpy(ids)) * torch.from_numpy(rows)).sum()
            for name, (ids, rows) in grads.items()).backward()
        optimizer.step()
        for k, table in enumerate(tables):
            push = {name: (ids[ids % 2 == k], rows[ids % 2 == k]) for name, (ids, rows) in grads.items()}
            table.write(table.plan([push], 1.0)[0])
    for name, shape in shapes.items():
        got = np.empty(shape, np.float32)
        for k, table in enumerate(tables):
            got[k::2] = table.dense(name)
        np.testing.assert_allclose(got, embeddings[name].weight.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_pushes_sum_as_every_pushed_row_summed_per_key():
    """A shard adds the workers' pushes (each: sorted unique keys) by placing them in their union:
    the same keys and float32 sums as summing every pushed row per key."""
    from gradserve_services.cluster.shard_tables import _sum_pushes
    from gradserve_services.engine import SparseRows

    rng = np.random.default_rng(7)
    given = []
    for count in (300, 250, 40):
        keys = np.unique(rng.integers(0, 2000, count))
        given.append((keys, rng.standard_normal((keys.shape[0], DIM)).astype(np.float32)))
    keys, sums = _sum_pushes(given, DIM, np.float32)
    want = SparseRows.from_lookups(np, np.concatenate([k for k, _ in given]), np.concatenate([r for _, r in given]),
                                   (2000, DIM))
    np.testing.assert_array_equal(keys, want.ids)
    np.testing.assert_array_equal(sums, want.rows)
    assert keys.shape[0] < sum(k.shape[0] for k, _ in given)  # some keys were pushed twice
