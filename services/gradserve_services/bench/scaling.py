"""scaling: gradserve sync training throughput vs worker count at a fixed per-worker batch.

Efficiency at N workers = samples/s at N / (N * samples/s at 1). Workers are one BLAS thread each,
so beyond the machine's core count efficiency drops by design; the record says how many cores.
"""

from __future__ import annotations

import json
import os

from .training import measure_gradserve

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--per-worker-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per worker count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: embedded)")


def run(args) -> int:
    from gradserve_services.cluster import RayExecutor

    counts = [int(part) for part in args.workers.split(",") if part.strip()]
    executor = RayExecutor(address=args.ray_address, num_workers=1, num_cpus=max(counts))
    baseline = None
    try:
        for workers in counts:
            measured = measure_gradserve(executor, workers=workers,
                                         batch=workers * args.per_worker_batch,
                                         steps=args.steps, warmup=args.warmup)
            rate = measured["samples_per_s"]
            baseline = baseline or (rate / workers if workers == 1 else None)
            record = {"suite": "scaling", "workers": workers, "cores": os.cpu_count(),
                      "per_worker_batch": args.per_worker_batch, "samples_per_s": round(rate, 1),
                      "efficiency": round(rate / (workers * baseline), 3) if baseline else None,
                      **measured["breakdown"]}
            print(json.dumps(record), flush=True)
    finally:
        executor.shutdown()
    return 0
