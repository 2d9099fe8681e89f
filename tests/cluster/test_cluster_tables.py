"""Tables on the parameter servers, end to end through the trainer: sync training with tables
row-sharded over 1..3 server shards equals a single-process engine run over 200 steps; the step
reports its row traffic; checkpoints, restore and exactly-once cover the tables."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim import Optimizer
from gradserve_services.optim.rows import RowOptimizer

from .helpers import relative_error
from .table_models import TABLE_SPEC, TABLES, lazy_parameters, table_batch

SEED = 7
OPTIMIZER = {"name": "adam", "lr": 0.01}
TABLE_OPTIMIZERS = [{"name": "sparse_adam", "lr": 0.05}, {"name": "adagrad", "lr": 0.1}, {"name": "sgd", "lr": 0.5}]


def _reference(data, table_optimizer, dtype="float64"):
    """One process: the engine's mean gradient of each whole batch, the dense optimizer on the
    dense parameters, the row rule on the rows each batch touched (of whole tables)."""
    model = Model(TABLE_SPEC)
    params = model.init_parameters(seed=SEED, dtype=dtype)
    dense = {name: value for name, value in params.items() if name not in TABLES}
    optimizer = Optimizer(OPTIMIZER, dense)
    rule = RowOptimizer(table_optimizer)
    state = {name: rule.initial_state(params[name].shape[0], params[name].shape[1], params[name].dtype)
             for name in TABLES}
    for step, (x, y) in enumerate(data, start=1):
        _, grads = model.loss_and_grad(params, x, y)
        optimizer.step(dense, [{name: grads[name] for name in dense}])
        for name in TABLES:
            ids, rows = grads[name].ids, grads[name].rows
            new_rows, new_state = rule.update(params[name][ids], {s: v[ids] for s, v in state[name].items()},
                                              rows, step)
            params[name][ids] = new_rows
            for slot, values in new_state.items():
                state[name][slot][ids] = values
    return params


def _train(executor, data, *, table_optimizer, ps_shards, num_workers=2, dtype="float64", **config):
    trainer = executor.create_trainer(
        TrainerConfig(TABLE_SPEC, OPTIMIZER, num_workers=num_workers, ps_shards=ps_shards,
                      table_optimizer=table_optimizer, **config), lazy_parameters(SEED, dtype))
    try:
        results = [trainer.step(index + 1, x, y) for index, (x, y) in enumerate(data)]
        return trainer.parameters()[1], results
    finally:
        trainer.close()


def _assert_equal(got, want, tolerance):
    for name, value in want.items():
        assert relative_error(got[name], value) < tolerance, name


@pytest.mark.parametrize("ps_shards", [1, 3])
@pytest.mark.parametrize("table_optimizer", TABLE_OPTIMIZERS, ids=lambda c: c["name"])
def test_sync_training_with_tables_equals_one_process(table_optimizer, ps_shards):
    data = [table_batch(24, seed, "float64") for seed in range(200)]
    want = _reference(data, table_optimizer)
    got, results = _train(LocalExecutor(num_workers=2), data, table_optimizer=table_optimizer,
                          ps_shards=ps_shards, micro_batch_size=5)
    _assert_equal(got, want, 1e-5)
    initial = Model(TABLE_SPEC).init_parameters(seed=SEED, dtype="float64")
    assert relative_error(got["user.weight"], initial["user.weight"]) > 1e-3  # it trained
    assert results[-1].version == 200


def test_step_reports_its_row_traffic():
    x, y = table_batch(32, 3)
    model = Model(TABLE_SPEC)
    trainer = LocalExecutor(num_workers=2).create_trainer(
        TrainerConfig(TABLE_SPEC, OPTIMIZER, num_workers=2, ps_shards=2), lazy_parameters(SEED))
    try:
        result = trainer.step(1, x, y)
    finally:
        trainer.close()
    halves = [{key: value for key, value in _rows_of(x, start, stop).items()} for start, stop in ((0, 16), (16, 32))]
    distinct_per_worker = sum(len(np.unique(half[name])) for half in halves for name in half)
    distinct = sum(len(np.unique(np.concatenate([half[name] for half in halves]))) for name in halves[0])
    # the step's distinct rows are pulled once (every worker maps the same answers); each worker
    # pushes one gradient row per id of its shard
    assert result.rows_pulled == result.rows_updated == result.table_rows == distinct
    assert result.rows_pushed == distinct_per_worker > distinct
    assert result.row_lookups == 32 + 32 + len(x["tags.values"])
    assert result.bytes_pulled == distinct * (4 * 4 + 4)  # float32 rows of 4 + an int32 id
    assert result.bytes_pushed == distinct_per_worker * (4 * 4 + 4)
    whole = sum(np.prod(shape) for name, shape in model.parameter_shapes().items() if name in TABLES) * 4
    assert result.dense_table_bytes == 2 * 2 * whole
    assert result.table_bytes > distinct * 4 * 4 * 3  # value and two moments per stored row


def _rows_of(x, start, stop):
    low, high = x["tags.offsets"][start], x["tags.offsets"][stop] if stop < len(x["tags.offsets"]) else len(x["tags.values"])
    return {"user": x["cats"][start:stop, 0], "item": x["cats"][start:stop, 1], "tag": x["tags.values"][low:high]}


def test_checkpoint_restore_and_exactly_once_cover_tables():
    """A state taken after 6 steps, restored into a fresh trainer with another shard count, trains
    on to the same parameters as an uninterrupted run; a repeated step id applies nothing."""
    data = [table_batch(20, seed, "float64") for seed in range(10)]
    executor = LocalExecutor(num_workers=2)
    config = dict(table_optimizer=TABLE_OPTIMIZERS[0], dtype="float64")
    want, _ = _train(executor, data, ps_shards=2, **config)
    first = executor.create_trainer(TrainerConfig(TABLE_SPEC, OPTIMIZER, num_workers=2, ps_shards=2,
                                                  table_optimizer=TABLE_OPTIMIZERS[0]),
                                    lazy_parameters(SEED, "float64"))
    for index in range(6):
        first.step(index + 1, *data[index])
    arrays, meta = first.state()
    first.close()
    assert any(key.startswith("rows/user.weight/") for key in arrays)
    assert not any(key == "param/user.weight" for key in arrays)  # never the whole table
    second = executor.create_trainer(TrainerConfig(TABLE_SPEC, OPTIMIZER, num_workers=3, ps_shards=3,
                                                   table_optimizer=TABLE_OPTIMIZERS[0]),
                                     lazy_parameters(0, "float64"))  # the state's seed wins
    try:
        second.restore(arrays, meta)
        again = second.step(6, *data[5])
        assert again.duplicate and second.version == 6
        for index in range(6, 10):
            second.step(index + 1, *data[index])
        _assert_equal(second.parameters()[1], want, 1e-9)
    finally:
        second.close()


def test_tables_refuse_on_arrival_modes_and_compression():
    executor = LocalExecutor(num_workers=1)
    with pytest.raises(InvalidArgument) as caught:
        executor.create_trainer(TrainerConfig(TABLE_SPEC, OPTIMIZER, consistency="async"), lazy_parameters(0))
    assert caught.value.field == "config.consistency"
    with pytest.raises(InvalidArgument) as caught:
        executor.create_trainer(TrainerConfig(TABLE_SPEC, OPTIMIZER, compression="fp16"), lazy_parameters(0))
    assert caught.value.field == "config.compression"


def test_pulled_rows_are_the_tables_rows():
    data = [table_batch(16, seed) for seed in range(3)]
    trainer = LocalExecutor(num_workers=2).create_trainer(
        TrainerConfig(TABLE_SPEC, OPTIMIZER, num_workers=2, ps_shards=2), lazy_parameters(SEED))
    try:
        for index, (x, y) in enumerate(data):
            trainer.step(index, x, y)
        version, whole = trainer.parameters()
        ids = np.array([96, 0, 5, 5, 40], dtype=np.int64)
        at, rows = trainer.table_rows("user.weight", ids)
        assert at == version == 3
        np.testing.assert_array_equal(rows, whole["user.weight"][ids])
        for bad, field in ((np.array([-1]), "ids"), (np.array([97]), "ids"), (np.array([1.0]), "ids")):
            with pytest.raises(InvalidArgument) as caught:
                trainer.table_rows("user.weight", bad)
            assert caught.value.field == field
        with pytest.raises(InvalidArgument) as caught:
            trainer.table_rows("bottom.weight", ids)
        assert caught.value.field == "table"
    finally:
        trainer.close()


@pytest.mark.integration
def test_ray_sync_training_with_tables_equals_one_process():
    data = [table_batch(24, seed, "float64") for seed in range(200)]
    want = _reference(data, TABLE_OPTIMIZERS[0])
    executor = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    try:
        got, results = _train(executor, data, table_optimizer=TABLE_OPTIMIZERS[0], ps_shards=2)
    finally:
        executor.shutdown()
    _assert_equal(got, want, 1e-5)
    assert results[-1].rows_pulled > 0 and results[-1].bytes_pushed > 0


def test_tables_given_whole_train_like_tables_made_on_the_servers():
    """A caller may send a table whole: the servers load its rows, and training matches the run
    whose tables started from the seed (the same values); a table of the wrong shape is refused."""
    data = [table_batch(16, seed, "float64") for seed in range(5)]
    executor = LocalExecutor(num_workers=2)
    lazy, _ = _train(executor, data, table_optimizer=TABLE_OPTIMIZERS[1], ps_shards=2)
    whole = Model(TABLE_SPEC).init_parameters(seed=SEED, dtype="float64")
    trainer = executor.create_trainer(TrainerConfig(TABLE_SPEC, OPTIMIZER, num_workers=2, ps_shards=2,
                                                    table_optimizer=TABLE_OPTIMIZERS[1]), whole)
    try:
        for index, (x, y) in enumerate(data):
            trainer.step(index + 1, x, y)
        given = trainer.parameters()[1]
    finally:
        trainer.close()
    _assert_equal(given, lazy, 1e-12)
    with pytest.raises(InvalidArgument) as caught:
        executor.create_trainer(TrainerConfig(TABLE_SPEC, OPTIMIZER),
                                {**whole, "user.weight": whole["user.weight"][:5]})
    assert caught.value.field == "parameters.user.weight"


def test_dense_tables_keep_tables_whole_under_the_dense_optimizer():
    """`dense_tables`: the tables travel and update whole with the dense optimizer (the peer bench
    sparse compares against), equal to one process stepping Adam on every parameter; any
    consistency mode may take them."""
    from gradserve_services.engine import dense_gradients

    data = [table_batch(16, seed, "float64") for seed in range(20)]
    model = Model(TABLE_SPEC)
    want = model.init_parameters(seed=SEED, dtype="float64")
    optimizer = Optimizer(OPTIMIZER, want)
    for x, y in data:
        optimizer.step(want, [dense_gradients(model.loss_and_grad(want, x, y)[1])])
    got, results = _train(LocalExecutor(num_workers=2), data, table_optimizer=None, ps_shards=2, dense_tables=True)
    _assert_equal(got, want, 1e-9)
    assert results[-1].rows_pulled == 0 and results[-1].bytes_raw > 0
    trainer = LocalExecutor(num_workers=2).create_trainer(
        TrainerConfig(TABLE_SPEC, OPTIMIZER, consistency="async", dense_tables=True), lazy_parameters(SEED, "float64"))
    try:
        assert trainer.step(1, *data[0]).applied
    finally:
        trainer.close()
    with pytest.raises(InvalidArgument) as caught:
        TrainerConfig(TABLE_SPEC, OPTIMIZER, dense_tables="yes").validated()
    assert caught.value.field == "config.dense_tables"
