"""Every Prometheus metric of gradserve, defined in this one module (the package's docstring says
how numbers reach it and the naming conventions), with the label values known from the start."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

__all__ = [
    "REGISTRY", "STEP_PHASES", "UPDATE_OUTCOMES", "CONSISTENCY_MODES", "DURATION_BUCKETS_SECONDS",
    "STALENESS_BUCKETS", "SPREAD_BUCKETS", "COSINE_BUCKETS", "UPDATE_RATIO_BUCKETS",
    "SLOWEST_POSITIONS", "TABLE_DIRECTIONS", "METRIC_NAMES", "position_label", "RPCS",
    "RPC_DURATION", "RPC_RECEIVED_BYTES", "RPC_SENT_BYTES", "STEP_DURATION", "STEP_PHASE_DURATION",
    "SAMPLES", "LOSS", "GRAD_NORM", "PARAMETER_VERSION", "STALENESS", "UPDATES", "WORKER_FAILURES",
    "WORKER_RETRIES", "COMPRESSION_RATIO", "GRADIENT_RAW_BYTES", "GRADIENT_COMPRESSED_BYTES",
    "NOISE_SCALE", "SHARD_COSINE", "UPDATE_RATIO", "COMPUTE_SPREAD", "SLOWEST_WORKER", "TABLE_ROWS",
    "TABLE_WIRE_BYTES", "TABLE_DENSE_BYTES", "TABLE_UNIQUE_ROW_RATIO", "TABLE_STORED_ROWS",
    "TABLE_STORED_BYTES", "WORKERS_ALIVE", "ACTIVE_SESSIONS", "STEPS_BEGUN_AHEAD",
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
STEPS_BEGUN_AHEAD = Counter(
    "gradserve_steps_begun_ahead",
    "Steps of a stream begun before the step before them ended (their workers waited for its update).",
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
        "gradserve_steps_begun_ahead_total",
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
