"""Soak: many clients train for a long time against one real service; its memory, sampled over time.

Like `load`, the suite starts `gradserve serve` (gRPC on 127.0.0.1, embedded Ray) as a child
process with a token per client and stops it at the end. `--clients` threads share `--total-steps`
steps: each creates a session, takes up to `--steps-per-session` steps, pulls the parameters, closes
it, and starts the next, until its share is done (so sessions, their parameter-server tables and
step logs come and go the whole time). Every `--sample-s` seconds a sampler reads the resident
memory of the gateway, the worker actors, the parameter-server actors and Ray's own processes (the
gateway's descendants, found through /proc).

Memory is judged after a warm-up (`--warmup-fraction` of the steps: thread pools, allocator arenas
and caches reach their working size): the growth from the first sample after it to the end, and the
least-squares slope over every sample since, in bytes per 1000 steps. With nothing leaking the slope
is near zero however long the soak; a leak of B bytes per step shows as 1000 B.

Every call either succeeds or gets RESOURCE_EXHAUSTED (the `--max-concurrent-calls` cap), retried
with the same step id; anything else is counted under its code (a client that fails outside a call,
under the exception's name). One JSON line; exit status 1 when not every step went through.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from .load_calls import Tally, client_thread, percentile, train_session
from .serve_process import RSS_ROLES, ServeProcess, on_served_gateway

__all__ = ["add_arguments", "run"]

REPORTED_SAMPLES = 24  # evenly spaced ones in the JSON line; the slope uses every sample
SAMPLE_FIELDS = ("t_s", "steps", *RSS_ROLES, "workers_processes", "parameter_servers_processes")


def add_arguments(parser) -> None:
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients, one session at a time each")
    parser.add_argument("--total-steps", type=int, default=20_000, help="steps over all clients")
    parser.add_argument("--steps-per-session", type=int, default=250, help="steps before a client opens a new session")
    parser.add_argument("--workers", type=int, default=2, help="Ray worker actors per session")
    parser.add_argument("--rows", type=int, default=64, help="rows per batch")
    parser.add_argument("--max-concurrent-calls", type=int, default=64,
                        help="the server's cap; calls beyond it get RESOURCE_EXHAUSTED")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.1,
                        help="share of the steps before memory is judged")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="bound on the whole run")


def run(args) -> int:
    if args.clients < 1 or args.total_steps < args.clients or args.steps_per_session < 1:
        print("gradserve bench soak: --clients and --steps-per-session must be >= 1, --total-steps >= --clients",
              file=sys.stderr)
        return 2
    if args.sample_s <= 0 or not 0 <= args.warmup_fraction < 1:
        print("gradserve bench soak: --sample-s must be > 0 and --warmup-fraction in [0, 1)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout_s
    report = on_served_gateway(args, lambda server, client_tokens: _soak(server, client_tokens, args, deadline))
    print(json.dumps(report), flush=True)
    return 0 if report["steps_ok"] == args.total_steps else 1  # the figures of a run cut short mislead


def _soak(server: ServeProcess, tokens: list[str], args, deadline: float) -> dict:
    tally = Tally()
    samples: list[tuple] = []
    started = time.perf_counter()

    def sample() -> None:
        rss = server.rss_by_role()
        samples.append((time.perf_counter() - started, tally.steps_ok, *(rss[field] for field in SAMPLE_FIELDS[2:])))

    finished = threading.Event()
    sampler = threading.Thread(target=_sample_until, args=(finished, args.sample_s, sample), daemon=True)
    shares = [args.total_steps // len(tokens) + (index < args.total_steps % len(tokens))
              for index in range(len(tokens))]
    clients = [client_thread(tally, _client, server.target, token, share, args, tally, deadline, index)
               for index, (token, share) in enumerate(zip(tokens, shares))]
    sample()
    sampler.start()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=max(deadline - time.monotonic(), 0.0))
    finished.set()
    sampler.join(timeout=60)
    if any(thread.is_alive() for thread in clients):
        raise TimeoutError(f"clients still running after --timeout-s {args.timeout_s}")
    wall_s = time.perf_counter() - started
    sample()  # the end: every session closed
    return _report(args, tally, samples, wall_s)


def _sample_until(finished: threading.Event, every_s: float, sample) -> None:
    while not finished.wait(every_s):
        sample()


def _report(args, tally: Tally, samples: list[tuple], wall_s: float) -> dict:
    warm_steps = args.warmup_fraction * args.total_steps
    judged = [row for row in samples if row[1] >= warm_steps] or samples[-1:]
    roles = {role: SAMPLE_FIELDS.index(role) for role in RSS_ROLES}
    warm, end = judged[0], judged[-1]
    latencies = sorted(tally.step_ms)
    return {
        "suite": "soak",
        "clients": args.clients,
        "total_steps": args.total_steps,
        "steps_per_session": args.steps_per_session,
        "workers_per_session": args.workers,
        "rows": args.rows,
        "max_concurrent_calls": args.max_concurrent_calls,
        "steps_ok": tally.steps_ok,
        "calls_by_code": dict(tally.codes),
        "errors_by_code": tally.errors_by_code(),
        # client-observed: from the first attempt to the answer, RESOURCE_EXHAUSTED retries included
        "step_p50_ms": percentile(latencies, 0.50),
        "step_p99_ms": percentile(latencies, 0.99),
        "steps_per_s": tally.steps_ok / wall_s,
        "rss_samples_taken": len(samples),
        "rss_warm_steps": warm[1],
        "rss_warm_by_role_bytes": {role: warm[i] for role, i in roles.items()},
        "rss_end_by_role_bytes": {role: end[i] for role, i in roles.items()},
        "rss_peak_by_role_bytes": {role: max(row[i] for row in judged) for role, i in roles.items()},
        "rss_growth_by_role_bytes": {role: end[i] - warm[i] for role, i in roles.items()},
        "rss_growth_per_1k_steps_by_role_bytes": {role: _slope_per_1k_steps(judged, i) for role, i in roles.items()},
        "rss_sample_fields": list(SAMPLE_FIELDS),
        "rss_samples": [[round(value, 1) if isinstance(value, float) else value for value in row]
                        for row in _evenly_spaced(samples, REPORTED_SAMPLES)],
        "wall_s": wall_s,
    }


def _slope_per_1k_steps(rows: list[tuple], column: int) -> float | None:
    """Least-squares slope of `column` against the step count, per 1000 steps (None: too few)."""
    steps = [row[1] for row in rows]
    mean_steps = sum(steps) / len(steps)
    spread = sum((s - mean_steps) ** 2 for s in steps)
    if len(rows) < 3 or spread == 0:
        return None
    mean_value = sum(row[column] for row in rows) / len(rows)
    covariance = sum((row[1] - mean_steps) * (row[column] - mean_value) for row in rows)
    return 1000.0 * covariance / spread


def _evenly_spaced(rows: list, count: int) -> list:
    if len(rows) <= count:
        return list(rows)
    return [rows[round(index * (len(rows) - 1) / (count - 1))] for index in range(count)]


def _client(target, token, share: int, args, tally: Tally, deadline, index: int) -> None:
    import numpy as np

    import gradserve

    rng = np.random.default_rng(index)
    with gradserve.Client(target, token=token, timeout=120, retries=0) as client:
        left = share
        while left > 0 and time.monotonic() < deadline:
            steps = min(left, args.steps_per_session)
            if not train_session(client, tally, deadline, steps=steps, workers=args.workers, rows=args.rows,
                                 seed=index, rng=rng):
                return
            left -= steps
