"""`gradserve serve` as a real process for tests: started in its own process group, its `serving`
line read with a time limit, stopped by pid (SIGTERM then SIGKILL, bounded) or killed outright.

    with serve_process(tmp_path, ["--no-auth"]) as server:
        client = gradserve.Client(server.target)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServeProcess", "start_serve", "serve_process"]

REPO = Path(__file__).resolve().parents[2]
GRADSERVE = str(Path(sys.executable).with_name("gradserve"))
START_TIMEOUT_S = 180
STOP_GRACE_S = 20


@dataclass
class ServeProcess:
    process: subprocess.Popen
    serving: dict  # the JSON line `gradserve serve` prints once it listens
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.serving['port']}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash): nothing is drained or closed."""
        _signal_group(self.process, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM (drain), then SIGKILL after STOP_GRACE_S; returns the exit code."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()
        _signal_group(self.process, signal.SIGKILL)  # anything the server left in its group
        return self.process.returncode


def start_serve(log_path: Path, args: list[str], env: dict | None = None, port: int = 0) -> ServeProcess:
    """Start `gradserve serve --port PORT --metrics-port 0 ARGS` and wait for its serving line."""
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [GRADSERVE, "serve", "--port", str(port), "--metrics-port", "0", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}, start_new_session=True,
    )
    log.close()
    # readline blocks; a timer kills the process if start-up hangs, which ends the read.
    watchdog = threading.Timer(START_TIMEOUT_S, lambda: _signal_group(process, signal.SIGKILL))
    watchdog.start()
    try:
        line = process.stdout.readline()
    finally:
        watchdog.cancel()
    server = ServeProcess(process, {}, log_path)
    try:
        server.serving = json.loads(line)
    except ValueError:
        server.stop()
        raise RuntimeError(f"gradserve serve did not start ({line!r}):\n{server.log_tail()}") from None
    return server


@contextmanager
def serve_process(log_path: Path, args: list[str], env: dict | None = None):
    server = start_serve(log_path, args, env)
    try:
        yield server
    finally:
        server.stop()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
