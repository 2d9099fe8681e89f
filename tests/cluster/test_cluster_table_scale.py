"""2^24 table rows on this machine: 26 tables of dim 16 (a DLRM-sized embedding layer, 1 GiB of
float32 if it were made whole) trained over Ray with two parameter-server shards. Nothing makes a
table whole: the session starts from the seed, the servers store only rows a step updated, and
their resident memory is measured against what the tables would take."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services import procfs
from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.cluster.table_lane import InitialRows
from gradserve_services.engine import Model

pytestmark = pytest.mark.integration

FIELDS, DIM, ROWS_PER_TABLE = 26, 16, 645_278  # 26 x 645,278 >= 2**24 rows
BATCH, STEPS = 4096, 4
SPEC = {
    "inputs": [{"name": "dense", "kind": "float", "features": 13}, {"name": "cats", "kind": "ids", "fields": FIELDS}],
    "nodes": [
        *[{"name": f"t{f}", "op": "embedding", "inputs": ["cats"], "rows": ROWS_PER_TABLE, "dim": DIM, "field": f}
          for f in range(FIELDS)],
        {"name": "bottom", "op": "dense", "inputs": ["dense"], "units": DIM},
        {"name": "pairs", "op": "dot_interaction", "inputs": ["bottom", *[f"t{f}" for f in range(FIELDS)]]},
        {"name": "logit", "op": "dense", "inputs": ["pairs"], "units": 1},
    ],
    "output": "logit",
    "loss": "binary_cross_entropy",
}


def _batch(rng):
    cats = np.minimum(rng.zipf(1.1, (BATCH, FIELDS)) - 1, ROWS_PER_TABLE - 1)
    cats = (cats * 2_654_435_761) % ROWS_PER_TABLE  # hashed ranks: hot ids spread over the table
    x = {"dense": rng.standard_normal((BATCH, 13)).astype(np.float32), "cats": cats.astype(np.int64)}
    return x, (rng.uniform(size=(BATCH, 1)) < 0.25).astype(np.float32)


def test_two_to_the_24_rows_fit_and_only_touched_rows_are_stored():
    model = Model(SPEC)
    assert sum(rows for rows, _ in model.graph.tables.values()) >= 2**24
    params = model.init_parameters(seed=0, tables=False)
    params.update({name: InitialRows(0) for name in model.graph.tables})
    whole_bytes = sum(rows * dim * 4 for rows, dim in model.graph.tables.values())
    executor = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    try:
        trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "adam", "lr": 0.01}, num_workers=2,
                                                        ps_shards=2), params)
        server_pids = trainer.server_pids()
        assert len(set(server_pids)) == 2
        rss_before = sum(procfs.rss_bytes(pid) for pid in server_pids)
        rng = np.random.default_rng(0)
        results = [trainer.step(step, *_batch(rng)) for step in range(STEPS)]
        rss_after = sum(procfs.rss_bytes(pid) for pid in server_pids)
        trainer.close()
    finally:
        executor.shutdown()
    last = results[-1]
    print(f"server_rss_bytes before={rss_before} after={rss_after} table_bytes={last.table_bytes} "
          f"table_rows={last.table_rows} whole_tables_bytes={whole_bytes}")
    assert last.rows_updated <= last.table_rows <= sum(r.rows_updated for r in results)
    assert 0 < last.table_rows < 0.05 * 2**24
    # what the servers hold for the tables and what their processes grew by are both a small part
    # of the whole tables (the growth includes the slot index's touched pages and Ray's buffers)
    assert last.table_bytes < 0.2 * whole_bytes
    assert rss_after - rss_before < 0.35 * whole_bytes
    assert last.bytes_pulled + last.bytes_pushed < last.dense_table_bytes / 100
