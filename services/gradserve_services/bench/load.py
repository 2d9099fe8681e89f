"""Load: concurrent clients, each driving its own training session, against a real service.

The suite starts `gradserve serve` (gRPC on 127.0.0.1, embedded Ray: every step runs on Ray worker
actors) as a child process with a bearer token of its own, and stops it at the end (SIGTERM, then
SIGKILL after a grace period, by process group). Two rounds run against it:

1. warm-up: one round as below, unmeasured, so thread pools, connection buffers, allocator arenas
   and Ray actors have reached their working size before memory is measured;
2. `--rounds` measured rounds: every client creates a session, takes `--steps` steps, pulls the
   parameters and closes it. The server's RSS is read after warm-up and after every round: with
   nothing leaking it stays flat from round to round, whatever the number of steps.

Every call either succeeds or gets an explicit RESOURCE_EXHAUSTED (the `--max-concurrent-calls` cap);
the latter is counted and retried with the same step id after a short backoff, so each session still
takes all its steps exactly once. Any other status is counted under its code. One JSON line:
p50/p99 step latency, calls and errors by code, and the server's RSS (gateway process, and its Ray
processes; also by role: gateway, workers, parameter servers, Ray's own) after warm-up and at the
end, with the growth in between. `gradserve bench soak` runs the same service far longer, sampling
that memory over time.
"""

from __future__ import annotations

import json
import sys
import time

from .load_calls import Tally, client_thread, percentile, train_session
from .serve_process import RSS_ROLES, ServeProcess, on_served_gateway

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients, one session each")
    parser.add_argument("--steps", type=int, default=20, help="steps per client and round")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after the warm-up round")
    parser.add_argument("--workers", type=int, default=2, help="Ray worker actors per session")
    parser.add_argument("--rows", type=int, default=64, help="rows per batch")
    parser.add_argument("--max-concurrent-calls", type=int, default=64,
                        help="the server's cap; calls beyond it get RESOURCE_EXHAUSTED")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on the whole run")


def run(args) -> int:
    if args.clients < 1 or args.steps < 1 or args.rounds < 1:
        print("gradserve bench load: --clients, --steps and --rounds must be >= 1", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout_s
    report = on_served_gateway(args, lambda server, client_tokens: _measure(server, client_tokens, args, deadline))
    print(json.dumps(report), flush=True)
    return 0 if report["steps_ok"] == report["steps_expected"] else 1


def _measure(server: ServeProcess, tokens: list[str], args, deadline: float) -> dict:
    tally = Tally()
    started = time.perf_counter()
    _round(server.target, tokens, args, tally, deadline)
    warm = time.perf_counter()
    rss_by_round = [server.rss_by_role()]
    tally.step_ms.clear()  # latencies of the measured rounds only
    for _ in range(args.rounds):
        _round(server.target, tokens, args, tally, deadline)
        rss_by_round.append(server.rss_by_role())
    done = time.perf_counter()
    latencies = sorted(tally.step_ms)
    first, last = rss_by_round[0], rss_by_round[-1]
    rss_start, rss_end = first["gateway"], last["gateway"]
    ray_rss_start, ray_rss_end = (sum(rss[role] for role in RSS_ROLES[1:]) for rss in (first, last))
    return {
        "suite": "load",
        "clients": args.clients,
        "steps_per_client": args.steps,
        "rounds": args.rounds,
        "workers_per_session": args.workers,
        "rows": args.rows,
        "max_concurrent_calls": args.max_concurrent_calls,
        "steps_ok": tally.steps_ok,
        "steps_expected": args.clients * args.steps * (args.rounds + 1),
        # client-observed: from the first attempt to the answer, RESOURCE_EXHAUSTED retries included
        "step_p50_ms": percentile(latencies, 0.50),
        "step_p99_ms": percentile(latencies, 0.99),
        "step_max_ms": latencies[-1] if latencies else None,
        "steps_per_s": len(latencies) / (done - warm) if done > warm else None,
        "calls_by_code": dict(tally.codes),
        "errors_by_code": tally.errors_by_code(),
        "server_rss_start_bytes": rss_start,
        "server_rss_end_bytes": rss_end,
        "server_rss_growth_bytes": rss_end - rss_start,
        "server_rss_by_round_bytes": [rss["gateway"] for rss in rss_by_round],
        "ray_rss_start_bytes": ray_rss_start,
        "ray_rss_end_bytes": ray_rss_end,
        # per role of RSS_ROLES (gateway, workers, parameter servers, Ray's own), warm-up to end
        "rss_start_by_role_bytes": {role: first[role] for role in RSS_ROLES},
        "rss_growth_by_role_bytes": {role: last[role] - first[role] for role in RSS_ROLES},
        "wall_s": done - started,
    }


def _round(target: str, tokens: list[str], args, tally: Tally, deadline: float) -> None:
    threads = [client_thread(tally, _client, target, token, args, tally, deadline, index)
               for index, token in enumerate(tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0.0))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"clients still running after --timeout-s {args.timeout_s}")


def _client(target, token, args, tally: Tally, deadline, index: int) -> None:
    import numpy as np

    import gradserve

    with gradserve.Client(target, token=token, timeout=120, retries=0) as client:
        train_session(client, tally, deadline, steps=args.steps, workers=args.workers, rows=args.rows,
                      seed=index, rng=np.random.default_rng(index))
