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

One concept per module: `definitions` (the registry, every metric and its label values),
`recording` (the functions the gateway calls), `exporter` (the HTTP endpoint).
"""

from __future__ import annotations

from . import definitions, exporter, recording
from .definitions import *  # noqa: F403 - every metric, reachable as gradserve_services.metrics.NAME
from .exporter import start_metrics_server, stop_metrics_server
from .recording import (declare_rpc_methods, record_rpc, record_step, record_step_begun_ahead, record_table_step,
                        set_active_sessions, set_workers_alive)

__all__ = [*definitions.__all__, *exporter.__all__, *recording.__all__]
