"""Where a table's rows live: row r on parameter-server shard `r mod S`, as local row `r // S`.

Round-robin rather than contiguous ranges because ids are not uniform: under a Zipf law the hot
ids are a few small ranks (or, hashed, scattered), and a contiguous split would put every hot low
id on shard 0, so one server would pull, push and update most of each step's rows. Modulo
placement spreads consecutive ids over all shards, so the rows a batch touches, hot or cold,
divide almost evenly (measured in tests/cluster/test_row_store.py), and every shard holds
`ceil((rows - k) / S)` rows of a table whatever its size. It also needs no table of ranges: a
worker places an id with one integer operation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RowPlacement"]


class RowPlacement:
    def __init__(self, shards: int):
        self.shards = int(shards)

    def shard_rows(self, rows: int, shard: int) -> int:
        """How many of a `rows`-row table's rows shard `shard` holds."""
        return max(0, (rows - shard + self.shards - 1) // self.shards)

    def local(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.shards

    def global_ids(self, local_ids: np.ndarray, shard: int) -> np.ndarray:
        return local_ids * self.shards + shard

    def split(self, ids: np.ndarray) -> list[np.ndarray]:
        """`ids` (sorted) cut into one sorted array per shard: the positions in `ids` of each
        shard's ids, so rows that travel with the ids can be cut the same way."""
        if self.shards == 1:
            return [np.arange(ids.shape[0])]
        owner = ids % self.shards
        return [np.flatnonzero(owner == shard) for shard in range(self.shards)]
