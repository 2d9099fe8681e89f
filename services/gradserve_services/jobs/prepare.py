"""Everything a job checks and computes before its first step: data, split, spec, optimizer.

`prepare_job` either returns a `PreparedJob` or raises `InvalidArgument` naming the problem; no
service is started and no step is sent until it has returned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from gradserve_services.errors import InvalidArgument

from .datasets import LOSS_FOR_TASK, Dataset, load_dataset
from .jobfile import Job
from .modelspec import build_spec
from .split import BatchOrder, Split, split_dataset

__all__ = ["PreparedJob", "prepare_job"]


@dataclass(frozen=True)
class PreparedJob:
    job: Job
    dataset: Dataset
    split: Split
    spec: dict
    optimizer: dict  # complete, validated by the same rules the parameter server applies
    order: BatchOrder

    @property
    def total_steps(self) -> int:
        return self.job.train.epochs * self.order.steps_per_epoch

    def fingerprint(self) -> str:
        """What a checkpoint must agree with to be resumed: the same model, data, batch order and
        optimizer. Epochs may differ (a resumed job may train longer) unless a schedule's length
        was derived from them: the restored session keeps the schedule it was saved with."""
        identity = {
            "spec": self.spec,
            "optimizer": self.optimizer,
            "data": [self.dataset.source, len(self.split.x_train), len(self.split.x_test)],
            "test_fraction": self.job.dataset.test_fraction,
            "batch_size": self.order.batch_size,
            "seed": self.job.seed,
        }
        if self.job.table_optimizer is not None:
            identity["table_optimizer"] = self.job.table_optimizer
        if self.job.dataset.categorical or self.job.dataset.bags:  # the same values on other rows: other data
            config = self.job.dataset
            identity["hashing"] = [list(config.categorical), config.hash_rows, config.hash_seed]
            if config.bags:
                identity["bags"] = [list(config.bags), config.bag_separator]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prepare_job(job: Job) -> PreparedJob:
    dataset = load_dataset(job.dataset, job.model.loss, seed=job.seed)
    loss = job.model.loss or LOSS_FOR_TASK[dataset.task]
    split = split_dataset(
        dataset,
        test_fraction=job.dataset.test_fraction,
        seed=job.seed,
        standardize=job.dataset.standardize,
        standardize_target=job.dataset.standardize_target,
    )
    if len(split.x_train) == 0 or len(split.x_test) == 0:
        raise InvalidArgument("the split leaves an empty train or test set", field="dataset.test_fraction")
    fields = 0 if dataset.ids is None else dataset.ids.shape[1]
    spec = build_spec(job.model, input_features=dataset.x.shape[1], output_width=dataset.num_outputs, loss=loss,
                      categorical_fields=fields, bags=tuple(dataset.bags), table_rows=dataset.table_rows)
    order = BatchOrder(num_samples=len(split.x_train), batch_size=job.train.rows_per_step, seed=job.seed)
    last = len(split.x_train) % order.batch_size
    if job.train.rows_per_step != job.train.batch_size and 0 < last < job.train.local_steps:
        raise InvalidArgument(f"an epoch's last round would hold {last} rows, fewer than its "
                              f"{job.train.local_steps} inner steps", field="train.batch_size")
    optimizer = _complete_optimizer(job.optimizer, job.train.epochs * order.steps_per_epoch)
    return PreparedJob(job=job, dataset=dataset, split=split, spec=spec, optimizer=optimizer, order=order)


def _complete_optimizer(config: dict, total_steps: int) -> dict:
    """Fill a schedule's `total_steps` from the job's length, then validate with the optimizer's own
    parser so a config the parameter server would refuse fails here, before training."""
    from gradserve_services.optim import OptimizerConfig

    config = json.loads(json.dumps(config))
    schedule = config.get("schedule")
    if schedule is not None and schedule.get("name") in ("cosine",) and "total_steps" not in schedule:
        schedule["total_steps"] = total_steps
    OptimizerConfig.from_dict(config)
    return config
