"""What a trainer is configured with (`TrainerConfig`) and what one step reports (`StepResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from gradserve_services.errors import InvalidArgument
from gradserve_services.optim import OptimizerConfig
from gradserve_services.optim.rows import TableOptimizerConfig, default_table_optimizer

from .gradient_push import DEFAULT_BUCKET_BYTES
from .steplog import DEFAULT_STEP_WINDOW

__all__ = ["TrainerConfig", "StepResult", "DEFAULT_CALL_TIMEOUT_S", "CONSISTENCY_MODES", "STALE_POLICIES", "COMPRESSIONS",
           "ROUND_MODES", "SYNC_ONLY_COMPRESSIONS", "INNER_OPTIMIZER", "OUTER_OPTIMIZER"]

CONSISTENCY_MODES = ("sync", "async", "bounded", "local")
STALE_POLICIES = ("drop", "downweight")
COMPRESSIONS = ("none", "fp16", "int8", "topk", "powersgd")
# Modes whose step is a round of local inner steps (local_round.py).
ROUND_MODES = ("local",)
# Compressions that need every shard of a step before the update (two phases through the servers).
SYNC_ONLY_COMPRESSIONS = ("powersgd",)
# local mode: the workers' inner optimizer and, as `optimizer`, the servers' outer one (DiLoCo's).
INNER_OPTIMIZER = {"name": "adamw", "lr": 0.001}
OUTER_OPTIMIZER = {"name": "nesterov", "lr": 0.7, "momentum": 0.9}


# Sync steps measure the gradient signals on every SIGNALS_EVERY-th step (see TrainerConfig).
SIGNALS_EVERY = 8
# How long one call of a step (a worker's shard, the servers' update) may take by default before
# its actor counts as stuck (TrainerConfig.call_timeout_s). DDP's default collective timeout is of
# the same order: long beside any step, short beside a job.
DEFAULT_CALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class TrainerConfig:
    """`consistency`: "sync" (one update per step from all shards, a barrier), "async" (each shard's
    gradient applied on arrival, whatever its staleness) or "bounded" (applied on arrival only if
    `current_version - computed_on_version <= staleness`, else dropped or down-weighted by
    `(staleness + 1) / (versions_behind + 1)` per `stale_policy`). `step_window`: how many of the
    most recent step ids keep their recorded results (see steplog.py). `signals_every`: sync steps
    measure the gradient signals (noise scale, shard cosines, update ratios; signals.py) on every
    Nth step only — they cost a few passes over the gradients, and the noise scale is an average
    over steps anyway; the other steps report the current smoothed noise scale.

    "local" (local_round.py): a step is a round of `local_steps` inner steps of `inner_optimizer`
    on each worker; `optimizer` is then the servers' outer optimizer, applied to the
    sample-weighted mean parameter delta (OUTER_OPTIMIZER is DiLoCo's). `compression` "powersgd"
    (powersgd.py, sync only) sends each matrix gradient as rank-`powersgd_rank` factors.

    `call_timeout_s` bounds each call a step waits for (None: no bound): a worker that has not
    returned its shard by then is stopped and replaced, and the shard re-run elsewhere; a parameter
    server stuck in a call is stopped and replaced (ParameterServerLost: restore the trainer), one
    that answers but has not finished fails the step with Unavailable (resend it: its id applies
    once)."""

    spec: Any
    optimizer: Mapping | OptimizerConfig = field(default_factory=lambda: {"name": "sgd", "lr": 0.1})
    consistency: str = "sync"
    staleness: int = 0
    stale_policy: str = "drop"
    num_workers: int = 2
    ps_shards: int = 1
    compression: str = "none"
    micro_batch_size: int | None = None
    seed: int = 0
    topk_fraction: float = 0.01
    step_window: int = DEFAULT_STEP_WINDOW
    signals_every: int = SIGNALS_EVERY
    # The per-row rule of the model's tables (optim/rows.py); None: derived from `optimizer`.
    table_optimizer: Mapping | TableOptimizerConfig | None = None
    # Keep a model's tables whole among the dense parameters (sent and updated whole by
    # `optimizer`) instead of row-sharded (table_lane.py): the peer bench sparse measures against.
    dense_tables: bool = False
    local_steps: int = 10
    inner_optimizer: Mapping | OptimizerConfig = field(default_factory=lambda: dict(INNER_OPTIMIZER))
    powersgd_rank: int = 4
    # Sync steps on Ray: workers push their gradient sums to the servers in buckets during
    # backward (gradient_push.py); False: each returns its sums when done. The same update either
    # way. None: push where the servers' machine (the coordinator's) has a core to spare beyond the
    # workers, so the servers sum buckets while the workers compute; where the workers fill every
    # core the summing only takes their time (bench training: 0.97x of returned sums on 2 cores).
    push_gradients: bool | None = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # about how much one push carries
    call_timeout_s: int | None = DEFAULT_CALL_TIMEOUT_S

    def validated(self) -> "TrainerConfig":
        """A copy with the optimizer parsed; InvalidArgument names the bad field as `config.X`."""
        _one_of(self.consistency, CONSISTENCY_MODES, "config.consistency")
        _one_of(self.stale_policy, STALE_POLICIES, "config.stale_policy")
        _one_of(self.compression, COMPRESSIONS, "config.compression")
        _integer(self.staleness, "config.staleness", low=0)
        _integer(self.num_workers, "config.num_workers", low=1)
        _integer(self.ps_shards, "config.ps_shards", low=1)
        _integer(self.seed, "config.seed", low=0)
        _integer(self.step_window, "config.step_window", low=1)
        _integer(self.signals_every, "config.signals_every", low=1)
        if self.micro_batch_size is not None:
            _integer(self.micro_batch_size, "config.micro_batch_size", low=1)
        _integer(self.local_steps, "config.local_steps", low=1)
        _integer(self.powersgd_rank, "config.powersgd_rank", low=1)
        _integer(self.bucket_bytes, "config.bucket_bytes", low=1)
        if self.call_timeout_s is not None:
            _integer(self.call_timeout_s, "config.call_timeout_s", low=1)
        if self.compression in SYNC_ONLY_COMPRESSIONS and self.consistency != "sync":
            raise InvalidArgument(f"{self.compression} needs consistency 'sync', got "
                                  f"{self.consistency!r}", "config.compression")
        try:
            inner = OptimizerConfig.from_dict(self.inner_optimizer)
        except InvalidArgument as bad:  # its fields are named optimizer.X: say which optimizer
            raise InvalidArgument(bad.message, "config.inner_" + (bad.field or "optimizer")) from None
        fraction = self.topk_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0.0 < fraction <= 1.0:
            raise InvalidArgument(f"must be in (0, 1], got {fraction!r}", "config.topk_fraction")
        if self.push_gradients is not None and not isinstance(self.push_gradients, bool):
            raise InvalidArgument(f"must be true, false or unset, got {self.push_gradients!r}",
                                  "config.push_gradients")
        if not isinstance(self.dense_tables, bool):
            raise InvalidArgument(f"must be true or false, got {self.dense_tables!r}", "config.dense_tables")
        tables = default_table_optimizer(OptimizerConfig.from_dict(self.optimizer).to_dict()) \
            if self.table_optimizer is None else TableOptimizerConfig.from_dict(self.table_optimizer)
        self = replace(self, table_optimizer=tables)
        return replace(self, optimizer=OptimizerConfig.from_dict(self.optimizer), inner_optimizer=inner)


def _one_of(value, allowed, field_name):
    if value not in allowed:
        raise InvalidArgument(f"must be one of {allowed}, got {value!r}", field_name)


def _integer(value, field_name, *, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"must be an integer >= {low}, got {value!r}", field_name)


@dataclass(frozen=True)
class StepResult:
    """One step's outcome. `timings` are milliseconds: broadcast (data put + parameter fetch on the
    slowest worker), compute (slowest worker's forward+backward), gather (dispatch and result
    transfer: the workers phase minus broadcast and compute), apply (parameter-server phase as the
    coordinator saw it), total. `staleness` holds versions-behind per shard gradient handled."""

    loss: float
    version: int
    duplicate: bool = False
    applied: bool = True
    timings: dict = field(default_factory=dict)
    samples: int = 0
    grad_norm: float = 0.0
    lr: float = 0.0
    staleness: tuple = ()
    updates_applied: int = 0
    updates_dropped: int = 0
    worker_failures: int = 0
    retries: int = 0
    bytes_raw: int = 0
    bytes_compressed: int = 0
    worker_compute_ms: tuple = ()
    mode: str = "sync"
    # Gradient signals (signals.py), sync steps that applied an update; NaN / empty otherwise.
    noise_scale: float = math.nan  # B_simple, smoothed over steps; NaN until estimable
    shard_cosines: tuple = ()  # cosine of each shard's gradient with the aggregate, shard order
    update_ratios: dict = field(default_factory=dict)  # |update| / |weight| per parameter
    # Stragglers: max / median of worker_compute_ms, and the pool position of the slowest worker.
    compute_spread: float = math.nan
    slowest_worker: int = -1
    # Tables (table_lane.py; 0 without): rows and bytes workers pulled and pushed (each its
    # shard's distinct rows), distinct rows updated, lookups the batch made, what pulling and
    # pushing the tables whole would have moved, and what the servers hold after the step.
    rows_pulled: int = 0
    rows_pushed: int = 0
    rows_updated: int = 0
    row_lookups: int = 0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    dense_table_bytes: int = 0
    table_rows: int = 0
    table_bytes: int = 0

    @property
    def bytes_saved(self) -> int:
        return self.bytes_raw - self.bytes_compressed

    def to_record(self) -> dict:
        """JSON-able form, kept in the step log (and checkpoints) to answer repeated step ids."""
        record = asdict(self)
        record["staleness"] = list(self.staleness)
        record["worker_compute_ms"] = list(self.worker_compute_ms)
        record["shard_cosines"] = list(self.shard_cosines)
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> "StepResult":
        record = dict(record)
        record["staleness"] = tuple(record.get("staleness", ()))
        record["worker_compute_ms"] = tuple(record.get("worker_compute_ms", ()))
        record["shard_cosines"] = tuple(record.get("shard_cosines", ()))
        return cls(**record)
