"""Initial table rows as a pure function of (seed, table, row): any row can be made anywhere.

A parameter server holding millions of rows, or a worker needing a few, makes exactly the rows
`Model.init_parameters` would, so a table is never sent whole to start. Each element is uniform in
[-sqrt(1 / rows), sqrt(1 / rows)) (the DLRM reference's rule), drawn from the counter-based hash of
the dropout masks (`masks.py`) on the counter `row * dim + column` under a key per (seed, table).
"""

from __future__ import annotations

import math

from .masks import GOLDEN_GAMMA, splitmix64, stream_key

__all__ = ["table_rows", "init_table"]

CHUNK_ROWS = 1 << 16  # rows made at once: bounds the uint64 scratch of a whole-table init


def table_rows(xp, seed: int, table: str, ids, shape, dtype):
    """Rows `ids` (int64) of table `table` of `shape` (rows, dim), in `dtype`."""
    rows, dim = shape
    bound = math.sqrt(1.0 / rows)
    key = xp.uint64(stream_key(seed, f"{table}\x00rows"))  # its own stream: never a dropout node's
    counter = xp.asarray(ids, dtype=xp.uint64)[:, None] * xp.uint64(dim) + xp.arange(dim, dtype=xp.uint64)[None, :]
    bits = splitmix64(xp, key + counter * xp.uint64(GOLDEN_GAMMA))
    unit = (bits >> xp.uint64(11)).astype(xp.float64) * (2.0**-53)  # 53 uniform bits in [0, 1)
    return ((2.0 * unit - 1.0) * bound).astype(dtype)


def init_table(xp, seed: int, table: str, shape, dtype):
    """The whole table, made chunk by chunk."""
    out = xp.empty(shape, dtype=dtype)
    for start in range(0, shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, shape[0])
        out[start:stop] = table_rows(xp, seed, table, xp.arange(start, stop, dtype=xp.int64), shape, dtype)
    return out
