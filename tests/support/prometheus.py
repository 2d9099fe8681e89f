"""Run a real Prometheus server (Debian's `prometheus` binary) for a test, and query it.

Used by the metrics/dashboard tests and by the end-to-end test:

    server = start(["127.0.0.1:9100"])              # scrapes every second, binds 127.0.0.1
    try:
        wait_for_data(server.url, "gradserve_samples_processed_total > 0", timeout_s=20)
        result = query(server.url, 'sum(rate(gradserve_samples_processed_total[1m]))')
    finally:
        stop(server)

or `with running(targets) as server: ...`. Everything is bounded in time and the process is stopped
by its pid (SIGTERM, then SIGKILL) with its temporary config/data directory removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = [
    "PrometheusServer",
    "PromQLError",
    "prometheus_binary",
    "start",
    "stop",
    "running",
    "query",
    "wait_for_data",
    "has_finite_value",
]

JOB_NAME = "gradserve"


class PromQLError(RuntimeError):
    """The Prometheus HTTP API answered with status "error" (for example a PromQL parse error)."""

    def __init__(self, expr: str, error_type: str, error: str):
        super().__init__(f"{error_type}: {error} (query: {expr})")
        self.expr = expr
        self.error_type = error_type
        self.error = error


@dataclass
class PrometheusServer:
    url: str            # http://127.0.0.1:PORT
    pid: int
    process: subprocess.Popen
    work_dir: Path      # holds prometheus.yml, data/ and prometheus.log
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def _free_port() -> int:
    # Prometheus cannot report a port-0 bind back to us, so pick a free port; `start` retries if
    # another process grabs it before Prometheus binds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_config(path: Path, targets: list[str], scrape_interval: str) -> None:
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": JOB_NAME,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _get_json(url: str, timeout_s: float) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        # The API answers 400/422 with a JSON body describing a bad query: return that body.
        body = error.read()
        try:
            return json.loads(body)
        except ValueError:
            raise error from None


def _wait_ready(server: PrometheusServer, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def start(
    targets: list[str],
    *,
    scrape_interval: str = "1s",
    console_templates: str | os.PathLike | None = None,
    console_libraries: str | os.PathLike | None = None,
    ready_timeout_s: float = 30.0,
    attempts: int = 3,
) -> PrometheusServer:
    """Start Prometheus on 127.0.0.1 scraping `targets` ("host:port", path /metrics) as job
    "gradserve"; return once it answers /-/ready. The caller must `stop` it (use try/finally)."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus binary not found (make system-deps installs it)")
    last_log = ""
    for _attempt in range(attempts):
        work_dir = Path(tempfile.mkdtemp(prefix="gradserve-prometheus-"))
        config_path = work_dir / "prometheus.yml"
        _write_config(config_path, targets, scrape_interval)
        port = _free_port()
        args = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        if console_templates is not None:
            args.append(f"--web.console.templates={console_templates}")
        if console_libraries is not None:
            args.append(f"--web.console.libraries={console_libraries}")
        log_path = work_dir / "prometheus.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=work_dir,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", process.pid, process, work_dir, log_path)
        if _wait_ready(server, ready_timeout_s):
            return server
        last_log = server.log_tail()
        stop(server)
    raise RuntimeError(f"prometheus did not become ready after {attempts} attempts:\n{last_log}")


def stop(server: PrometheusServer, timeout_s: float = 10.0) -> None:
    """Stop the server by its pid (SIGTERM, then SIGKILL) and remove its temporary directory."""
    if server.process.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait(timeout=timeout_s)
    shutil.rmtree(server.work_dir, ignore_errors=True)


@contextlib.contextmanager
def running(targets: list[str], **start_kwargs):
    server = start(targets, **start_kwargs)
    try:
        yield server
    finally:
        stop(server)


def query(url: str, expr: str, timeout_s: float = 10.0) -> list[dict]:
    """Instant query through /api/v1/query; returns the result list (vector) or raises PromQLError."""
    params = urllib.parse.urlencode({"query": expr})
    body = _get_json(f"{url}/api/v1/query?{params}", timeout_s)
    if body.get("status") != "success":
        raise PromQLError(expr, body.get("errorType", "?"), body.get("error", repr(body)))
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def has_finite_value(result: list[dict]) -> bool:
    """True when an instant-query result holds at least one finite sample (not NaN, not +-Inf):
    a histogram_quantile over a window without observations yields NaN, which is not data."""
    for series in result:
        value = float(series["value"][1])
        if value == value and value not in (float("inf"), float("-inf")):
            return True
    return False


def wait_for_data(url: str, expr: str, timeout_s: float = 30.0, interval_s: float = 0.5) -> list[dict]:
    """Poll `expr` until it returns a finite value; raise TimeoutError with the last result if not."""
    deadline = time.monotonic() + timeout_s
    result: list[dict] = []
    while True:
        result = query(url, expr)
        if has_finite_value(result):
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no finite data for {expr!r} within {timeout_s}s; last: {result}")
        time.sleep(interval_s)
