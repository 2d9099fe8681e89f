"""deploy/prometheus: the config passes promtool, and the console template holds the dashboard's
panels and is rendered by a real Prometheus at /consoles/gradserve.html."""

from __future__ import annotations

import re
import subprocess
import urllib.request

import pytest

from tests.support.dashboard import (
    CONSOLE_PATH,
    REPO_ROOT,
    console_queries,
    dashboard_panels,
    dashboard_queries,
    expand_grafana_variables,
)
from tests.support.promtool import promtool_binary


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8", errors="replace")


def test_prometheus_config_passes_promtool():
    completed = subprocess.run(
        [promtool_binary() or "promtool", "check", "config", str(REPO_ROOT / "deploy/prometheus/prometheus.yml")],
        capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_console_has_the_dashboard_expressions():
    dashboard_expressions = sorted(expand_grafana_variables(expr) for _title, expr in dashboard_queries())
    assert sorted(console_queries()) == dashboard_expressions


@pytest.mark.slow
def test_real_prometheus_renders_the_console(live_prometheus):
    # Debian's prometheus package (installed by the Makefile) ships prom.lib; without it the console
    # cannot render, which is a broken install, not a reason to skip.
    assert live_prometheus.consoles_enabled, "this Prometheus install ships no prom.lib to pair gradserve.lib with"
    status, page = fetch(f"{live_prometheus.url}/consoles/gradserve.html")
    assert status == 200
    for panel in dashboard_panels():
        assert panel["title"] in page, panel["title"]
    # Stat rows are evaluated server-side: with data scraped, each shows a number, never "-".
    stat_values = re.findall(r'<td class="text-right"><a href="[^"]*">([^<]*)</a>', page)
    assert len(stat_values) == sum(1 for p in dashboard_panels() if p["type"] == "stat")
    for value in stat_values:
        float(value)
    # PromConsole.Graph needs these scripts from the prom.lib head; this Prometheus must serve them.
    scripts = re.findall(r'<script src="([^"]+)"', page)
    for needed in ("prom_console.js", "rickshaw.min.js", "jquery"):
        matching = [src for src in scripts if needed in src]
        assert matching, f"page links no {needed}: {scripts}"
        assert all(fetch(f"{live_prometheus.url}{src}")[0] == 200 for src in matching), matching
    # Server-side rendering ran the graphs' <script> blocks through the template engine intact.
    assert page.count("new PromConsole.Graph(") == sum(1 for p in dashboard_panels() if p["type"] == "timeseries")
