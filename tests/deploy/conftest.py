"""A real Prometheus scraping a real gradserve exporter fed with a recorded training run, shared by
the dashboard and console tests (starting Prometheus once keeps the suite well under a minute)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradserve_services import metrics
from tests.support import prometheus
from tests.support.dashboard import REPO_ROOT
from tests.support.recorded_metrics import RecordingThread

CONSOLE_TEMPLATES = REPO_ROOT / "deploy" / "prometheus" / "consoles"
GRADSERVE_CONSOLE_LIBRARY = REPO_ROOT / "deploy" / "prometheus" / "console_libraries" / "gradserve.lib"
# Where Prometheus builds ship prom.lib (the asset paths of their own web UI): the upstream image,
# Debian's /etc symlink target when populated, and Debian's examples.
PROM_LIB_DIRS = (
    Path("/usr/share/prometheus/console_libraries"),
    Path("/etc/prometheus/console_libraries"),
    Path("/usr/share/doc/prometheus/examples/console_libraries"),
)


def console_libraries_dir(tmp_dir: Path) -> Path | None:
    """A directory holding this Prometheus' prom.lib plus gradserve.lib, as deployed."""
    for candidate in PROM_LIB_DIRS:
        if (candidate / "prom.lib").is_file():
            libraries = tmp_dir / "console_libraries"
            libraries.mkdir()
            for library in candidate.glob("*.lib"):
                shutil.copy(library, libraries / library.name)
            shutil.copy(GRADSERVE_CONSOLE_LIBRARY, libraries / GRADSERVE_CONSOLE_LIBRARY.name)
            return libraries
    return None


@dataclass
class LivePrometheus:
    server: prometheus.PrometheusServer
    metrics_port: int
    recorder: RecordingThread
    consoles_enabled: bool

    @property
    def url(self) -> str:
        return self.server.url


# Package scope: the recording thread must stop before other packages (tests/metrics) check
# exact counter deltas on the same process-wide registry.
@pytest.fixture(scope="package")
def live_prometheus(tmp_path_factory):
    libraries = console_libraries_dir(tmp_path_factory.mktemp("prometheus-consoles"))
    metrics_port = metrics.start_metrics_server(0)
    recorder = RecordingThread(interval_s=0.05)
    recorder.start()
    server = None
    try:
        server = prometheus.start(
            [f"127.0.0.1:{metrics_port}"], scrape_interval="1s",
            console_templates=CONSOLE_TEMPLATES if libraries else None, console_libraries=libraries,
        )
        # Two scrapes with increasing counters are needed before any rate() has a value.
        prometheus.wait_for_data(server.url, "rate(gradserve_samples_processed_total[1m]) > 0", timeout_s=30)
        yield LivePrometheus(server, metrics_port, recorder, consoles_enabled=libraries is not None)
    finally:
        if server is not None:
            prometheus.stop(server)
        recorder.stop()
        metrics.stop_metrics_server(metrics_port)
