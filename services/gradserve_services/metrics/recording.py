"""Recording what the gateway sees: each finished RPC, each step's numbers as its workers and
parameter servers returned them, the pool and session counts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .definitions import (
    ACTIVE_SESSIONS,
    COMPRESSION_RATIO,
    COMPUTE_SPREAD,
    GRADIENT_COMPRESSED_BYTES,
    GRADIENT_RAW_BYTES,
    GRAD_NORM,
    LOSS,
    NOISE_SCALE,
    PARAMETER_VERSION,
    RPCS,
    RPC_DURATION,
    RPC_RECEIVED_BYTES,
    RPC_SENT_BYTES,
    SAMPLES,
    SHARD_COSINE,
    SLOWEST_WORKER,
    STALENESS,
    STEP_DURATION,
    STEP_PHASES,
    STEP_PHASE_DURATION,
    TABLE_DENSE_BYTES,
    TABLE_ROWS,
    TABLE_STORED_BYTES,
    TABLE_STORED_ROWS,
    TABLE_UNIQUE_ROW_RATIO,
    TABLE_WIRE_BYTES,
    UPDATES,
    UPDATE_OUTCOMES,
    UPDATE_RATIO,
    WORKERS_ALIVE,
    WORKER_FAILURES,
    WORKER_RETRIES,
    STEPS_BEGUN_AHEAD,
    position_label,
)

__all__ = [
    "declare_rpc_methods", "record_rpc", "record_step", "record_table_step", "set_workers_alive",
    "set_active_sessions", "record_step_begun_ahead",
]


def declare_rpc_methods(methods: Iterable[str]) -> None:
    """Create the per-method series of a service's methods at zero (their OK count too), so the
    first call of each shows as an increase to a rate, not as a series that appeared."""
    for method in methods:
        RPCS.labels(method=method, code="OK")
        RPC_DURATION.labels(method=method)
        RPC_RECEIVED_BYTES.labels(method=method)
        RPC_SENT_BYTES.labels(method=method)


def record_rpc(
    method: str, code: str, seconds: float, bytes_received: int = 0, bytes_sent: int = 0
) -> None:
    """Record one finished RPC.

    `method` is the short RPC name (`"Train"`, not the full path) and `code` the gRPC status code
    name (`"OK"`, `"INVALID_ARGUMENT"`): both come from fixed, small sets.
    """
    RPCS.labels(method=method, code=code).inc()
    RPC_DURATION.labels(method=method).observe(seconds)
    if bytes_received:
        RPC_RECEIVED_BYTES.labels(method=method).inc(bytes_received)
    if bytes_sent:
        RPC_SENT_BYTES.labels(method=method).inc(bytes_sent)


def record_step(
    *,
    duration_s: float,
    phases_s: Mapping[str, float],
    samples: int,
    loss: float,
    grad_norm: float,
    version: int,
    staleness: Iterable[int] = (),
    applied: int = 1,
    duplicate: int = 0,
    dropped_stale: int = 0,
    worker_failures: int = 0,
    retries: int = 0,
    bytes_raw: int = 0,
    bytes_compressed: int = 0,
    mode: str = "sync",
    noise_scale: float = math.nan,
    shard_cosines: Iterable[float] = (),
    update_ratios: Iterable[float] = (),
    compute_spread: float = math.nan,
    slowest_worker: int = -1,
) -> None:
    """Record one training step from the numbers its workers and parameter server returned.

    `phases_s` maps phase names to seconds; only `STEP_PHASES` are recorded, other keys (a
    coordinator's extra timings such as a total) are ignored so they cannot add label values.
    `staleness` holds one value per shard gradient (versions behind when it was applied).
    A NaN loss or norm is still recorded: a diverging run should be visible, not hidden. The
    training signals are recorded where defined (NaN and -1 mean "not measured this step").
    """
    STEP_DURATION.labels(mode=mode).observe(duration_s)
    for phase in STEP_PHASES:
        if phase in phases_s:
            STEP_PHASE_DURATION.labels(phase=phase).observe(phases_s[phase])
    if samples:
        SAMPLES.inc(samples)
    LOSS.set(loss)
    GRAD_NORM.set(grad_norm)
    PARAMETER_VERSION.set(version)
    for versions_behind in staleness:
        STALENESS.observe(versions_behind)
    for outcome, count in zip(UPDATE_OUTCOMES, (applied, duplicate, dropped_stale)):
        if count:
            UPDATES.labels(outcome=outcome).inc(count)
    if worker_failures:
        WORKER_FAILURES.inc(worker_failures)
    if retries:
        WORKER_RETRIES.inc(retries)
    if bytes_raw:
        GRADIENT_RAW_BYTES.inc(bytes_raw)
    if bytes_compressed:
        GRADIENT_COMPRESSED_BYTES.inc(bytes_compressed)
    if bytes_raw and bytes_compressed:
        COMPRESSION_RATIO.set(bytes_raw / bytes_compressed)
    elif bytes_raw:
        COMPRESSION_RATIO.set(1.0)
    _record_signals(mode, noise_scale, shard_cosines, update_ratios, compute_spread, slowest_worker)


def _record_signals(mode, noise_scale, shard_cosines, update_ratios, compute_spread, slowest_worker):
    if math.isfinite(noise_scale):
        NOISE_SCALE.labels(mode=mode).set(noise_scale)
    for cosine in shard_cosines:
        if math.isfinite(cosine):
            SHARD_COSINE.observe(cosine)
    for ratio in update_ratios:
        if math.isfinite(ratio):
            UPDATE_RATIO.observe(ratio)
    if math.isfinite(compute_spread):
        COMPUTE_SPREAD.observe(compute_spread)
    if slowest_worker >= 0:
        SLOWEST_WORKER.labels(position=position_label(slowest_worker)).inc()



def record_table_step(*, rows_pulled: int, rows_pushed: int, bytes_pulled: int, bytes_pushed: int,
                      dense_table_bytes: int, rows_updated: int, row_lookups: int, table_rows: int,
                      table_bytes: int) -> None:
    """Record one step's table traffic (StepResult's table fields, cluster/config.py)."""
    TABLE_ROWS.labels(direction="pulled").inc(rows_pulled)
    TABLE_ROWS.labels(direction="pushed").inc(rows_pushed)
    TABLE_WIRE_BYTES.labels(direction="pulled").inc(bytes_pulled)
    TABLE_WIRE_BYTES.labels(direction="pushed").inc(bytes_pushed)
    TABLE_DENSE_BYTES.inc(dense_table_bytes)
    if row_lookups:
        TABLE_UNIQUE_ROW_RATIO.set(rows_updated / row_lookups)
    TABLE_STORED_ROWS.set(table_rows)
    TABLE_STORED_BYTES.set(table_bytes)


def record_step_begun_ahead() -> None:
    STEPS_BEGUN_AHEAD.inc()


def set_workers_alive(n: int) -> None:
    """Set the number of live worker actors: the gateway hands this to `Executor.watch_workers`, so
    the worker pool reports it when created, grown, shrunk, on a worker lost (one fewer until its
    replacement runs) and at shutdown (0)."""
    WORKERS_ALIVE.set(n)


def set_active_sessions(n: int) -> None:
    """Set the number of open training sessions (the gateway's session table size)."""
    ACTIVE_SESSIONS.set(n)
