"""`GradientWorker`: forward + backward on one shard of a batch, in micro-batches.

A plain class; `remote.py` makes it a Ray actor. It returns gradient SUMS, loss sums and sample
counts (never averages) so any number of uneven shards aggregates exactly, plus its timings.
Parameters arrive as a box of object references, one per parameter-server shard, each resolving to a
`(version, params)` snapshot; the worker fetches them only when the references change, so a version
crosses the object store once per worker and is used in place (zero-copy, read-only).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict

from gradserve_services.engine import Model

from .compression import ErrorFeedback, encode

__all__ = ["GradientWorker", "limit_blas_threads", "spec_key"]

# Bounded caches: a worker serves every session of an executor.
MAX_CACHED_MODELS = 8
MAX_CACHED_TABLES = 16


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


class GradientWorker:
    def __init__(self, limit_threads: bool = True):
        if limit_threads:
            limit_blas_threads()
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._params: OrderedDict[str, tuple] = OrderedDict()  # table -> (box ids, version, params)
        self._feedback: dict[str, ErrorFeedback] = {}

    def pid(self) -> int:
        return os.getpid()

    def forget(self, table: str) -> None:
        """Drop what this worker keeps for a closed trainer (parameters, top-k residuals)."""
        self._params.pop(table, None)
        self._feedback.pop(table, None)

    def compute(self, task: dict, params_box: list, x, y, tangent_box=None):
        """Gradient sum (or JVP) of rows `task["start"]:task["stop"]` of the batch.

        Returns one encoded gradient part per entry of `task["partition"]` followed by a stats dict:
        loss_sum, count, version (of the parameters used), jvp_sum (with a tangent), bytes_raw,
        bytes_sent, fetch_ms, compute_ms, encode_ms, pid.
        """
        started = time.perf_counter()
        started_at = time.time()
        version, params = self._parameters(task["table"], params_box)
        fetched = time.perf_counter()
        model = self._model(task["spec"])
        start, stop = task["start"], task["stop"]
        options = {"micro_batch_size": task.get("micro_batch_size"), "seed": task.get("seed", 0),
                   "sample_offset": start}
        stats = {"count": stop - start, "version": version, "pid": os.getpid(), "jvp_sum": None}
        parts = [None] * len(task["partition"])
        bytes_raw = bytes_sent = 0
        if tangent_box is not None:
            _, tangent = _resolve(tangent_box)
            mean_loss, derivative = model.jvp(params, tangent, x[start:stop], y[start:stop], **options)
            stats["loss_sum"] = mean_loss * (stop - start)
            stats["jvp_sum"] = derivative * (stop - start)
            computed = encoded = time.perf_counter()
        else:
            result = model.loss_and_grad_sum(params, x[start:stop], y[start:stop], **options)
            stats["loss_sum"] = result.loss_sum
            computed = time.perf_counter()
            feedback = self._feedback.setdefault(task["table"], ErrorFeedback()) \
                if task.get("compression") == "topk" else None
            for index, names in enumerate(task["partition"]):
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
        key = spec_key(spec)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = Model(spec)
            while len(self._models) > MAX_CACHED_MODELS:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return model

    def _parameters(self, table: str, params_box: list):
        """The `(version, params)` the box points at, from cache when the box is unchanged."""
        if not params_box or not _is_object_ref(params_box[0]):
            return _resolve(params_box)  # in-process snapshots: nothing to fetch, nothing to cache
        box_ids = tuple(item.hex() for item in params_box)
        cached = self._params.get(table)
        if cached is not None and cached[0] == box_ids:
            self._params.move_to_end(table)
            return cached[1], cached[2]
        version, params = _resolve(params_box)
        self._params[table] = (box_ids, version, params)
        while len(self._params) > MAX_CACHED_TABLES:
            self._params.popitem(last=False)
        return version, params


def _resolve(box: list):
    """Merge the `(version, params)` snapshots of every parameter-server shard in the box."""
    snapshots = list(box)
    if snapshots and _is_object_ref(snapshots[0]):
        import ray  # only reached inside a Ray worker

        snapshots = ray.get(snapshots)
    params = {}
    for _, shard_params in snapshots:
        params.update(shard_params)
    return snapshots[0][0], params


def _is_object_ref(item) -> bool:
    return type(item).__name__ == "ObjectRef"
