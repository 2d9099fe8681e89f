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
processes) after warm-up and at the end, with the growth in between.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gradserve_services import procfs

__all__ = ["add_arguments", "run"]

SERVE = "import sys; from gradserve_services.cli import main; sys.exit(main(sys.argv[1:]))"
START_TIMEOUT_S = 180
STOP_GRACE_S = 20
BACKOFF_S = 0.02  # after RESOURCE_EXHAUSTED: the cap frees within one step's time


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
    with tempfile.TemporaryDirectory(prefix="gradserve-load-") as work_dir:
        # One identity per client, like separate users: the per-identity session limit is not what
        # this suite measures.
        client_tokens = [secrets.token_urlsafe(24) for _ in range(args.clients)]
        tokens = Path(work_dir) / "tokens"
        tokens.touch(mode=0o600)
        tokens.write_text("".join(f"load{index}:{token}\n" for index, token in enumerate(client_tokens)))
        server = _Server(work_dir, tokens, args)
        try:
            report = _measure(server, client_tokens, args, deadline)
        finally:
            server.stop()
    print(json.dumps(report), flush=True)
    return 0


def _measure(server: "_Server", tokens: list[str], args, deadline: float) -> dict:
    tally = _Tally()
    started = time.perf_counter()
    _round(server.target, tokens, args, tally, deadline)
    warm = time.perf_counter()
    rss_by_round = [server.rss()]
    tally.step_ms.clear()  # latencies of the measured rounds only
    for _ in range(args.rounds):
        _round(server.target, tokens, args, tally, deadline)
        rss_by_round.append(server.rss())
    done = time.perf_counter()
    latencies = sorted(tally.step_ms)
    (rss_start, ray_rss_start), (rss_end, ray_rss_end) = rss_by_round[0], rss_by_round[-1]
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
        "step_p50_ms": _percentile(latencies, 0.50),
        "step_p99_ms": _percentile(latencies, 0.99),
        "step_max_ms": latencies[-1] if latencies else None,
        "steps_per_s": len(latencies) / (done - warm) if done > warm else None,
        "calls_by_code": dict(tally.codes),
        "errors_by_code": {code: n for code, n in tally.codes.items() if code != "OK"},
        "server_rss_start_bytes": rss_start,
        "server_rss_end_bytes": rss_end,
        "server_rss_growth_bytes": rss_end - rss_start,
        "server_rss_by_round_bytes": [rss for rss, _ in rss_by_round],
        "ray_rss_start_bytes": ray_rss_start,
        "ray_rss_end_bytes": ray_rss_end,
        "wall_s": done - started,
    }


class _Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.codes: collections.Counter = collections.Counter()
        self.step_ms: list[float] = []
        self.steps_ok = 0

    def count(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1


def _round(target: str, tokens: list[str], args, tally: _Tally, deadline: float) -> None:
    threads = [threading.Thread(target=_client, args=(target, token, args, tally, deadline, index), daemon=True)
               for index, token in enumerate(tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0.0))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"clients still running after --timeout-s {args.timeout_s}")


def _client(target, token, args, tally: _Tally, deadline, index: int) -> None:
    import numpy as np

    import gradserve
    from gradserve import mlp

    spec = mlp(32, [64], 10)
    rng = np.random.default_rng(index)
    with gradserve.Client(target, token=token, timeout=120, retries=0) as client:
        session = _call(tally, deadline, lambda: client.create_session(spec, seed=index, num_workers=args.workers))
        if session is None:
            return
        for step_id in range(1, args.steps + 1):
            x = rng.standard_normal((args.rows, 32)).astype(np.float32)
            y = rng.integers(0, 10, args.rows)
            began = time.perf_counter()
            result = _call(tally, deadline, lambda: client.step(session, x, y, step_id=step_id))
            if result is not None:
                with tally.lock:
                    tally.step_ms.append((time.perf_counter() - began) * 1e3)
                    tally.steps_ok += 1
        _call(tally, deadline, lambda: client.pull_parameters(session))
        _call(tally, deadline, lambda: client.close_session(session))


def _call(tally: _Tally, deadline: float, attempt):
    """`attempt()` until it succeeds or fails with anything but RESOURCE_EXHAUSTED (retried: the
    cap refused the call before it ran). Every answer is counted by its code; None on failure."""
    import gradserve

    while True:
        try:
            result = attempt()
        except gradserve.GradserveError as error:
            code = error.code.name if error.code is not None else "CLIENT"
            tally.count(code)
            if code != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                return None
            time.sleep(BACKOFF_S)
            continue
        tally.count("OK")
        return result


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


class _Server:
    """`gradserve serve` in its own process group on 127.0.0.1."""

    def __init__(self, work_dir: str, tokens: Path, args):
        self.log = open(Path(work_dir) / "serve.log", "wb")
        command = [sys.executable, "-c", SERVE, "serve", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--workers", str(args.workers), "--auth-tokens-file", str(tokens),
                   "--max-concurrent-calls", str(args.max_concurrent_calls), "--grace-s", "5"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                                        start_new_session=True)
        watchdog = threading.Timer(START_TIMEOUT_S, self._kill_group)
        watchdog.start()
        try:
            line = self.process.stdout.readline()
        finally:
            watchdog.cancel()
        try:
            self.port = json.loads(line)["port"]
        except (ValueError, KeyError):
            self.stop()
            raise RuntimeError(f"gradserve serve did not start; see {self.log.name}") from None
        self.target = f"127.0.0.1:{self.port}"

    def rss(self) -> tuple[int, int]:
        """(gateway process RSS, summed RSS of its descendants: the embedded Ray), bytes."""
        return (procfs.rss_bytes(self.process.pid),
                sum(procfs.rss_bytes(pid) for pid in procfs.descendants(self.process.pid)))

    def stop(self) -> None:
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def _kill_group(self) -> None:
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
