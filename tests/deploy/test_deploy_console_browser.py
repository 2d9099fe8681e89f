"""The Prometheus console as a person sees it: a real `gradserve serve` trains digits over embedded
Ray while a real Prometheus scrapes it, and headless Chromium renders /consoles/gradserve.html.
The screenshot is saved in the test's folder; the DOM after the page's scripts ran must show, for
every panel, a value or a drawn graph: no error, nothing empty, no constant 0 where training ran.

Chromium is a system dependency (`make system-deps`): missing, the test fails."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from gradserve import Client, mlp
from tests.deploy.conftest import CONSOLE_TEMPLATES, console_libraries_dir
from tests.support import prometheus
from tests.support.dashboard import dashboard_panels
from tests.support.serve_process import serve_process

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMEOUT_S = 180
TRAINING_WAIT_S = 240
# Panels that may rightly stay at 0 while training goes well: failures, retries, errors.
ZERO_IS_HEALTHY = ("Worker failures and retries / s", "RPC errors by code / s",
                   "Gradient staleness p50 / p99",
                   # the run trains digits, a model without tables: their traffic stays at 0
                   "Table rows pulled and pushed / step", "Table unique-row ratio and stored rows",
                   "Table bytes / s: wire, dense equivalent, stored")


PREFIXES = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "µ": 1e-6, "u": 1e-6, "n": 1e-9}


def _number(text: str) -> float:
    """A value as the console's humanizing formatters print it ("50k", "1.5m", "0")."""
    match = re.fullmatch(r"\s*([-+]?[0-9][0-9.,]*(?:e[-+]?\d+)?)\s*([kMGTmµun]?)\w*\s*", text)
    assert match, f"not a number: {text!r}"
    return float(match.group(1).replace(",", "")) * PREFIXES[match.group(2)]


class _Panels(HTMLParser):
    """Per `<h3>` panel of the console: its text (scripts left out), the svg paths drawn after it
    and its y-axis tick values (Rickshaw's `data-y-value`); the stat table's rows as cells."""

    def __init__(self):
        super().__init__()
        self.graphs: dict[str, dict] = {}
        self.stats: list[list[str]] = []
        self._current = None
        self._in_h3 = self._in_row = self._in_script = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self._in_h3, self._current = True, ""
        elif tag == "tr":
            self._in_row = True
            self.stats.append([])
        elif tag in ("td", "th") and self._in_row:
            self._cell = ""
        elif tag == "script":
            self._in_script = True
        elif tag == "path" and self._current in self.graphs:
            if dict(attrs).get("d"):
                self.graphs[self._current]["paths"] += 1
        elif tag == "g" and self._current in self.graphs and dict(attrs).get("data-y-value") is not None:
            self.graphs[self._current]["ticks"].append(_number(dict(attrs)["data-y-value"]))

    def handle_endtag(self, tag):
        if tag == "h3":
            self._in_h3 = False
            self.graphs[self._current] = {"paths": 0, "text": "", "ticks": []}
        elif tag in ("td", "th") and self._cell is not None:
            self.stats[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self._in_row = False
        elif tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_h3:
            self._current += data
        elif self._cell is not None:
            self._cell += data
        elif self._current in self.graphs and not self._in_script:
            self.graphs[self._current]["text"] += data


def _render(url: str, tmp_path: Path) -> tuple[str, Path]:
    assert os.access(CHROMIUM, os.X_OK), "chromium is missing: run `make system-deps`"
    screenshot = tmp_path / "console.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
              "--window-size=1280,4200", "--virtual-time-budget=15000"]
    for args in (["--screenshot=" + str(screenshot)], ["--dump-dom"]):
        profile = tmp_path / f"profile-{args[0][2:6]}"  # a fresh user-data-dir per run
        done = subprocess.run([*common, f"--user-data-dir={profile}", *args, url], capture_output=True,
                              text=True, timeout=BROWSER_TIMEOUT_S, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, screenshot


def _train(target: str, stop: threading.Event, errors: list) -> None:
    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    try:
        with Client(target, timeout=TRAINING_WAIT_S) as client:
            session = client.create_session(mlp(64, [32], 10), seed=0, num_workers=2,
                                            optimizer={"name": "sgd", "lr": 0.05})
            step_id = 0
            while not stop.is_set():
                step_id += 1
                rows = rng.choice(len(x), 128, replace=False)
                client.step(session, x[rows], y[rows], step_id=step_id)
                time.sleep(0.05)
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


def test_console_renders_every_panel_in_chromium_after_a_real_training_run(tmp_path):
    libraries = console_libraries_dir(tmp_path)
    assert libraries is not None, "Prometheus' console libraries (prom.lib) are missing"
    stop, errors = threading.Event(), []
    with serve_process(tmp_path / "serve.log", ["--no-auth", "--workers", "2"]) as server:
        trainer = threading.Thread(target=_train, args=(server.target, stop, errors), daemon=True)
        trainer.start()
        scraper = None
        try:
            scraper = prometheus.start([f"127.0.0.1:{server.serving['metrics_port']}"], scrape_interval="1s",
                                       console_templates=CONSOLE_TEMPLATES, console_libraries=libraries)
            for ready in ("rate(gradserve_samples_processed_total[1m]) > 0",
                          "gradserve_gradient_noise_scale > 0",
                          "rate(gradserve_worker_compute_spread_ratio_count[1m]) > 0"):
                prometheus.wait_for_data(scraper.url, ready, timeout_s=TRAINING_WAIT_S)
            time.sleep(5)  # a few more scrapes: every graph gets more than one point
            assert not errors, errors
            dom, screenshot = _render(f"{scraper.url}/consoles/gradserve.html", tmp_path)
        finally:
            stop.set()
            trainer.join(timeout=TRAINING_WAIT_S)
            if scraper is not None:
                prometheus.stop(scraper)
    (tmp_path / "console.html").write_text(dom)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000

    page = _Panels()
    page.feed(dom)
    for panel in dashboard_panels():
        title = panel["title"]
        if panel["type"] == "stat":
            (row,) = [cells for cells in page.stats if cells and cells[0] == title]
            assert _number(row[-1]) > 0, (title, row)  # not an error, not empty: training ran
            continue
        graph = page.graphs.get(title)
        assert graph is not None, f"no panel {title!r} in the rendered page"
        assert "error" not in graph["text"].lower(), (title, graph["text"][:500])
        if title in ZERO_IS_HEALTHY:  # drawn flat at 0, or no series at all (no error happened)
            block = dom.split(f"<h3>{title}</h3>", 1)[1].split("<h3>", 1)[0]
            assert graph["paths"] > 0 or "No timeseries returned" in block, title
            continue
        assert graph["paths"] > 0, f"{title!r} drew no line"
        # an axis without ticks, or of only 0, is a line flat at 0
        assert any(tick != 0 for tick in graph["ticks"]), (title, graph["ticks"])
