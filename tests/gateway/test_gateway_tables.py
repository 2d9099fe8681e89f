"""Tables through gRPC: a session whose tables start on the parameter servers (never sent), steps
with named-input batches, PullRows and whole tables in PullParameters, sparse gradients from
ComputeGradients, and bad table input refused with INVALID_ARGUMENT naming the tensor while
nothing is applied."""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradserve import TableRows
from gradserve_services.engine import Model

from tests.cluster.table_models import TABLE_SPEC, TABLES, table_batch
from tests.cluster.test_cluster_tables import OPTIMIZER, SEED, TABLE_OPTIMIZERS, _reference

from .conftest import client, executor, gateway  # noqa: F401 - fixtures


@pytest.fixture()
def table_session(client):  # noqa: F811 - the fixture
    session_id = client.create_session(TABLE_SPEC, optimizer=OPTIMIZER, seed=SEED, dtype="float64",
                                       num_workers=2, ps_shards=2, table_optimizer=TABLE_OPTIMIZERS[0])
    yield session_id
    client.close_session(session_id)


def test_a_session_trains_its_tables_on_the_servers(client, table_session):  # noqa: F811
    data = [table_batch(24, seed, "float64") for seed in range(4)]
    results = list(client.stream_steps(table_session, data))
    version, params = client.pull_parameters(table_session)
    assert version == 4 and [r.version for r in results] == [1, 2, 3, 4]
    want = _reference(data, TABLE_OPTIMIZERS[0])
    for name, value in want.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-10, atol=1e-12)
    last = results[-1]
    assert 0 < last.rows_pulled == last.rows_updated <= last.rows_pushed <= last.row_lookups
    assert last.bytes_pulled == last.rows_pulled * (4 * 8 + 4)  # float64 rows of 4, an int32 id each
    assert last.dense_table_bytes == 2 * 2 * (97 + 41 + 29) * 4 * 8  # two workers pulling and pushing whole
    at, rows = client.pull_rows(table_session, "user.weight", [96, 0, 3, 3])
    assert at == 4
    np.testing.assert_array_equal(rows, params["user.weight"][[96, 0, 3, 3]])


def test_compute_gradients_answers_tables_as_rows(client):  # noqa: F811
    model = Model(TABLE_SPEC)
    params = model.init_parameters(seed=2, dtype="float64")
    x, y = table_batch(30, 5, "float64")
    loss, grads = model.loss_and_grad(params, x, y)
    answer = client.compute_gradients(TABLE_SPEC, params, x, y)
    assert answer.loss == pytest.approx(loss, rel=1e-12)
    for name, grad in grads.items():
        got = answer.gradients[name]
        if name in TABLES:
            assert isinstance(got, TableRows)
            np.testing.assert_array_equal(got.ids, grad.ids)
            np.testing.assert_allclose(got.rows, grad.rows, rtol=1e-10, atol=1e-14)
            assert got.ids.shape[0] < grad.shape[0]  # only the rows read travelled
        else:
            np.testing.assert_allclose(got, grad, rtol=1e-10, atol=1e-14)


def _bad_batches():
    x, y = table_batch(8, 1, "float64")
    negative = {**x, "cats": x["cats"].copy()}
    negative["cats"][2, 0] = -1
    beyond = {**x, "cats": x["cats"].copy()}
    beyond["cats"][3, 1] = 41  # item has 41 rows
    as_float = {**x, "cats": x["cats"].astype(np.float64)}
    decreasing = {**x, "tags.offsets": x["tags.offsets"][::-1].copy()}
    past_end = {**x, "tags.offsets": x["tags.offsets"].copy()}
    past_end["tags.offsets"][-1] = len(x["tags.values"]) + 3
    bag_beyond = {**x, "tags.values": np.full_like(x["tags.values"], 29)}
    unknown = {**x, "bogus": x["dense"]}
    missing = {name: value for name, value in x.items() if name != "dense"}
    return y, [(negative, "batch.cats"), (beyond, "batch.cats"), (as_float, "batch.cats"),
               (decreasing, "batch.tags.offsets"), (past_end, "batch.tags.offsets"),
               (bag_beyond, "batch.tags.values"), (unknown, "batch.bogus"), (missing, "batch.dense")]


def test_bad_table_input_is_refused_naming_the_tensor(client, table_session):  # noqa: F811
    client.step(table_session, *table_batch(8, 0, "float64"), step_id=1)
    before_version, before = client.pull_parameters(table_session)
    y, cases = _bad_batches()
    for step_id, (x, field) in enumerate(cases, start=2):
        with pytest.raises(gradserve.InvalidArgument) as caught:
            client.step(table_session, x, y, step_id=step_id)
        assert caught.value.field == field, (field, caught.value)
    for ids, field in (([-1], "ids"), ([97], "ids"), (np.array([1.5]), "ids")):
        with pytest.raises(gradserve.InvalidArgument) as caught:
            client.pull_rows(table_session, "user.weight", np.asarray(ids))
        assert caught.value.field == field
    with pytest.raises(gradserve.InvalidArgument) as caught:
        client.pull_rows(table_session, "bottom.weight", [0])
    assert caught.value.field == "table"
    version, after = client.pull_parameters(table_session)
    assert version == before_version
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert client.step(table_session, *table_batch(8, 0, "float64"), step_id=2).version == 2  # still serving


def test_a_session_of_tables_only_comes_back_after_a_gateway_restart(tmp_path):
    """A checkpointed session whose only parameters are a table is recovered by a new registry
    over the same folder: same version, same rows, and it trains on."""
    from gradserve_services.cluster import LocalExecutor, TrainerConfig
    from gradserve_services.gateway.sessions import SessionRegistry

    spec = {"inputs": [{"name": "cats", "kind": "ids", "fields": 1}],
            "nodes": [{"name": "emb", "op": "embedding", "inputs": ["cats"], "rows": 50, "dim": 2, "field": 0}],
            "output": "emb", "loss": "mse"}
    rng = np.random.default_rng(4)
    data = [({"cats": rng.integers(0, 50, (8, 1))}, rng.standard_normal((8, 2)).astype(np.float32)) for _ in range(3)]
    executor = LocalExecutor(num_workers=2)
    first = SessionRegistry(executor, checkpoint_dir=str(tmp_path))
    session = first.create("alice", TrainerConfig(spec, {"name": "sgd", "lr": 0.5}, num_workers=2, ps_shards=2),
                           None, init_seed=9, init_dtype="float32", checkpoint_every_steps=1)
    for step_id, (x, y) in enumerate(data[:2], start=1):
        first.step(session, step_id, x, y, lambda: None)
    version, rows = first.table_rows(session, "emb.weight", np.arange(50, dtype=np.int64))
    second = SessionRegistry(executor, checkpoint_dir=str(tmp_path))
    assert second.recover() == 1
    recovered = second.get("alice", session.session_id)
    again_version, again = second.table_rows(recovered, "emb.weight", np.arange(50, dtype=np.int64))
    assert (again_version, again.dtype) == (version, np.float32) and version == 2
    np.testing.assert_array_equal(again, rows)
    assert second.step(recovered, 3, *data[2], lambda: None).version == 3
    first.close_all()
    second.close_all()
