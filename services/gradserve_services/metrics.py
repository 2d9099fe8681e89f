"""Every Prometheus metric of gradserve, defined in this one module.

How numbers reach the exporter: the HTTP exporter runs in the gateway process only
(`gradserve serve --metrics-port`). Ray worker and parameter-server actors live in other processes
and never touch prometheus_client; instead they return their timings and counters inside each step
result (`StepResult.timings`, failure/retry counts, byte counts), and the gateway, which owns the
one exporter, calls `record_step(...)` with them. So a single scrape target shows the whole
cluster, and no metric is lost when a worker process dies.

Conventions (checked by `promtool check metrics` in tests/metrics/):
- names are `gradserve_*`, in base units (`_seconds`, `_bytes`), counters end in `_total`;
- labels are low-cardinality only: an RPC method name, a gRPC status code name, a step phase,
  a consistency mode, an update outcome, a worker pool position capped at `SLOWEST_POSITIONS`
  (a pool position names a pooled worker actor shared by every session, not a session's worker;
  positions from the cap on share one "N+" series). Never a session id, step id or worker id:
  each distinct label value is a new time series kept by Prometheus for weeks. Per-parameter and
  per-shard signals (update ratios, shard cosines) are histograms without a label for the name.

All metrics live on the module-level `REGISTRY`, not prometheus_client's global default, so tests
can start and stop exporters without clashing with other libraries' collectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

__all__ = [
    "REGISTRY",
    "STEP_PHASES",
    "UPDATE_OUTCOMES",
    "DURATION_BUCKETS_SECONDS",
    "STALENESS_BUCKETS",
    "SLOWEST_POSITIONS",
    "METRIC_NAMES",
    "start_metrics_server",
    "stop_metrics_server",
    "record_rpc",
    "record_step",
    "set_workers_alive",
    "set_active_sessions",
]

# In the text format each counter and histogram also gets a `*_created` gauge: a second series per
# label set that nothing here reads (dashboards use rate(), which handles resets by itself).
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
# Process CPU, memory and file descriptors of the gateway are worth having next to its own metrics.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# A step is split into these phases by the coordinator; only these become label values.
STEP_PHASES = ("broadcast", "compute", "gather", "apply")
UPDATE_OUTCOMES = ("applied", "duplicate", "dropped_stale")
CONSISTENCY_MODES = ("sync", "async", "bounded", "local")  # the `mode` label: a session's consistency

# Steps and RPCs range from a millisecond (a tiny MLP on one worker, a health check) to minutes
# (a large model over a slow or recovering cluster); roughly 2.5x apart so p50/p99 estimated by
# histogram_quantile stay within one bucket's width of the truth across that whole range.
DURATION_BUCKETS_SECONDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Staleness is counted in parameter versions; bounded-staleness training allows a handful, so the
# buckets are dense near 0 and coarse beyond what any sane `staleness` bound would permit.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
# Slowest worker over median (1 = even): a few percent is noise, 2x a straggler, 10x a stall.
SPREAD_BUCKETS = (1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
COSINE_BUCKETS = (-0.5, 0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
# |update| / |weight| per step: about 1e-3 is the usual healthy rate; decades either side.
UPDATE_RATIO_BUCKETS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)
# Pool positions 0 .. SLOWEST_POSITIONS - 1 get a series each, the rest share one.
SLOWEST_POSITIONS = 8


def position_label(position: int) -> str:
    """The `position` label of a pool position: itself below the cap, else one shared "N+"."""
    return str(position) if position < SLOWEST_POSITIONS else f"{SLOWEST_POSITIONS}+"


# --- RPCs (recorded by the gateway's interceptor / servicers) --------------------------------
RPCS = Counter(
    "gradserve_rpc_requests",
    "gRPC requests handled, by method and final status code.",
    ["method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "gradserve_rpc_duration_seconds",
    "Wall time from receiving a gRPC request to sending its last response, by method.",
    ["method"],
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
RPC_RECEIVED_BYTES = Counter(
    "gradserve_rpc_received_bytes",
    "Serialized request bytes received, by method.",
    ["method"],
    registry=REGISTRY,
)
RPC_SENT_BYTES = Counter(
    "gradserve_rpc_sent_bytes",
    "Serialized response bytes sent, by method.",
    ["method"],
    registry=REGISTRY,
)

# --- Training steps (recorded by the gateway from each step result) ---------------------------
STEP_DURATION = Histogram(
    "gradserve_step_duration_seconds",
    "Wall time of one training step, end to end, by consistency mode (sync/async).",
    ["mode"],
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
STEP_PHASE_DURATION = Histogram(
    "gradserve_step_phase_duration_seconds",
    "Wall time of one phase of a training step: broadcast, compute, gather or apply.",
    ["phase"],
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
SAMPLES = Counter(
    "gradserve_samples_processed",
    "Training samples whose gradients were computed (forward + backward) by the workers.",
    registry=REGISTRY,
)
LOSS = Gauge(
    "gradserve_loss",
    "Mean training loss of the most recent step.",
    registry=REGISTRY,
)
GRAD_NORM = Gauge(
    "gradserve_gradient_global_norm",
    "Global L2 norm over all parameter gradients of the most recent step (before clipping).",
    registry=REGISTRY,
)
PARAMETER_VERSION = Gauge(
    "gradserve_parameter_version",
    "Parameter version after the most recent step (one increment per applied update).",
    registry=REGISTRY,
)
STALENESS = Histogram(
    "gradserve_gradient_staleness",
    "Staleness of each shard gradient when it reached the parameter server, in parameter versions.",
    buckets=STALENESS_BUCKETS,
    registry=REGISTRY,
)
UPDATES = Counter(
    "gradserve_updates",
    "Parameter updates by outcome: applied, duplicate (repeated step id), dropped_stale.",
    ["outcome"],
    registry=REGISTRY,
)
WORKER_FAILURES = Counter(
    "gradserve_worker_failures",
    "Worker actor failures seen by the step coordinator (actor died or task raised).",
    registry=REGISTRY,
)
WORKER_RETRIES = Counter(
    "gradserve_worker_retries",
    "Shard computations re-dispatched after a worker failure.",
    registry=REGISTRY,
)
COMPRESSION_RATIO = Gauge(
    "gradserve_gradient_compression_ratio",
    "Raw over compressed gradient bytes in the most recent step (1 when compression is off).",
    registry=REGISTRY,
)
GRADIENT_RAW_BYTES = Counter(
    "gradserve_gradient_raw_bytes",
    "Gradient bytes produced by workers before compression.",
    registry=REGISTRY,
)
GRADIENT_COMPRESSED_BYTES = Counter(
    "gradserve_gradient_compressed_bytes",
    "Gradient bytes shipped from workers to the parameter server after compression.",
    registry=REGISTRY,
)

# --- Training signals (signals.py in the cluster package) -------------------------------------
NOISE_SCALE = Gauge(
    "gradserve_gradient_noise_scale",
    "Simple gradient noise scale B_simple (McCandlish et al. 2018) of the most recent step that "
    "could estimate it, by consistency mode: about the batch size beyond which larger batches "
    "stop paying off.",
    ["mode"],
    registry=REGISTRY,
)
SHARD_COSINE = Histogram(
    "gradserve_gradient_shard_cosine",
    "Cosine between each shard's gradient and the step's aggregate gradient.",
    buckets=COSINE_BUCKETS,
    registry=REGISTRY,
)
UPDATE_RATIO = Histogram(
    "gradserve_update_to_weight_ratio",
    "Per parameter and step: norm of the update over norm of the parameter before it.",
    buckets=UPDATE_RATIO_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_SPREAD = Histogram(
    "gradserve_worker_compute_spread_ratio",
    "Per step: the slowest worker's compute time over the median worker's.",
    buckets=SPREAD_BUCKETS,
    registry=REGISTRY,
)
SLOWEST_WORKER = Counter(
    "gradserve_slowest_worker",
    "Steps in which the worker at this pool position computed longest (positions from "
    f"{SLOWEST_POSITIONS} on counted together).",
    ["position"],
    registry=REGISTRY,
)

# --- Tables (row-sharded on the parameter servers; cluster/table_lane.py) ------------------------
TABLE_ROWS = Counter(
    "gradserve_table_rows",
    "Table rows moved between workers and parameter servers: pulled (rows workers received, each "
    "its shard's distinct rows) or pushed (gradient rows they sent, one per distinct id).",
    ["direction"],
    registry=REGISTRY,
)
TABLE_WIRE_BYTES = Counter(
    "gradserve_table_wire_bytes",
    "Bytes of table rows and their ids moved between workers and parameter servers, by direction.",
    ["direction"],
    registry=REGISTRY,
)
TABLE_DENSE_BYTES = Counter(
    "gradserve_table_dense_equivalent_bytes",
    "Bytes the same steps would have moved had every worker pulled and pushed the tables whole "
    "(minus the wire bytes: what sparse rows saved).",
    registry=REGISTRY,
)
TABLE_UNIQUE_ROW_RATIO = Gauge(
    "gradserve_table_unique_row_ratio",
    "Most recent step with tables: distinct rows updated over the table lookups its batch made.",
    registry=REGISTRY,
)
TABLE_STORED_ROWS = Gauge(
    "gradserve_table_stored_rows",
    "Rows the parameter servers hold stored (updated at least once) after the most recent step "
    "with tables, over that session's tables.",
    registry=REGISTRY,
)
TABLE_STORED_BYTES = Gauge(
    "gradserve_table_stored_bytes",
    "Bytes the parameter servers hold for the tables (stored rows, optimizer state, row index) "
    "after the most recent step with tables.",
    registry=REGISTRY,
)
TABLE_DIRECTIONS = ("pulled", "pushed")

# --- Cluster and sessions ---------------------------------------------------------------------
WORKERS_ALIVE = Gauge(
    "gradserve_workers_alive",
    "Worker actors currently alive in the Ray cluster.",
    registry=REGISTRY,
)
ACTIVE_SESSIONS = Gauge(
    "gradserve_active_sessions",
    "Training sessions currently open on the gateway.",
    registry=REGISTRY,
)

# Every known label value exists from the start, at zero: a rate over a window then sees a job's
# first steps as an increase, even a job that runs within one scrape interval.
for _mode in CONSISTENCY_MODES:
    STEP_DURATION.labels(mode=_mode)
for _phase in STEP_PHASES:
    STEP_PHASE_DURATION.labels(phase=_phase)
for _outcome in UPDATE_OUTCOMES:
    UPDATES.labels(outcome=_outcome)
for _position in range(SLOWEST_POSITIONS + 1):
    SLOWEST_WORKER.labels(position=position_label(_position))
for _direction in TABLE_DIRECTIONS:
    TABLE_ROWS.labels(direction=_direction)
    TABLE_WIRE_BYTES.labels(direction=_direction)

# Exposed names (as scraped, counters with `_total`) so tests and the dashboards can be checked
# against exactly what this module defines.
METRIC_NAMES = frozenset(
    {
        "gradserve_rpc_requests_total",
        "gradserve_rpc_duration_seconds",
        "gradserve_rpc_received_bytes_total",
        "gradserve_rpc_sent_bytes_total",
        "gradserve_step_duration_seconds",
        "gradserve_step_phase_duration_seconds",
        "gradserve_samples_processed_total",
        "gradserve_loss",
        "gradserve_gradient_global_norm",
        "gradserve_parameter_version",
        "gradserve_gradient_staleness",
        "gradserve_updates_total",
        "gradserve_worker_failures_total",
        "gradserve_worker_retries_total",
        "gradserve_gradient_compression_ratio",
        "gradserve_gradient_raw_bytes_total",
        "gradserve_gradient_compressed_bytes_total",
        "gradserve_workers_alive",
        "gradserve_gradient_noise_scale",
        "gradserve_gradient_shard_cosine",
        "gradserve_update_to_weight_ratio",
        "gradserve_worker_compute_spread_ratio",
        "gradserve_slowest_worker_total",
        "gradserve_active_sessions",
        "gradserve_table_rows_total",
        "gradserve_table_wire_bytes_total",
        "gradserve_table_dense_equivalent_bytes_total",
        "gradserve_table_unique_row_ratio",
        "gradserve_table_stored_rows",
        "gradserve_table_stored_bytes",
    }
)

# Exporters started in this process, by bound port, so tests (and `serve` on shutdown) stop them.
_servers: dict[int, object] = {}


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve `REGISTRY` at http://host:port/metrics in a daemon thread; return the bound port.

    Port 0 binds a free port (tests). The default host is loopback: exposing metrics on all
    interfaces is a deployment decision (`--metrics-host 0.0.0.0` in the container image).
    """
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound_port = server.server_port
    _servers[bound_port] = server
    return bound_port


def stop_metrics_server(port: int) -> None:
    """Stop the exporter started on `port` by `start_metrics_server` and release its socket."""
    server = _servers.pop(port)
    server.shutdown()
    server.server_close()


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


def set_workers_alive(n: int) -> None:
    """Set the number of live worker actors: the gateway hands this to `Executor.watch_workers`, so
    the worker pool reports it when created, grown, shrunk, on a worker lost (one fewer until its
    replacement runs) and at shutdown (0)."""
    WORKERS_ALIVE.set(n)


def set_active_sessions(n: int) -> None:
    """Set the number of open training sessions (the gateway's session table size)."""
    ACTIVE_SESSIONS.set(n)
