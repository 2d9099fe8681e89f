"""Which rows of each table a batch reads: what a worker pulls from the parameter servers.

A table lives row-sharded on the parameter servers and is never sent whole: before a shard of a
batch runs, its worker asks for exactly the distinct rows its lookups touch. This module answers,
per table parameter, the sorted unique ids a (validated, perhaps sliced) `Batch` looks up; the
passes then read the table from those rows (`SparseRows`) as if it were whole.
"""

from __future__ import annotations

from .batch import Bag, Batch
from .spec import Graph

__all__ = ["rows_read", "lookup_count", "sorted_unique"]


def rows_read(xp, graph: Graph, batch: Batch) -> dict:
    """`{table: sorted unique int64 ids}` for every table of `graph` (empty where none is read)."""
    looked_up: dict[str, list] = {name: [] for name in graph.tables}
    for node in graph.nodes:
        tables = node.op.table_names(node)
        if not tables:
            continue
        feed = batch.feeds[node.inputs[0]]
        if isinstance(feed, Bag):
            ids = feed.values
        else:
            field = node.attrs.get("field")
            ids = feed.reshape(-1) if field is None else feed[:, field]
        for table in tables:
            looked_up[table].append(ids)
    return {name: sorted_unique(xp, xp.concatenate(parts)) if parts else xp.zeros(0, dtype=xp.int64)
            for name, parts in looked_up.items()}


def sorted_unique(xp, ids):
    """`xp.unique(ids)` by a sort and one comparison: numpy's unique of integers hashes first, which
    measures several times slower on a batch's few thousand ids."""
    ordered = xp.sort(ids.reshape(-1))
    if ordered.shape[0] == 0:
        return ordered
    first = xp.empty(ordered.shape[0], dtype=bool)
    first[0] = True
    xp.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def lookup_count(graph: Graph, batch: Batch) -> int:
    """Table lookups the batch makes (repeats counted): what a dense gather would read."""
    total = 0
    for node in graph.nodes:
        if not node.op.table_names(node):
            continue
        feed = batch.feeds[node.inputs[0]]
        if isinstance(feed, Bag):
            total += int(feed.values.shape[0])
        else:
            total += int(feed.shape[0] if node.attrs.get("field") is not None else feed.size)
    return total
