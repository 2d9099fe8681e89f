"""`make console`: the README's one command for the Prometheus console without Docker, run against a
real Prometheus scraping a real gradserve exporter; and why its libraries folder holds both kinds
(the prometheus.yml comment): gradserve.lib alone cannot render the console."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from gradserve_services import metrics
from tests.deploy.conftest import CONSOLE_TEMPLATES, GRADSERVE_CONSOLE_LIBRARY
from tests.support import prometheus
from tests.support.dashboard import REPO_ROOT, dashboard_panels

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", errors="replace")


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.25)


def test_make_console_serves_the_console_against_a_gradserve_exporter(tmp_path):
    metrics_port = metrics.start_metrics_server(0)
    listen = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "console.log", "wb")
    console = subprocess.Popen(
        ["make", "--no-print-directory", "console", f"METRICS=127.0.0.1:{metrics_port}",
         f"CONSOLE_LISTEN={listen}", f"CONSOLE_DIR={tmp_path / 'console'}"],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log.close()
    url = f"http://{listen}"
    try:
        wait_until(lambda: fetch(f"{url}/-/ready")[0] == 200, READY_TIMEOUT_S,
                   f"make console not ready:\n{(tmp_path / 'console.log').read_text()[-3000:]}")
        # it scrapes the exporter it was pointed at (job "gradserve", as the console's queries expect)
        up = wait_until(lambda: prometheus.query(url, 'up{job="gradserve"} == 1'), READY_TIMEOUT_S,
                        "the exporter was never scraped")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"
        status, page = fetch(f"{url}/consoles/gradserve.html")
        assert status == 200, page[:2000]
        for panel in dashboard_panels():
            assert panel["title"] in page, panel["title"]
        assert "prom_console.js" in page  # Prometheus's own prom.lib head was found beside gradserve.lib
    finally:
        for signum, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if console.poll() is None:
                try:
                    os.killpg(console.pid, signum)
                    console.wait(timeout=wait_s)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        metrics.stop_metrics_server(metrics_port)
    assert console.poll() is not None


def test_gradserve_lib_alone_cannot_render_the_console(tmp_path):
    libraries = tmp_path / "only_gradserve"
    libraries.mkdir()
    (libraries / GRADSERVE_CONSOLE_LIBRARY.name).write_bytes(GRADSERVE_CONSOLE_LIBRARY.read_bytes())
    with prometheus.running([], console_templates=CONSOLE_TEMPLATES, console_libraries=libraries) as server:
        status, page = fetch(f"{server.url}/consoles/gradserve.html")
    assert status != 200 and 'no such template "prom_console_head"' in page, (status, page[:500])
