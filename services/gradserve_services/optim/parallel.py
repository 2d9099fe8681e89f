"""The update loop over cache-sized blocks, split over threads.

A sync update is applied once every worker's gradient is in: the workers wait for it, so on their
machine their cores are free. numpy releases the GIL inside each block's operations, so threads
walking disjoint runs of blocks update in parallel. Every element goes through the same operations
as in one walk; each block's reductions (the squared norm, the parts' products, the sums behind
the update ratios) are kept per block and added up in block order afterwards, so the result is
bitwise the one-thread result.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gradserve_services.optim.blocks import BLOCK_ELEMENTS, block_count, parameter_blocks
from gradserve_services.optim.rules import RULES

__all__ = ["update_all", "apply_threads", "PARALLEL_MIN_ELEMENTS"]

# Below this many parameters a thread's start-up costs more than its share of the work saves.
PARALLEL_MIN_ELEMENTS = 1 << 20
MAX_THREADS = 4

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def apply_threads(idle_cores: bool = False) -> int:
    """Threads of one update: `GRADSERVE_APPLY_THREADS` ("auto": this process's cores, at most 4;
    a number: that many) where set; else "auto" for an update made while the caller knows the
    machine's workers wait for it (`idle_cores`: a pushed sync update, whose workers have all
    finished), and 1 otherwise: threads pay off only where cores are idle during the update; on a
    machine busy with other work they made it slower, not faster."""
    configured = os.environ.get("GRADSERVE_APPLY_THREADS", "auto" if idle_cores else "1").strip().lower()
    if configured == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), MAX_THREADS))
    return max(1, min(int(configured), MAX_THREADS))


def update_all(config, params, grad_parts, state, plan, update_ratios, products, threads=None,
               idle_cores: bool = False) -> float:
    """Update every block of `params` in place; fills `update_ratios` and `products` when given
    (dicts) and returns the summed gradient's squared norm (unscaled)."""
    threads = apply_threads(idle_cores) if threads is None else threads
    blocks = block_count(params)
    elements = sum(param.size for param in params.values())
    if threads > 1 and blocks > 1 and elements >= PARALLEL_MIN_ELEMENTS:
        cuts = [blocks * k // min(threads, blocks) for k in range(min(threads, blocks) + 1)]
        runs = [(cuts[k], cuts[k + 1]) for k in range(len(cuts) - 1)]
        pool = _threads(MAX_THREADS)
        futures = [pool.submit(_update_run, config, params, grad_parts, state, plan, first, stop,
                               products is not None, update_ratios is not None)
                   for first, stop in runs[1:]]
        records = _update_run(config, params, grad_parts, state, plan, *runs[0],
                              products is not None, update_ratios is not None)
        for future in futures:  # in block order
            records.extend(future.result())
    else:
        records = _update_run(config, params, grad_parts, state, plan, 0, blocks,
                              products is not None, update_ratios is not None)
    return _add_up(records, len(grad_parts), update_ratios, products)


def _update_run(config, params, grad_parts, state, plan, first: int, stop: int,
                want_products: bool, want_ratios: bool) -> list[tuple]:
    """Update blocks [first, stop); one record per block: (name, squared norm, parts' squared
    norms, parts' dot products with the sum, |old|^2, |new - old|^2)."""
    rule = RULES[config.name]
    records = []
    before = None
    for name, param, grad, slots, scratch, part_blocks in parameter_blocks(
            params, grad_parts, state, parts=True, first=first, stop=stop):
        with np.errstate(over="ignore", invalid="ignore"):  # reported norms: huge gradients pass
            squared = float(np.dot(grad, grad))
            part_sq = [float(np.dot(block, block)) for block in part_blocks] if want_products else ()
            part_dot = [float(np.dot(block, grad)) for block in part_blocks] if want_products else ()
        old_sq = change_sq = 0.0
        if want_ratios:
            if before is None or before.size < param.size or before.dtype != param.dtype:
                before = np.empty(max(param.size, BLOCK_ELEMENTS), param.dtype)
            old = before[:param.size]
            np.copyto(old, param)
            old_sq = float(np.dot(old, old))
        rule(config, param, grad, slots, scratch, plan.scale, plan.coefficients)
        if want_ratios:
            np.subtract(param, old, out=old)
            change_sq = float(np.dot(old, old))
        records.append((name, squared, part_sq, part_dot, old_sq, change_sq))
    return records


def _add_up(records, parts: int, update_ratios, products) -> float:
    """The per-block reductions added in block order, as one walk adds them."""
    squared = 0.0
    shard_sq, shard_dot = [0.0] * parts, [0.0] * parts
    sums = {}  # name -> [|old|^2, |new - old|^2]
    for name, block_sq, part_sq, part_dot, old_sq, change_sq in records:
        squared += block_sq
        if products is not None:
            for index in range(parts):
                shard_sq[index] += part_sq[index]
                shard_dot[index] += part_dot[index]
        if update_ratios is not None:
            totals = sums.setdefault(name, [0.0, 0.0])
            totals[0] += old_sq
            totals[1] += change_sq
    if update_ratios is not None:
        update_ratios.update({name: math.sqrt(change / weight) if weight > 0.0 else math.nan
                              for name, (weight, change) in sums.items()})
    if products is not None:
        products.update(shard_sq=shard_sq, shard_dot=shard_dot, total_sq=squared)
    return squared


def _threads(count: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=count - 1, thread_name_prefix="apply")
        return _pool
