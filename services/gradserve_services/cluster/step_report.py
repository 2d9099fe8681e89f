"""A step's `StepResult` from what its workers and servers reported, and the clock its phases are
timed with (the same fields for every algorithm)."""

from __future__ import annotations

import math
import time

from .config import StepResult
from .shard_runner import Failures
from .signals import compute_spread, slowest_position

__all__ = ["Clock", "global_norm_of", "step_result"]


class Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def rebase(self, start: float) -> None:
        """Time the step from `start` (perf_counter: when the step before it ended). What a step
        begun ahead did before then overlapped that step, and counts in none of its phases."""
        self.start = max(self.start, start)
        self.marks = {name: max(mark, self.start) for name, mark in self.marks.items()}

    def between(self, first: str | None, second: str) -> float:
        begin = self.start if first is None else self.marks[first]
        return (self.marks[second] - begin) * 1e3


def global_norm_of(reports: list[dict]) -> float:
    """The update's gradient norm from the server shards' (each measured its parameter slice)."""
    return math.sqrt(sum(report["grad_norm"] ** 2 for report in reports))


def step_result(mode: str, stats: list[dict], reports: list[dict], clock: Clock, failures: Failures, *,
                grad_norm: float, positions: list[int]) -> StepResult:
    """`stats`: the workers' (one per shard), `reports`: the servers' (one per update handled)."""
    samples = sum(s["count"] for s in stats)
    fetch = max(s["fetch_ms"] for s in stats)
    compute = max(s["compute_ms"] for s in stats)
    workers_phase = clock.between("put", "gathered")
    applied = [r for r in reports if r["applied"]]
    timings = {
        "broadcast": clock.between(None, "put") + fetch,
        "compute": compute,
        "gather": max(workers_phase - fetch - compute, 0.0),
        "apply": clock.between("gathered", "applied"),
        "total": clock.between(None, "applied"),
        "server_apply": sum(r.get("apply_ms", 0.0) for r in reports),
    }
    compute_ms = [s["compute_ms"] for s in stats]
    return StepResult(
        loss=sum(s["loss_sum"] for s in stats) / samples,
        version=max(r["version"] for r in reports),
        applied=bool(applied),
        timings=timings,
        samples=samples,
        grad_norm=float(grad_norm),
        lr=applied[-1]["lr"] if applied else 0.0,
        staleness=tuple(r["staleness"] for r in reports),
        updates_applied=len(applied),
        updates_dropped=len(reports) - len(applied),
        worker_failures=failures.workers_lost,
        retries=failures.reruns,
        bytes_raw=sum(s["bytes_raw"] for s in stats),
        bytes_compressed=sum(s["bytes_sent"] for s in stats),
        worker_compute_ms=tuple(compute_ms),
        mode=mode,
        compute_spread=compute_spread(compute_ms),
        slowest_worker=slowest_position(positions, compute_ms),
    )
