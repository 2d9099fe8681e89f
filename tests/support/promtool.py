"""Scrape a metrics endpoint and lint the exposition with Debian's `promtool check metrics`.

Reused by the end-to-end test against a live gateway:

    text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    returncode, lint_output = check_metrics(text)
    assert (returncode, lint_output) == (0, "")
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

__all__ = ["promtool_binary", "scrape", "check_metrics"]


def promtool_binary() -> str | None:
    return shutil.which("promtool")


def scrape(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        assert response.status == 200, f"scrape of {url} answered HTTP {response.status}"
        return response.read().decode("utf-8")


def check_metrics(exposition: str, timeout_s: float = 30.0) -> tuple[int, str]:
    """Run `promtool check metrics` on `exposition`; return (exit code, stdout + stderr).

    promtool exits 0 and prints nothing for a clean exposition; lint findings (missing `_total`,
    non-base units, ...) are printed one per line with a non-zero exit code."""
    binary = promtool_binary()
    if binary is None:
        raise FileNotFoundError("promtool not found (make system-deps installs prometheus)")
    completed = subprocess.run(
        [binary, "check", "metrics"], input=exposition.encode("utf-8"),
        capture_output=True, timeout=timeout_s,
    )
    output = (completed.stdout + completed.stderr).decode("utf-8", errors="replace").strip()
    return completed.returncode, output
