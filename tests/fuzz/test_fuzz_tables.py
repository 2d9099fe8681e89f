"""Hypothesis against table input through a real gRPC server (127.0.0.1, port 0, over the
in-process executor): batches of a model with tables whose ids, bags and offsets are mutated at
random, and PullRows with random ids and table names. Every answer is OK or INVALID_ARGUMENT
naming a batch tensor (or `ids` / `table`), never an internal error; a refused step changes
nothing, and at the end the session holds exactly what its accepted steps made of it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradserve
from gradserve import Client
from gradserve_services.cluster import LocalExecutor
from gradserve_services.gateway import create_server

from tests.cluster.table_models import TABLE_SPEC, table_batch

SETTINGS = dict(deadline=None, database=None, derandomize=not os.environ.get("GRADSERVE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROWS = 6
TABLE_ROWS = {"user.weight": 97, "item.weight": 41, "tag.weight": 29}


@pytest.fixture(scope="module")
def live():
    executor = LocalExecutor(num_workers=2)
    server, port = create_server(executor)
    client = Client(f"127.0.0.1:{port}", timeout=30, retries=0)
    session = client.create_session(TABLE_SPEC, optimizer={"name": "adam", "lr": 0.01}, seed=3,
                                    num_workers=2, ps_shards=2)
    state = {"accepted": 0, "step_id": 0}
    yield client, session, state
    client.close()
    server.stop(grace=1)
    executor.shutdown()


ids = st.integers(min_value=-3, max_value=100)
mutations = st.fixed_dictionaries({
    "cats": st.one_of(st.none(), st.lists(ids, min_size=2 * ROWS, max_size=2 * ROWS)),
    "cats_dtype": st.sampled_from(["int64", "int64", "int32", "float64"]),
    "values": st.one_of(st.none(), st.lists(st.integers(-2, 31), min_size=0, max_size=12)),
    "offsets": st.one_of(st.none(), st.lists(st.integers(-1, 14), min_size=ROWS, max_size=ROWS)),
    "drop": st.sampled_from([None, None, "dense", "tags.weights", "cats"]),
    "extra": st.booleans(),
})


def _mutated(base, change):
    x = dict(base)
    if change["cats"] is not None:
        x["cats"] = np.asarray(change["cats"], dtype=np.int64).reshape(ROWS, 2)
    x["cats"] = x["cats"].astype(change["cats_dtype"])
    if change["values"] is not None:
        x["tags.values"] = np.asarray(change["values"], dtype=np.int64)
        x["tags.weights"] = np.ones(len(change["values"]), dtype=np.float32)
    if change["offsets"] is not None:
        x["tags.offsets"] = np.asarray(change["offsets"], dtype=np.int64)
    if change["drop"]:
        del x[change["drop"]]
    if change["extra"]:
        x["extra"] = np.zeros((ROWS, 1), np.float32)
    return x


@settings(max_examples=150, **SETTINGS)
@given(change=mutations)
def test_mutated_table_batches_are_applied_or_refused_naming_a_batch_tensor(live, change):
    client, session, state = live
    base, y = table_batch(ROWS, 11)
    x = _mutated(base, change)
    version_before = client.pull_parameters(session)[0]
    state["step_id"] += 1
    try:
        result = client.step(session, x, y, step_id=state["step_id"])
    except gradserve.InvalidArgument as refused:
        assert refused.field.startswith("batch."), refused
        assert client.pull_parameters(session)[0] == version_before
        return
    state["accepted"] += 1
    assert result.version == version_before + 1


@settings(max_examples=80, **SETTINGS)
@given(table=st.sampled_from([*TABLE_ROWS, "bottom.weight", "nope", ""]),
       rows=st.lists(st.integers(-2, 100), min_size=0, max_size=20),
       dtype=st.sampled_from(["int64", "int64", "int32", "float32"]))
def test_pull_rows_answers_or_names_what_is_wrong(live, table, rows, dtype):
    client, session, _ = live
    ids = np.asarray(rows, dtype=dtype)
    try:
        version, got = client.pull_rows(session, table, ids)
    except gradserve.InvalidArgument as refused:
        assert refused.field in ("ids", "table"), refused
        return
    assert table in TABLE_ROWS and dtype == "int64"
    assert got.shape == (len(rows), 4) and all(0 <= row < TABLE_ROWS[table] for row in rows)


def test_the_session_holds_what_its_accepted_steps_made(live):
    client, session, state = live
    assert state["accepted"] > 0  # the fuzzer also sent valid batches
    assert client.pull_parameters(session)[0] == state["accepted"]
