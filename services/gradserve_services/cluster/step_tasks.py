"""What each worker is told for its shard of a training step (the same for every algorithm)."""

from __future__ import annotations

from .config import TrainerConfig
from .sharding import split_rows

__all__ = ["dropout_seed", "shard_tasks"]


def dropout_seed(config: TrainerConfig, steps_run: int) -> int:
    """Step k's dropout seed (masks also depend on the global sample index, never on sharding)."""
    return (config.seed * 1_000_003 + steps_run) % 2**31


def shard_tasks(config: TrainerConfig, table: str, partition: list[list[str]], rows: int,
                num_workers: int, steps_run: int, shared_memory: bool = False) -> list[dict]:
    """One task per shard of `rows`, in pool order. With `shared_memory` (sync steps on a machine
    with an area) a worker with a lane writes its gradients into blocks."""
    seed = dropout_seed(config, steps_run)
    tasks = []
    for position, (start, stop) in enumerate(split_rows(rows, num_workers)):
        task = {"spec": config.spec, "table": table, "start": start, "stop": stop, "finite_only": True,
                "partition": partition, "micro_batch_size": config.micro_batch_size, "seed": seed,
                "compression": config.compression, "topk_fraction": config.topk_fraction,
                "batch_shard": position, "shared_memory": shared_memory}
        tasks.append(task)
    return tasks
