"""Feed `gradserve_services.metrics` with the numbers a small training run produces, from a
background thread, so that rates and histogram quantiles over the last minute are defined.

This stands in for the gateway's calls (it uses the very same `record_step` / `record_rpc` the
gateway calls), not for Prometheus or prometheus_client: those are real in every test."""

from __future__ import annotations

import random
import threading

from gradserve_services import metrics

__all__ = ["record_one_step", "RecordingThread"]


def record_one_step(step: int, rng: random.Random) -> None:
    """Record one synchronous step of a 2-worker MLP on 64-sample batches, plus its RPCs."""
    phases_s = {
        "broadcast": rng.uniform(0.001, 0.004),
        "compute": rng.uniform(0.01, 0.05),
        "gather": rng.uniform(0.001, 0.006),
        "apply": rng.uniform(0.0005, 0.002),
    }
    metrics.record_step(
        duration_s=sum(phases_s.values()) + rng.uniform(0.0, 0.002),
        phases_s=phases_s,
        samples=64,
        loss=2.3 * 0.97**step,
        grad_norm=1.5 * 0.98**step + 0.1,
        version=step + 1,
        staleness=[rng.choice((0, 0, 1, 2)) for _shard in range(2)],
        applied=1,
        duplicate=1 if step % 17 == 16 else 0,
        dropped_stale=1 if step % 23 == 22 else 0,
        worker_failures=1 if step % 29 == 28 else 0,
        retries=1 if step % 29 == 28 else 0,
        bytes_raw=2 * 4 * 101_770,          # two shards of 784-128-10 float32 gradients
        bytes_compressed=2 * 2 * 101_770,   # fp16 compression halves them
        noise_scale=40.0 + 2.0 * step,
        shard_cosines=[rng.uniform(0.6, 0.95) for _shard in range(2)],
        update_ratios=[rng.uniform(1e-4, 3e-3) for _param in range(4)],
        compute_spread=rng.uniform(1.0, 1.6),
        slowest_worker=rng.choice((0, 1)),
    )
    unique = rng.randint(900, 1100)  # a model with tables: 26 lookups per sample, dim 16, float32
    metrics.record_table_step(rows_pulled=unique + 200, rows_pushed=unique + 200, bytes_pulled=(unique + 200) * 72,
                              bytes_pushed=(unique + 200) * 72, dense_table_bytes=2 * 2 * 26 * 100_000 * 64,
                              rows_updated=unique, row_lookups=64 * 26, table_rows=1000 * (step + 1),
                              table_bytes=1000 * (step + 1) * 200)
    metrics.record_rpc("Step", "OK", rng.uniform(0.01, 0.06), bytes_received=64 * 784 * 4, bytes_sent=32)
    if step % 5 == 4:
        metrics.record_rpc("Step", "INVALID_ARGUMENT", rng.uniform(0.0005, 0.002), bytes_received=900)
    if step % 11 == 10:
        metrics.record_rpc("PullParameters", "NOT_FOUND", 0.001, bytes_received=40)
    metrics.set_workers_alive(2)
    metrics.set_active_sessions(1)


class RecordingThread(threading.Thread):
    """Records one step every `interval_s` until `stop()`; use as a context manager."""

    def __init__(self, interval_s: float = 0.05, seed: int = 0):
        super().__init__(name="gradserve-recording", daemon=True)
        self.interval_s = interval_s
        self.steps_recorded = 0
        self._rng = random.Random(seed)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            record_one_step(self.steps_recorded, self._rng)
            self.steps_recorded += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def __enter__(self) -> "RecordingThread":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
