"""`TableStream`: a whole table read out of the parameter-server shards one range of rows at a time.

A table of millions of rows is never assembled for reading it whole (PullParameters): each part
of `part_rows(dim, dtype)` rows is asked of every shard at once (`table_row_range`, the rows of
the range that shard holds, row r on shard r mod S), interleaved into one array and handed on;
the next part's answers are already asked for while the current one is sent, so the reader holds
at most two parts, whatever the table's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["TableStream", "PART_BYTES", "part_rows"]

PART_BYTES = 2 << 20  # bytes of rows per part: two of the wire's 1 MiB chunks


def part_rows(dim: int, dtype) -> int:
    """Rows per part of a table of width `dim`."""
    return max(1, PART_BYTES // max(1, int(dim) * np.dtype(dtype).itemsize))


class TableStream:
    """Table `name` of shape `shape`: `parts()` yields its rows in order, `part_rows` at a time.
    `ask(start, stop)` submits every shard's request for rows [start, stop) and returns the futures
    (shard order); `get(futures)` waits for their answers."""

    def __init__(self, name: str, shape: tuple[int, int], dtype, ask: Callable, get: Callable,
                 rows_per_part: int | None = None):
        self.name, self.shape, self.dtype = name, (int(shape[0]), int(shape[1])), np.dtype(dtype)
        self._ask, self._get = ask, get
        self.rows_per_part = rows_per_part or part_rows(self.shape[1], self.dtype)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def parts(self) -> Iterator[np.ndarray]:
        rows, step = self.shape[0], self.rows_per_part
        ranges = [(start, min(rows, start + step)) for start in range(0, rows, step)]
        pending = self._ask(*ranges[0]) if ranges else None
        for index, (start, stop) in enumerate(ranges):
            answers = self._get(pending)
            pending = self._ask(*ranges[index + 1]) if index + 1 < len(ranges) else None
            part = self._interleaved(start, stop, answers)
            del answers  # the shards' answers go before the part is sent
            yield part

    def _interleaved(self, start: int, stop: int, answers: list) -> np.ndarray:
        """Rows [start, stop) from each shard's rows of the range (shard s holds rows r = s mod S)."""
        shards = len(answers)
        if shards == 1:
            return np.ascontiguousarray(answers[0], dtype=self.dtype)
        part = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        for shard, answer in enumerate(answers):
            part[(shard - start) % shards::shards] = answer
        return part
