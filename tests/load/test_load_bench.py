"""`gradserve bench load` end to end, small: its own server process, concurrent clients, a JSON line
whose numbers add up, only OK or RESOURCE_EXHAUSTED answers, and no server left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradserve_services import procfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRADSERVE = str(Path(sys.executable).with_name("gradserve"))
CLIENTS, STEPS, ROUNDS = 4, 5, 2
FIELDS = {"suite", "clients", "steps_per_client", "rounds", "steps_ok", "steps_expected", "step_p50_ms",
          "step_p99_ms", "calls_by_code", "errors_by_code", "server_rss_start_bytes", "server_rss_end_bytes",
          "server_rss_growth_bytes", "server_rss_by_round_bytes", "wall_s"}


def bench_servers() -> list[int]:
    """Pids of `gradserve serve` processes the load suite started (their token file lives in its
    own temporary folder)."""
    return [pid for pid in procfs.pids() if "gradserve-load-" in procfs.cmdline(pid)]


def test_bench_load_reports_and_only_ok_or_resource_exhausted():
    # A cap of 2 concurrent calls for 4 clients: some calls must be refused, explicitly.
    run = subprocess.run(
        [GRADSERVE, "bench", "load", "--json", "--clients", str(CLIENTS), "--steps", str(STEPS),
         "--rounds", str(ROUNDS), "--max-concurrent-calls", "2", "--timeout-s", "240"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert FIELDS <= set(report)
    assert report["steps_expected"] == CLIENTS * STEPS * (ROUNDS + 1)
    assert report["steps_ok"] == report["steps_expected"]  # every step went through in the end
    assert set(report["calls_by_code"]) <= {"OK", "RESOURCE_EXHAUSTED"}, report["calls_by_code"]
    assert set(report["errors_by_code"]) <= {"RESOURCE_EXHAUSTED"}
    assert report["errors_by_code"].get("RESOURCE_EXHAUSTED", 0) > 0  # the cap answered explicitly
    assert 0 < report["step_p50_ms"] <= report["step_p99_ms"]
    assert report["server_rss_start_bytes"] > 0 and len(report["server_rss_by_round_bytes"]) == ROUNDS + 1
    assert abs(report["server_rss_growth_bytes"]) < 64 << 20
    assert not bench_servers()
