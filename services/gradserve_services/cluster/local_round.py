"""Local-SGD rounds (DiLoCo, Douillard et al., 2023, arXiv 2311.08105), the math of one round.

A step of a "local" trainer is a round: its batch holds H successive inner batches (the rows split
into H contiguous, nearly equal ranges), each inner batch split over the workers as a sync step
splits a batch. From the round's global parameters θ each worker runs H inner optimizer steps, one
per inner batch, on its own shard of it, and returns the pseudo-gradient of its shard,

    Δ_i = θ - θ_i   (as a SUM: Δ_i * n_i, n_i = the rows it trained on)

so the parameter servers' usual `sum(parts) / count` is the sample-weighted mean delta, and their
optimizer (the outer one, Nesterov in DiLoCo) applies it as it would a gradient.

The inner optimizer starts fresh each round (zero moments, its schedule at step 0): a round is then
a pure function of (θ, the round's batch, the seed), so a worker lost mid-round has its shard's inner
steps re-run on a live worker and the round's result is the one without the fault, and a checkpoint
between rounds holds everything (no per-worker optimizer state to lose or to carry). DiLoCo keeps
the inner moments across rounds; starting them fresh costs the first few inner steps of a round
their bias-corrected, sign-like size, which over H >= 10 steps is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from gradserve_services.optim import Optimizer

from .sharding import split_rows
from .step_tasks import shard_tasks

__all__ = ["RoundResult", "round_ranges", "inner_seed", "run_round", "round_tasks", "run_task_round"]


@dataclass
class RoundResult:
    grad_sum: dict  # the pseudo-gradient sum (θ - θ_i) * count per parameter, as a GradSum holds
    loss_sum: float  # sum of per-sample losses over the inner steps, each at its own θ
    count: int  # rows trained on


def round_ranges(rows: int, inner_steps: int, workers: int) -> list[list[tuple[int, int]]]:
    """Per worker, the row ranges of its shard of each inner batch (in inner-step order). A worker
    gets no range of an inner batch with fewer rows than workers; a list may be empty."""
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(workers)]
    for start, stop in split_rows(rows, inner_steps):
        for position, (lo, hi) in enumerate(split_rows(stop - start, workers)):
            ranges[position].append((start + lo, start + hi))
    return ranges


def inner_seed(seed: int, round_index: int, inner_steps: int, step: int) -> int:
    """The dropout seed of inner step `step` of round `round_index`: inner steps are numbered on
    across rounds, k = round * H + step, with the sync steps' rule (config.seed * 1000003 + k)."""
    return (seed * 1_000_003 + round_index * inner_steps + step) % 2**31


def run_round(model, params: Mapping[str, np.ndarray], x, y, ranges: list[tuple[int, int]],
              inner_optimizer, seeds: list[int], *, offsets: list[int] | None = None,
              micro_batch_size=None) -> RoundResult:
    """The inner steps of one worker: `ranges[h]` is its shard of inner batch h (rows of `x`),
    `seeds[h]` that inner step's dropout seed, `offsets[h]` the global index of its first row (for
    the dropout masks; default the range's start). `params` is left as it was."""
    local = {name: np.array(value, copy=True, order="C") for name, value in params.items()}
    optimizer = Optimizer(inner_optimizer, local)
    offsets = [start for start, _ in ranges] if offsets is None else offsets
    loss_sum, count = 0.0, 0
    for (start, stop), seed, offset in zip(ranges, seeds, offsets):
        result = model.loss_and_grad_sum(local, x[start:stop], y[start:stop],
                                         micro_batch_size=micro_batch_size, seed=seed,
                                         sample_offset=offset)
        optimizer.step(local, [result.grad_sum], grad_scale=1.0 / result.count)
        loss_sum += result.loss_sum
        count += result.count
    grad_sum = {}
    for name, value in params.items():
        delta = np.subtract(value, local[name], out=local[name])
        delta *= delta.dtype.type(count)
        grad_sum[name] = delta
    return RoundResult(grad_sum, loss_sum, count)


def round_tasks(config, table: str, partition, rows: int, num_workers: int, rounds_run: int
                ) -> list[tuple[dict, list[tuple[int, int]]]]:
    """`(task, rows)` per worker with something to train on: the sync step's worker task
    (step_tasks.py) plus its round (`local`), and the global row ranges it trains on. The worker
    is sent those rows only, one after the other: its task's ranges index that array, `offsets`
    keep the global sample index for dropout. (Workers left without a range, with fewer rows per
    inner batch than workers, get no task; inner batches shrink from first to last, so a worker
    misses only the last ones and `seeds` is cut to its length.)"""
    ranges = [worker for worker in round_ranges(rows, config.local_steps, num_workers) if worker]
    seeds = [inner_seed(config.seed, rounds_run, config.local_steps, h)
             for h in range(config.local_steps)]
    tasks = shard_tasks(config, table, partition, rows, len(ranges), rounds_run)
    out = []
    for task, global_ranges in zip(tasks, ranges):
        local_ranges, at = [], 0
        for start, stop in global_ranges:
            local_ranges.append((at, at + stop - start))
            at += stop - start
        task.update(start=0, stop=at, count=at, compression=config.compression,
                    local={"ranges": local_ranges, "offsets": [start for start, _ in global_ranges],
                           "seeds": seeds[:len(global_ranges)],
                           "inner_optimizer": config.inner_optimizer.to_dict()})
        out.append((task, global_ranges))
    return out


def run_task_round(model, params, x, y, task: dict) -> RoundResult:
    """`run_round` of a worker task made by `round_tasks`."""
    local = task["local"]
    return run_round(model, params, x, y, [tuple(r) for r in local["ranges"]],
                     local["inner_optimizer"], local["seeds"], offsets=local["offsets"],
                     micro_batch_size=task.get("micro_batch_size"))
