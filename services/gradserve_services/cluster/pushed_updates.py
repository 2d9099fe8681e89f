"""`PushedUpdates`: a parameter server's collection of the gradient buckets workers push during
their backward pass (gradient_push.py), one `Collection` per (table, pushes id).

A pushes id names one attempt at an update (the trainer makes a new one each time it runs a step,
`pushes_id`), never the update key alone: a refused or abandoned attempt's late buckets must not
land in the next attempt at the same step. Calls about one attempt come from several processes and
two threads of the server, in any order, so a collection outlives its use: once made, refused or
abandoned it is closed, and a closed id stays known (without its buckets) for a while, so a late
push is dropped and a late wait reads the outcome at once, instead of opening it again.

A collection completes when the trainer said how many batch shards to expect (`expect`) and every
shard pushed all its buckets; the two arrive in any order (they come from different processes).
While it fills, bucket b is summed the moment every shard has pushed it, in batch-shard order: the
same additions, in the same order, as the update's own block-wise sum of the parts, so the update
computed from the sums is bitwise the one computed from the parts (`sum_into`). Steps that measure
the per-part gradient signals keep the parts instead.

What the trainer waits for (`wait`) runs on another thread of the server than the pushes and the
update: it only reads the outcome the update left, after the collection's event is set.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

import numpy as np

from gradserve_services.errors import Unavailable

__all__ = ["PushedUpdates", "Collection", "sum_into", "pushes_id", "MAX_OPEN_PER_TABLE", "CLOSED_KEPT"]

# Collections a table may hold open at once: a sync trainer has one; more means a trainer gave up
# on an update without abandoning it (it died), and the oldest is dropped.
MAX_OPEN_PER_TABLE = 4
# Closed ids remembered (all tables): far more than the calls of one attempt can trail behind it.
CLOSED_KEPT = 256


def pushes_id(key: str) -> str:
    """A new attempt's id at the update `key`."""
    return f"{key}#{secrets.token_hex(6)}"


def sum_into(out: np.ndarray, parts: list) -> np.ndarray:
    """`out = parts[0] + parts[1] + ...`, added in order (sum_block's order and operations)."""
    np.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out += part
    return out


class Collection:
    def __init__(self):
        self.update_key: str | None = None  # the update this attempt makes (set by `expect`)
        self.shards: int | None = None  # batch shards expected (set by `expect`)
        self.args: tuple | None = None  # (counts, computed_on, norm) for the update
        self.apply_now = False  # this server decides alone: update the moment it completes
        self.buckets: dict[int, dict[int, dict]] = {}  # shard -> bucket -> {name: gradient sum}
        self.totals: dict[int, int] = {}  # shard -> how many buckets it pushed
        self.summed: dict[int, dict] = {}  # bucket -> {name: sum over shards}
        self.done = threading.Event()
        self.outcome = None  # what `wait` returns, once done
        self.error: BaseException | None = None
        self.sum_ms = 0.0  # summing buckets as they arrived
        self.last_sum_ms = 0.0  # of them, the latest bucket's: the one left when the last push came

    def complete(self) -> bool:
        return self.shards is not None and len(self.totals) == self.shards and all(
            len(self.buckets.get(shard, ())) == total for shard, total in self.totals.items())

    def figures(self) -> dict:
        """The report's fields: `reduced_ms` summing in all, `overlapped_ms` of it done while a
        worker still computed (every bucket but the last summed)."""
        return {"reduced_ms": self.sum_ms, "overlapped_ms": self.sum_ms - self.last_sum_ms}

    def parts(self, order) -> list[dict]:
        """The update's gradient parts: one, the sums, where every bucket was summed; else one per
        batch shard, in shard order. Names follow `order` (the table's parameters), as a worker's
        returned sums do: the reductions over parameters run in that order."""
        if self.shards == 1:
            return [{"kind": "dense", "grads": _merged(self.buckets[0], order)}]
        if len(self.summed) == len(self.buckets.get(0, ())):
            return [{"kind": "dense", "grads": _merged(self.summed, order)}]
        return [{"kind": "dense", "grads": _merged(self.buckets[shard], order)} for shard in range(self.shards)]


class PushedUpdates:
    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], Collection] = {}
        self._closed: OrderedDict[tuple[str, str], Collection] = OrderedDict()  # done, buckets dropped
        self._buffers: dict[tuple, np.ndarray] = {}  # (table, name) -> the reused sum array

    def collection(self, table: str, key: str) -> Collection:
        """The collection of pushes id `key`: open, closed (done), or new."""
        with self._lock:
            found = self._open.get((table, key)) or self._closed.get((table, key))
            if found is None:
                found = self._open[(table, key)] = Collection()
                mine = [k for k in self._open if k[0] == table]
                for stale in mine[:-MAX_OPEN_PER_TABLE]:
                    self._fail(self._open[stale], Unavailable(
                        "the update was given up (a newer one replaced it)", "gradients"))
                    self._close(stale)
            return found

    def expect(self, table: str, key: str, update_key: str, shards: int, args: tuple,
               apply_now: bool) -> Collection:
        """The attempt `key` at update `update_key` is `shards` batch shards' pushes; `args` are
        the update's (counts, computed_on, norm)."""
        collection = self.collection(table, key)
        if collection.done.is_set():  # abandoned before its expectation arrived
            return collection
        collection.update_key, collection.shards, collection.args = update_key, shards, args
        collection.apply_now = apply_now
        for bucket in list(collection.buckets.get(0, {})):
            self._sum_bucket(table, collection, bucket)
        return collection

    def push(self, table: str, key: str, shard: int, bucket: int, total: int | None, grads: dict) -> Collection:
        """Record one bucket (a repeat, from a shard run again, is the same sums: ignored; so is
        a bucket of a closed attempt)."""
        collection = self.collection(table, key)
        if collection.done.is_set():
            return collection
        held = collection.buckets.setdefault(shard, {})
        if bucket not in held:
            held[bucket] = grads
            self._sum_bucket(table, collection, bucket)
        if total is not None:
            collection.totals[shard] = total
        return collection

    def finish(self, table: str, key: str, collection: Collection, outcome=None,
               error: BaseException | None = None) -> None:
        """The update was made (`outcome`) or refused (`error`): wake the trainer's `wait`."""
        if error is not None:
            self._fail(collection, error)
        else:
            collection.outcome = outcome
            collection.done.set()
        if error is None and not collection.apply_now:
            return  # kept: the trainer applies it by key (several server shards agree first)
        with self._lock:
            if self._open.get((table, key)) is collection:
                self._close((table, key))

    def take(self, table: str, key: str) -> None:
        """The update was made from the collection (`apply` by key): close it."""
        with self._lock:
            self._close((table, key))

    def abandon(self, table: str, key: str, error: BaseException) -> None:
        """The trainer gave the attempt up; a wait, before or after this, raises `error`."""
        collection = self.collection(table, key)
        if not collection.done.is_set():
            self._fail(collection, error)
        with self._lock:
            self._close((table, key))

    def drop_table(self, table: str) -> None:
        with self._lock:
            for key in [key for key in self._open if key[0] == table]:
                self._fail(self._open[key], Unavailable("the table was dropped", "table"))
                self._close(key)
            for key in [key for key in self._buffers if key[0] == table]:
                del self._buffers[key]

    def _close(self, key: tuple) -> None:
        """(Under the lock.) Keep the id, its outcome and error; free its buckets. (Closed already: nothing.)"""
        collection = self._open.pop(key, None)
        if collection is None:
            return
        collection.buckets, collection.summed, collection.totals = {}, {}, {}
        self._closed[key] = collection
        while len(self._closed) > CLOSED_KEPT:
            self._closed.popitem(last=False)

    @staticmethod
    def wait(collection: Collection, timeout_s: float):
        if not collection.done.wait(timeout_s):
            raise Unavailable(f"the workers' gradients did not all arrive within {timeout_s:g} s", "gradients")
        if collection.error is not None:
            raise collection.error
        return collection.outcome

    def _sum_bucket(self, table: str, collection: Collection, bucket: int) -> None:
        """Sum bucket `bucket` over the shards once every shard pushed it (and counting allows)."""
        shards = collection.shards
        if shards is None or shards < 2 or bucket in collection.summed or _measured(collection.args):
            return
        held = [collection.buckets.get(shard, {}).get(bucket) for shard in range(shards)]
        if any(grads is None for grads in held):
            return
        started = time.perf_counter()
        sums = {}
        for name, first in held[0].items():
            out = self._buffer(table, name, first)
            sums[name] = sum_into(out, [grads[name] for grads in held])
        collection.summed[bucket] = sums
        collection.last_sum_ms = (time.perf_counter() - started) * 1e3
        collection.sum_ms += collection.last_sum_ms

    def _buffer(self, table: str, name: str, like: np.ndarray) -> np.ndarray:
        # Reused step after step: an update is done before the next one's buckets arrive.
        with self._lock:
            buffer = self._buffers.get((table, name))
            if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
                buffer = self._buffers[(table, name)] = np.empty_like(like)
            return buffer

    @staticmethod
    def _fail(collection: Collection, error: BaseException) -> None:
        collection.error = error
        collection.done.set()


def _measured(args) -> bool:
    """Whether the update measures per-part signals (its count is one per part): keep the parts."""
    return args is not None and not isinstance(args[0], int)


def _merged(buckets: dict, order) -> dict:
    grads = {}
    for bucket in buckets.values():
        grads.update(bucket)
    return {name: grads[name] for name in order if name in grads}
