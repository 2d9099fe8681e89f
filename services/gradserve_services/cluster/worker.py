"""`GradientWorker`: forward + backward on one shard of a batch, in micro-batches.

A plain class; `remote.py` makes it a Ray actor. It returns gradient SUMS, loss sums and sample
counts (never averages) so any number of uneven shards aggregates exactly, plus its timings.
Parameters arrive as a box of object references, one per parameter-server shard, each resolving to a
`(version, params)` snapshot; the worker fetches them only when the references change, so a version
crosses the object store once per worker and is used in place (zero-copy, read-only).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict

from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition
from gradserve_services.optim import all_finite

from .compression import ErrorFeedback, encode
from .local_round import run_task_round
from .shared import Attachments, BlockRef, area_visible, remove_block, visible, write_block

__all__ = ["GradientWorker", "AreaNotVisible", "ModelCache", "limit_blas_threads", "spec_key"]

# Bounded caches: a worker serves every session of an executor.
MAX_CACHED_MODELS = 8
MAX_CACHED_TABLES = 16


class AreaNotVisible(RuntimeError):
    """A batch was sent as a shared block to a worker on another machine; the coordinator sends
    that shard again through the object store."""


def limit_blas_threads() -> bool:
    """One BLAS/OpenMP thread in this process (a worker is one core); False if threadpoolctl is
    missing, in which case the OMP/OPENBLAS/MKL_NUM_THREADS environment set by `remote.py` rules."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=1)
    return True


def spec_key(spec) -> str:
    """A canonical string for a spec dict, so equal specs share one cached `Model`."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


class ModelCache:
    """`Model`s by spec, the most recently used few kept (validation and topological sort once)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec) -> Model:
        key = spec_key(spec)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = Model(spec)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return model


class GradientWorker:
    def __init__(self, limit_threads: bool = True):
        if limit_threads:
            limit_blas_threads()
        self._models = ModelCache(MAX_CACHED_MODELS)
        self._params: OrderedDict[str, tuple] = OrderedDict()  # table -> (box ids, version, params)
        self._feedback: dict[str, ErrorFeedback] = {}
        self._attached = Attachments()  # parameter blocks of servers on this machine
        self._grad_blocks: dict[str, tuple] = {}  # name -> (BlockRef, views)
        self._areas_seen: dict[str, bool] = {}

    def pid(self) -> int:
        return os.getpid()

    def forget(self, table: str) -> None:
        """Drop what this worker keeps for a closed trainer (parameters, top-k residuals)."""
        self._params.pop(table, None)
        self._feedback.pop(table, None)
        self._attached.forget(table)
        for name in [name for name in self._grad_blocks if name.startswith(table)]:
            remove_block(self._grad_blocks.pop(name)[0])

    def compute(self, task: dict, params_box: list, x, y, tangent_box=None):
        """Gradient sum (or JVP) of rows `task["start"]:task["stop"]` of the batch.

        Returns one encoded gradient part per entry of `task["partition"]` followed by a stats dict:
        loss_sum, count, version (of the parameters used), jvp_sum (with a tangent), bytes_raw,
        bytes_sent, fetch_ms, compute_ms, encode_ms, pid.
        """
        started = time.perf_counter()
        started_at = time.time()
        if isinstance(x, BlockRef):  # the batch, written by the coordinator on this machine
            if not visible(x):
                raise AreaNotVisible(f"pid {os.getpid()} cannot see {x.path}")
            batch = self._attached.arrays(x)
            x, y = batch["x"], batch["y"]
        version, params = self._parameters(task["table"], params_box, task.get("servers"))
        fetched = time.perf_counter()
        model = self._model(task["spec"])
        start, stop = task["start"], task["stop"]
        options = {"micro_batch_size": task.get("micro_batch_size"), "seed": task.get("seed", 0),
                   "sample_offset": start}
        stats = {"count": stop - start, "version": version, "pid": os.getpid(), "jvp_sum": None,
                 "sees_area": self._sees(task.get("area"))}
        parts = [None] * len(task["partition"])
        bytes_raw = bytes_sent = 0
        if tangent_box is not None:
            _, tangent = _resolve(tangent_box)
            mean_loss, derivative = model.jvp(params, tangent, x[start:stop], y[start:stop], **options)
            stats["loss_sum"] = mean_loss * (stop - start)
            stats["jvp_sum"] = derivative * (stop - start)
            computed = encoded = time.perf_counter()
        else:
            if "local" in task:  # a round: the pseudo-gradient of this worker's inner steps
                result = run_task_round(model, params, x, y, task)
            else:
                result = model.loss_and_grad_sum(params, x[start:stop], y[start:stop], **options)
            stats["loss_sum"], stats["count"] = result.loss_sum, result.count
            computed = time.perf_counter()
            feedback = self._feedback.setdefault(task["table"], ErrorFeedback()) \
                if task.get("compression") == "topk" else None
            if task.get("finite_only"):
                _refuse_non_finite(result, start, stop, gradients_too=feedback is not None)
            # compressed parts are small and are what the server must decode: they travel as is
            shared = self._sees(task.get("area")) and task.get("compression", "none") == "none"
            for index, names in enumerate(task["partition"]):
                part = self._shared_part(task, index, {n: result.grad_sum[n] for n in names}) \
                    if shared else None  # the server reads the sum where this worker wrote it
                if part is not None:
                    parts[index] = part
                    raw = sent = sum(result.grad_sum[n].nbytes for n in names)
                else:
                    parts[index], raw, sent = encode(
                        result.grad_sum, names, result.count, task.get("compression", "none"),
                        feedback=feedback, topk_fraction=task.get("topk_fraction", 0.01))
                bytes_raw, bytes_sent = bytes_raw + raw, bytes_sent + sent
            encoded = time.perf_counter()
        stats.update(bytes_raw=bytes_raw, bytes_sent=bytes_sent,
                     fetch_ms=(fetched - started) * 1e3, compute_ms=(computed - fetched) * 1e3,
                     encode_ms=(encoded - computed) * 1e3, started_at=started_at,
                     finished_at=started_at + (encoded - started))
        return (*parts, stats)

    def _model(self, spec) -> Model:
        return self._models.get(spec)

    def _sees(self, area) -> bool:
        """Whether the shared area `(folder, token)` is on this machine (asked once per area)."""
        if area is None:
            return False
        seen = self._areas_seen.get(area[1])
        if seen is None:
            seen = self._areas_seen[area[1]] = area_visible(*area)
        return seen

    def _shared_part(self, task: dict, index: int, grads: dict) -> dict | None:
        # One block per (table, shard slot, server shard): a worker re-running another shard in the
        # same step writes a different block, never one the server may still read.
        name = f"{task['table']}-grad-{os.getpid()}-{task.get('slot', 0)}-{index}"
        try:
            ref = write_block(task["area"][0], task["area"][1], name, grads, self._grad_blocks)
        except OSError:  # no room in the tmpfs: this part goes through the object store
            return None
        # Kept until the trainer is closed (`forget`): a block of another trainer may still be
        # waiting for its server, so none is evicted here. Slots and shards bound their number.
        return {"kind": "shared", "block": ref}

    def _parameters(self, table: str, params_box: list, servers=None):
        """The `(version, params)` the box points at, from cache when the box is unchanged."""
        if not params_box or not _is_object_ref(params_box[0]):
            return _resolve(params_box)  # in-process snapshots: nothing to fetch, nothing to cache
        box_ids = tuple(item.hex() for item in params_box)
        cached = self._params.get(table)
        if cached is not None and cached[0] == box_ids:
            self._params.move_to_end(table)
            return cached[1], cached[2]
        version, params = _resolve(params_box, self._attached, servers, table)
        self._params[table] = (box_ids, version, params)
        while len(self._params) > MAX_CACHED_TABLES:
            self._params.popitem(last=False)
        return version, params


def _refuse_non_finite(result, start: int, stop: int, *, gradients_too: bool) -> None:
    """A training shard whose loss (or gradient) overflowed from finite inputs is refused before
    anything is applied. Gradients are checked here only where top-k's error feedback would keep a
    non-finite residual; otherwise the parameter server checks them with the update."""
    if not math.isfinite(result.loss_sum):
        raise FailedPrecondition(f"the loss of batch rows {start}:{stop} is {result.loss_sum}, not "
                                 "finite: the model overflows on this batch; nothing was applied",
                                 "loss")
    for name, grad in result.grad_sum.items() if gradients_too else ():
        if not all_finite(grad):
            raise FailedPrecondition(f"the gradient of {name!r} is not finite: the model overflows "
                                     "on this batch; nothing was applied", f"gradients.{name}")


def _resolve(box: list, attached: Attachments | None = None, servers=None, table=None):
    """Merge the `(version, params)` snapshots of every parameter-server shard in the box. A shard
    that published a shared block is read in place where this process sees it, else asked for a
    copy (`servers`, in sync mode the block holds exactly that version until the next apply)."""
    snapshots = list(box)
    if snapshots and _is_object_ref(snapshots[0]):
        import ray  # only reached inside a Ray worker

        snapshots = ray.get(snapshots)
        far = [index for index, (_, held) in enumerate(snapshots)
               if isinstance(held, BlockRef) and not visible(held)]
        if far and servers is None:  # the coordinator thought this worker near: it resends
            raise AreaNotVisible(f"pid {os.getpid()} cannot see {snapshots[far[0]][1].path}")
        if far:
            copies = ray.get([servers[index].snapshot.remote(table) for index in far])
            for index, copy in zip(far, copies):
                snapshots[index] = copy
    params = {}
    for _, shard_params in snapshots:
        params.update(attached.arrays(shard_params) if isinstance(shard_params, BlockRef) else shard_params)
    return snapshots[0][0], params


def _is_object_ref(item) -> bool:
    return type(item).__name__ == "ObjectRef"
