"""`GradientPush`: a worker hands its gradient sums to the parameter servers in buckets while its
backward pass still runs (DDP's gradient bucketing, the push half of push/pull).

The engine announces each dense parameter's sum the moment it is final, last layers first
(`Model.loss_and_grad_sum(on_ready=...)`). Sums are grouped per parameter-server shard, in the order
announced, into buckets of about `bucket_bytes`; a full bucket is written where its server reads it
(this worker's shared-memory block, else the object store) and pushed with one call, so the
servers reduce layer k while this worker computes the layers below. Bucket boundaries depend only
on the model and `bucket_bytes`, so bucket b of every batch shard holds the same parameters and the
servers can sum it the moment every shard has pushed it. The last bucket of each server shard says
how many there were, and carries what the pass never announced (a parameter no gradient reached).
Last buckets go only once the worker has accepted its shard (`finish`, after the finiteness check
of its loss): a server never holds the whole of a shard the worker refused.

A push is fire-and-forget: the server records a failure under the update, where the trainer's
wait for the update (`outcome`) reads it.
"""

from __future__ import annotations

import os

__all__ = ["GradientPush", "pushed_part", "DEFAULT_BUCKET_BYTES"]

# About DDP's first bucket: large enough that a push's fixed cost is small beside its bytes, small
# enough that the servers get the last layers while the first are still being computed.
DEFAULT_BUCKET_BYTES = 2 << 20


def pushed_part(pushes: str) -> dict:
    """The gradient part standing for the sums pushed under the attempt id `pushes`
    (pushed_updates.pushes_id): the servers hold them."""
    return {"kind": "pushed", "key": pushes}


class GradientPush:
    def __init__(self, calls, lane, task: dict):
        push = task["push"]
        self._calls, self._lane = calls, lane
        self._table, self._key = task["table"], push["key"]
        self._servers, self._bucket_bytes = push["servers"], int(push.get("bucket_bytes", DEFAULT_BUCKET_BYTES))
        self._shard = task.get("batch_shard", 0)
        self._shared = lane is not None and task.get("shared_memory", False)
        self._owner = {name: index for index, names in enumerate(task["partition"]) for name in names}
        self._pending: list[dict] = [{} for _ in task["partition"]]  # per server shard: not yet pushed
        self._pushed: list[int] = [0] * len(task["partition"])  # buckets pushed per server shard
        self._unannounced = [set(names) for names in task["partition"]]  # per server shard
        self.bytes_pushed = 0

    def ready(self, grads: dict) -> None:
        """The engine's `on_ready`: these sums are final."""
        touched = set()
        for name, grad in grads.items():  # one node's parameters stay in one bucket
            index = self._owner[name]
            self._unannounced[index].discard(name)
            self._pending[index][name] = grad
            touched.add(index)
        for index in sorted(touched):  # a server shard's last bucket waits for `finish`
            if self._unannounced[index] and \
                    sum(value.nbytes for value in self._pending[index].values()) >= self._bucket_bytes:
                self._push(index, last=False)

    def finish(self, grad_sum: dict) -> None:
        """Push every server shard's last bucket, with the sums the pass never announced (zero: no
        gradient reached them); an empty partition still says it is done."""
        for index, names in enumerate(self._unannounced):
            for name in names:
                self._pending[index][name] = grad_sum[name]
            names.clear()
            self._push(index, last=True)

    def _push(self, index: int, *, last: bool) -> None:
        grads, self._pending[index] = self._pending[index], {}
        bucket = self._pushed[index]
        self._pushed[index] += 1
        part = None
        if self._shared and grads:  # the server reads the bucket where this worker wrote it
            # One block per (table, batch shard, server shard, bucket) of this process: a re-run
            # of another shard writes other blocks, never one a server may still read.
            ref = self._lane.put(f"{self._table}-grad-{os.getpid()}-{self._shard}-{index}-b{bucket}", grads)
            part = None if ref is None else {"kind": "shared", "block": ref}
        if part is None:
            part = {"kind": "dense", "grads": grads}
        self.bytes_pushed += sum(value.nbytes for value in grads.values())
        self._calls.submit(self._servers[index], "push", self._table, self._key, self._shard,
                           bucket, self._pushed[index] if last else None, part)
