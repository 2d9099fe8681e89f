"""Executors: where gradients are computed and trainers run. `LocalExecutor` (in process) and
`RayExecutor` (Ray actors, embedded runtime or an existing cluster) share one implementation over
a `Backend`."""

from __future__ import annotations

import time
import weakref
from typing import Mapping

import numpy as np

from gradserve_services.engine import Batch, Model, SparseRows
from gradserve_services.errors import InvalidArgument

from .config import DEFAULT_CALL_TIMEOUT_S, TrainerConfig
from .shard_runner import Failures, ShardInputs, ShardRunner
from .sharding import split_rows
from .trainer import Trainer
from .worker import ModelCache

__all__ = ["Executor", "LocalExecutor", "RayExecutor"]

MAX_CACHED_MODELS = 32
ONE_OFF_TABLE = "__compute_gradients__"


class Executor:
    def __init__(self, backend, num_workers: int):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise InvalidArgument(f"must be an integer >= 1, got {num_workers!r}", "num_workers")
        self.num_workers = num_workers
        self._backend = backend
        # re-runs need nothing else: the inputs live here
        self._runner = ShardRunner(backend, timeout_s=DEFAULT_CALL_TIMEOUT_S)
        self._models = ModelCache(MAX_CACHED_MODELS)
        # Open trainers, for shutdown to close; a closed one the caller dropped must not stay here
        # (every session a gateway ever opened would, with its step log and parameter refs).
        self._trainers: weakref.WeakSet[Trainer] = weakref.WeakSet()
        backend.reserve_workers("__executor__", num_workers)

    def compute_gradients(self, spec, params: Mapping[str, np.ndarray], x, y, *,
                          micro_batch_size=None, tangent=None, seed: int = 0,
                          num_workers: int | None = None) -> dict:
        """Mean loss and mean gradient (or, with `tangent`, the directional derivative of the mean
        loss) of one batch, sharded over the executor's workers.

        Returns `{"loss", "grads" (None with a tangent), "jvp" (None without), "count", "timings",
        "retries", "worker_failures"}`; timings in ms: broadcast, compute, gather, reduce, total;
        retries: shards re-run after their worker was lost; worker_failures: workers replaced.
        `num_workers` overrides the executor's shard count for this call.
        """
        started = time.perf_counter()
        model = self._model(spec)
        dtype = model.validate_parameters(params)
        x, y = model.validate_batch(x, y, dtype=dtype)
        if tangent is not None and model.validate_parameters(tangent, field_prefix="tangent") != dtype:
            raise InvalidArgument(f"tangent must be {dtype} like the parameters", "tangent")
        backend = self._backend
        params_refs = [backend.put((None, dict(params)))]
        tangent_refs = None if tangent is None else [backend.put((None, dict(tangent)))]
        batch = backend.put(x), backend.put(y)
        inputs = ShardInputs(params_refs, lambda: batch, tangent=tangent_refs)
        put = time.perf_counter()
        task_base = {"spec": spec, "table": ONE_OFF_TABLE, "partition": [list(params)],
                     "micro_batch_size": micro_batch_size, "seed": seed}
        rows = x.rows if isinstance(x, Batch) else x.shape[0]  # named inputs: a Batch
        shards = split_rows(rows, num_workers or self.num_workers)
        calls = [self._runner.dispatch(position, dict(task_base, start=start, stop=stop), inputs)
                 for position, (start, stop) in enumerate(shards)]
        failures = Failures()
        stats = self._runner.gather(calls, failures, len(calls))
        gathered = time.perf_counter()
        count = sum(s["count"] for s in stats)
        loss = sum(s["loss_sum"] for s in stats) / count
        grads = jvp = None
        if tangent is None:
            grad_parts = backend.get([call.grads[0] for call in calls])
            grads = {name: _sum_over(grad_parts, name) / count for name in model.parameter_shapes()}
        else:
            jvp = sum(s["jvp_sum"] for s in stats) / count
        done = time.perf_counter()
        fetch = max(s["fetch_ms"] for s in stats)
        compute = max(s["compute_ms"] for s in stats)
        timings = {"broadcast": (put - started) * 1e3 + fetch, "compute": compute,
                   "gather": max((gathered - put) * 1e3 - fetch - compute, 0.0),
                   "reduce": (done - gathered) * 1e3, "total": (done - started) * 1e3}
        return {"loss": float(loss), "grads": grads, "jvp": jvp, "count": count, "timings": timings,
                "retries": failures.reruns, "worker_failures": failures.workers_lost}

    @property
    def shared_area(self) -> tuple[str, str] | None:
        """`(folder, token)` of the shared-memory area this executor's actors on this machine
        map (cluster/shared.py), or None."""
        return self._backend.shared_area

    def watch_workers(self, on_alive) -> None:
        """`on_alive(n)` now and whenever the number of running workers in the pool changes (the
        gateway sets its workers-alive gauge so); the cluster package itself records no metrics."""
        self._backend.watch_workers(on_alive)

    def create_trainer(self, config: TrainerConfig, params: Mapping[str, np.ndarray]) -> Trainer:
        trainer = Trainer(self._backend, config, params)
        self._trainers.add(trainer)
        return trainer

    def shutdown(self) -> None:
        for trainer in list(self._trainers):
            trainer.close()
        self._trainers.clear()
        self._backend.release_workers("__executor__")
        self._backend.shutdown()

    def _model(self, spec) -> Model:
        return self._models.get(spec)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown()


def _sum_over(grad_parts, name):
    if isinstance(grad_parts[0]["grads"][name], SparseRows):  # a table: the rows any shard read
        return SparseRows.combine(np, [part["grads"][name] for part in grad_parts])
    total = np.array(grad_parts[0]["grads"][name], copy=True)
    for part in grad_parts[1:]:
        total += part["grads"][name]
    return total


class LocalExecutor(Executor):
    """In-process executor with the same interface (unit tests, tiny jobs)."""

    def __init__(self, num_workers: int = 1):
        from .local import LocalBackend

        super().__init__(LocalBackend(num_workers), num_workers)


class RayExecutor(Executor):
    """Ray actors. `address=None` (and no RAY_ADDRESS) or "local": an embedded runtime started
    here; otherwise connect to that cluster ("auto", "HOST:PORT", "ray://...")."""

    def __init__(self, address: str | None = None, num_workers: int = 2, *,
                 num_cpus: int | None = None, object_store_memory: int | None = None):
        from .remote import RayBackend
        from .runtime import RayRuntime

        self.runtime = RayRuntime.connect(address, num_cpus=num_cpus or 0,
                                          min_cpus=num_workers,
                                          object_store_memory=object_store_memory)
        try:
            super().__init__(RayBackend(), num_workers)
        except BaseException:
            self.runtime.disconnect()
            raise

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self.runtime.disconnect()
