"""How a batch is split over workers and how parameters are split over parameter-server shards."""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["split_rows", "partition_parameters"]


def split_rows(rows: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous `(start, stop)` row ranges, sizes differing by at most one; never empty
    (fewer ranges when there are fewer rows than parts)."""
    parts = max(1, min(parts, rows))
    base, extra = divmod(rows, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def partition_parameters(shapes: Mapping[str, tuple], shards: int) -> list[list[str]]:
    """Split parameter names over `shards` lists balanced by element count (largest first onto the
    lightest shard). Every list keeps model order. Never more shards than parameters."""
    names = list(shapes)
    shards = max(1, min(shards, len(names)))
    loads = [0] * shards
    owner = {}
    for name in sorted(names, key=lambda n: -int(np.prod(shapes[n], dtype=np.int64))):
        lightest = loads.index(min(loads))
        owner[name] = lightest
        loads[lightest] += int(np.prod(shapes[name], dtype=np.int64))
    return [[name for name in names if owner[name] == shard] for shard in range(shards)]
