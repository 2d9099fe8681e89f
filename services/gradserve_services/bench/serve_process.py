"""`gradserve serve` as a child process for the load suites: started on 127.0.0.1 with a token
file, measured (the resident memory of each of its processes, by role), stopped (SIGTERM, then
SIGKILL after a grace period, by process group)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from gradserve_services import procfs
from gradserve_services.cluster.parameter_server import ParameterServer
from gradserve_services.cluster.worker import GradientWorker

__all__ = ["ServeProcess", "RSS_ROLES", "write_client_tokens", "on_served_gateway"]

SERVE = "import sys; from gradserve_services.cli import main; sys.exit(main(sys.argv[1:]))"
START_TIMEOUT_S = 180
STOP_GRACE_S = 20
# The processes of a serve, by what they hold: the gateway itself, the Ray actors doing the work
# (Ray titles an actor's process `ray::CLASS` or `ray::CLASS.method`), and Ray's own processes
# (GCS, raylet, agents, idle workers).
RSS_ROLES = ("gateway", "workers", "parameter_servers", "ray_other")
_ACTOR_ROLES = ((f"ray::{GradientWorker.__name__}", "workers"),
                (f"ray::{ParameterServer.__name__}", "parameter_servers"))


def write_client_tokens(work_dir: str, count: int) -> tuple[Path, list[str]]:
    """A token file with one identity per client, like separate users (the per-identity session
    limit is not what the load suites measure); returns its path and the tokens."""
    tokens = [secrets.token_urlsafe(24) for _ in range(count)]
    path = Path(work_dir) / "tokens"
    path.touch(mode=0o600)
    path.write_text("".join(f"load{index}:{token}\n" for index, token in enumerate(tokens)))
    return path, tokens


def on_served_gateway(args, measure):
    """`measure(server, client_tokens)` against a `gradserve serve` started for it (one token per
    `args.clients`, `args.workers`, `args.max_concurrent_calls`) and stopped after, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="gradserve-load-") as work_dir:
        tokens_file, client_tokens = write_client_tokens(work_dir, args.clients)
        server = ServeProcess(work_dir, tokens_file, workers=args.workers,
                              max_concurrent_calls=args.max_concurrent_calls)
        try:
            return measure(server, client_tokens)
        finally:
            server.stop()


class ServeProcess:
    """`gradserve serve` in its own process group on 127.0.0.1 (gRPC and metrics on free ports)."""

    def __init__(self, work_dir: str, tokens: Path, *, workers: int, max_concurrent_calls: int):
        self.log = open(Path(work_dir) / "serve.log", "wb")
        command = [sys.executable, "-c", SERVE, "serve", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--workers", str(workers), "--auth-tokens-file", str(tokens),
                   "--max-concurrent-calls", str(max_concurrent_calls), "--grace-s", "5"]
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

    def rss_by_role(self) -> dict[str, int]:
        """Resident bytes summed per role of `RSS_ROLES`, and the process count per role under
        `ROLE_processes` (the embedded Ray's processes are the gateway's descendants)."""
        by_role = {role: 0 for role in RSS_ROLES}
        counts = {role: 0 for role in RSS_ROLES}
        members = [(self.process.pid, "gateway")] + [(pid, _role(procfs.cmdline(pid)))
                                                      for pid in procfs.descendants(self.process.pid)]
        for pid, role in members:
            rss = procfs.rss_bytes(pid)
            if rss:  # 0: it exited while being read
                by_role[role] += rss
                counts[role] += 1
        return {**by_role, **{f"{role}_processes": count for role, count in counts.items()}}

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


def _role(command_line: str) -> str:
    for prefix, role in _ACTOR_ROLES:
        if command_line.startswith(prefix):
            return role
    return "ray_other"
