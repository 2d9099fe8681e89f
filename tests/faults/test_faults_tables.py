"""Faults during training of a model with tables (row-sharded on two parameter-server shards),
with real processes only: a separate Ray cluster, the gateway as a `gradserve serve` process, the
SDK over real gRPC. Each faulted run ends bitwise equal to the fault-free one, tables included
(pulled whole), and the servers' own apply log shows every step applied exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from .fixtures import cluster, gateway, head_sid  # noqa: F401 (fixtures the tests request)
from .helpers import (
    STEPS,
    actor_pids,
    assert_exactly_once,
    assert_same_parameters,
    audit,
    kill_pid,
    train,
    when_computing,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS, FIELDS = 4096, 8
# Tables of 50k rows and a dense part large enough that a shard computes for a few hundred ms.
SPEC = {
    "inputs": [{"name": "dense", "kind": "float", "features": 32}, {"name": "cats", "kind": "ids", "fields": FIELDS},
               {"name": "tags", "kind": "bag"}],
    "nodes": [
        {"name": "ids", "op": "embedding", "inputs": ["cats"], "rows": 50_000, "dim": 16},
        {"name": "tag_bag", "op": "embedding_bag", "inputs": ["tags"], "rows": 20_000, "dim": 16, "mode": "mean"},
        {"name": "all", "op": "concat", "inputs": ["dense", "ids", "tag_bag"]},
        {"name": "fc1", "op": "dense", "inputs": ["all"], "units": 256},
        {"name": "act1", "op": "relu", "inputs": ["fc1"]},
        {"name": "fc2", "op": "dense", "inputs": ["act1"], "units": 256},
        {"name": "act2", "op": "relu", "inputs": ["fc2"]},
        {"name": "logit", "op": "dense", "inputs": ["act2"], "units": 1},
    ],
    "output": "logit",
    "loss": "binary_cross_entropy",
}


def table_batch(step_id: int):
    rng = np.random.default_rng(5000 + step_id)
    lengths = rng.integers(0, 6, ROWS)
    x = {"dense": rng.standard_normal((ROWS, 32)),
         "cats": np.minimum(rng.zipf(1.3, (ROWS, FIELDS)) - 1, 49_999).astype(np.int64),
         "tags.values": rng.integers(0, 20_000, int(lengths.sum())).astype(np.int64),
         "tags.offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)}
    return x, (rng.uniform(size=(ROWS, 1)) < 0.3).astype(np.float64)


def new_table_session(client, *, checkpoint_every_steps: int = 0) -> str:
    return client.create_session(SPEC, optimizer={"name": "adam", "lr": 0.01}, seed=13, dtype="float64",
                                 num_workers=2, ps_shards=2, checkpoint_every_steps=checkpoint_every_steps,
                                 table_optimizer={"name": "sparse_adam", "lr": 0.05})


def run_and_audit(gateway, client, session, **fault):
    results = train(client, session, make_batch=table_batch, **fault)
    result = audit(client, session, gateway.checkpoint_dir)
    _, parameters = client.pull_parameters(session)
    client.close_session(session)
    assert_exactly_once(result)
    return results, parameters


@pytest.fixture(scope="module")
def fault_free(gateway):
    with gateway.client() as client:
        results, parameters = run_and_audit(gateway, client, new_table_session(client))
    assert results[STEPS].rows_updated > 0 and results[STEPS].table_rows > 0
    return parameters


def test_worker_sigkilled_mid_step_with_tables(gateway, fault_free, head_sid):
    with gateway.client() as client:
        killed = []

        def kill_a_computing_worker():
            return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                  lambda pid: (kill_pid(pid), killed.append(pid)))

        results, parameters = run_and_audit(gateway, client, new_table_session(client), fault_at=4,
                                            fault=kill_a_computing_worker)
    assert killed and results[4].version == 4
    assert_same_parameters(parameters, fault_free)


def test_parameter_server_killed_tables_restored_and_replayed(gateway, fault_free, head_sid):
    with gateway.client() as client:
        session = new_table_session(client, checkpoint_every_steps=3)
        servers = actor_pids("ParameterServer", head_sid)
        assert len(servers) == 2, servers

        def kill_a_server_mid_step():
            return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                  lambda _: kill_pid(servers[1]))

        results, parameters = run_and_audit(gateway, client, session, fault_at=5, fault=kill_a_server_mid_step)
    assert [results[s].version for s in range(1, STEPS + 1)] == list(range(1, STEPS + 1))
    assert servers[1] not in actor_pids("ParameterServer", head_sid)
    assert_same_parameters(parameters, fault_free)


def test_gateway_killed_and_restarted_with_tables(gateway, fault_free, head_sid):
    with gateway.client(retries=10, retry_backoff_s=0.5) as client:
        session = new_table_session(client, checkpoint_every_steps=1)
        train(client, session, last=4, make_batch=table_batch)

        def kill_gateway_mid_step_and_restart():
            return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                  lambda _: gateway.restart_after_kill())

        train(client, session, first=5, fault_at=5, fault=kill_gateway_mid_step_and_restart,
              make_batch=table_batch)
        result = audit(client, session, gateway.checkpoint_dir)
        _, parameters = client.pull_parameters(session)
        client.close_session(session)
    assert_exactly_once(result)
    assert_same_parameters(parameters, fault_free)
