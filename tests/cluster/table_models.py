"""A small model with tables (ids fields, a weighted bag, dense features) and its batches, for the
cluster, gateway and fault tests of tables."""

from __future__ import annotations

import numpy as np

from gradserve_services.cluster.table_lane import InitialRows
from gradserve_services.engine import Model

TABLE_SPEC = {
    "inputs": [
        {"name": "dense", "kind": "float", "features": 3},
        {"name": "cats", "kind": "ids", "fields": 2},
        {"name": "tags", "kind": "bag", "weighted": True},
    ],
    "nodes": [
        {"name": "user", "op": "embedding", "inputs": ["cats"], "rows": 97, "dim": 4, "field": 0},
        {"name": "item", "op": "embedding", "inputs": ["cats"], "rows": 41, "dim": 4, "field": 1},
        {"name": "tag", "op": "embedding_bag", "inputs": ["tags"], "rows": 29, "dim": 4},
        {"name": "bottom", "op": "dense", "inputs": ["dense"], "units": 4},
        {"name": "pairs", "op": "dot_interaction", "inputs": ["bottom", "user", "item", "tag"]},
        {"name": "hidden", "op": "dense", "inputs": ["pairs"], "units": 8},
        {"name": "act", "op": "relu", "inputs": ["hidden"]},
        {"name": "logit", "op": "dense", "inputs": ["act"], "units": 1},
    ],
    "output": "logit",
    "loss": "binary_cross_entropy",
}
TABLES = ("user.weight", "item.weight", "tag.weight")


def table_batch(rows: int, seed: int, dtype="float32"):
    """Zipf-ish ids (repeats within a batch, both table ends), bags of 0..4 weighted ids."""
    rng = np.random.default_rng(seed)
    users = np.minimum(rng.zipf(1.5, rows) - 1, 96)
    users[0], users[-1] = 0, 96
    items = rng.integers(0, 41, rows)
    lengths = rng.integers(0, 5, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    values = rng.integers(0, 29, int(lengths.sum())).astype(np.int64)
    x = {"dense": rng.standard_normal((rows, 3)).astype(dtype),
         "cats": np.stack([users, items], axis=1).astype(np.int64),
         "tags.values": values, "tags.offsets": offsets,
         "tags.weights": rng.uniform(0.5, 1.5, values.shape[0]).astype(dtype)}
    y = (rng.uniform(size=(rows, 1)) < 0.3).astype(dtype)
    return x, y


def lazy_parameters(seed: int, dtype="float32") -> dict:
    """The model's initial parameters with its tables left to the servers (never made whole)."""
    params = Model(TABLE_SPEC).init_parameters(seed=seed, dtype=dtype)
    return {name: InitialRows(seed, dtype) if name in TABLES else value for name, value in params.items()}
