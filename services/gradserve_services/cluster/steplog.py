"""The exactly-once log of a trainer (step ids) and of a parameter-server table (update keys),
bounded the way an idempotent producer's sequence numbers are.

Each log keeps a high-water mark, the highest step id it recorded, and the records of the step ids
in the window `(mark - window, mark]`, so it holds at most `window` steps however long training runs
(and a checkpoint carries no more). Inside the window a recorded key is answered from the log and an
unrecorded one is new, so ids may arrive out of order by up to the window. A step id at or below
`mark - window` may have been applied and forgotten since: it is refused, never applied again.

Update keys are `"STEP"` (one update per step) or `"STEP/SHARD"` (async / bounded: one update per
batch shard); `update_key` writes them and `step_of` reads the step back, so the server's table ages
its records by the same step ids as the trainer.
"""

from __future__ import annotations

import heapq
from typing import Mapping

import numpy as np

from gradserve_services.errors import FailedPrecondition, InvalidArgument

__all__ = ["DEFAULT_STEP_WINDOW", "StepLog", "step_number", "update_key", "step_of"]

# Steps whose results stay answerable: far more than a client retries, and a few hundred KiB of
# records per session in memory and in each checkpoint.
DEFAULT_STEP_WINDOW = 1024


def step_number(step_id) -> int:
    """A step id as an integer >= 0; an integer and its decimal string are the same step."""
    if isinstance(step_id, str) and step_id.isascii() and step_id.isdecimal():
        return int(step_id)
    if isinstance(step_id, bool) or not isinstance(step_id, (int, np.integer)) or step_id < 0:
        raise InvalidArgument(f"step id must be an integer >= 0, got {step_id!r}", "step_id")
    return int(step_id)


def update_key(step: int, shard: int | None = None) -> str:
    return str(step) if shard is None else f"{step}/{shard}"


def step_of(key: str) -> int:
    return int(key.split("/", 1)[0])


class StepLog:
    """Records by update key, kept while their step is inside the window below the mark."""

    def __init__(self, window: int = DEFAULT_STEP_WINDOW):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidArgument(f"must be an integer >= 1, got {window!r}", "step_window")
        self.window = window
        self.mark: int | None = None  # the highest step recorded; None before the first
        self.steps_recorded = 0  # every record ever made, forgotten ones included
        self._records: dict[str, dict] = {}
        self._by_age: list[tuple[int, str]] = []  # (step, key) min-heap: what to forget first

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, key: str) -> dict | None:
        """The record of `key`, or None if it is new; FailedPrecondition if its step is older than
        the window (it may have been applied, and its record is gone)."""
        record = self._records.get(key)
        if record is not None:
            return record
        step = step_of(key)
        if self.mark is not None and step <= self.mark - self.window:
            raise FailedPrecondition(
                f"step_id {step} is older than the retained window (the last {self.window} step "
                f"ids, up to {self.mark}): it may have been applied already, so it is not applied "
                "again", "step_id")
        return None

    def record(self, key: str, record: dict) -> None:
        step = step_of(key)
        self._records[key] = record
        self.steps_recorded += 1
        heapq.heappush(self._by_age, (step, key))
        self.raise_mark(step)

    def state(self) -> tuple[int | None, dict[str, dict]]:
        """`(mark, records)`, JSON-able (the records are the log's own: copy before changing)."""
        return self.mark, self._records

    @classmethod
    def from_state(cls, mark: int | None, records: Mapping[str, Mapping],
                   window: int = DEFAULT_STEP_WINDOW, *, steps_recorded: int | None = None) -> "StepLog":
        """The log of a `state()`. Without a mark (a checkpoint written before logs were bounded)
        the highest recorded step is the mark; records outside this log's window are dropped.
        `steps_recorded`: the count the state's owner kept (its records only, without it)."""
        log = cls(window)
        numbered = {key: dict(record) for key, record in records.items()
                    if key.split("/", 1)[0].isdecimal()}
        for key in sorted(numbered, key=step_of):
            log.record(key, numbered[key])
        if mark is not None:
            log.raise_mark(int(mark))
        if steps_recorded is not None:
            log.steps_recorded = steps_recorded
        return log

    def raise_mark(self, mark: int) -> None:
        """Raise the mark to at least `mark` (forgetting what falls out of the window)."""
        if self.mark is None or mark > self.mark:
            self.mark = mark
        oldest_kept = self.mark - self.window + 1
        while self._by_age and self._by_age[0][0] < oldest_kept:
            self._records.pop(heapq.heappop(self._by_age)[1], None)
