"""`gradserve bench load` and `gradserve bench soak` end to end, small: their own server process,
concurrent clients, a JSON line whose numbers add up, only OK or RESOURCE_EXHAUSTED answers, the memory
of the gateway, workers and parameter servers found and bounded, and no server left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradserve_services import procfs
from gradserve_services.bench.serve_process import RSS_ROLES

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
    assert set(report["rss_growth_by_role_bytes"]) == set(RSS_ROLES)
    assert report["rss_start_by_role_bytes"]["workers"] > 0 and report["rss_start_by_role_bytes"]["parameter_servers"] > 0
    assert not bench_servers()


SOAK_CLIENTS, SOAK_STEPS, SOAK_SESSION_STEPS = 4, 240, 40  # 60 steps per client: two sessions each
BOUNDED_GROWTH_BYTES = 64 << 20


def test_bench_soak_samples_every_role_and_memory_stays_bounded():
    run = subprocess.run(
        [GRADSERVE, "bench", "soak", "--json", "--clients", str(SOAK_CLIENTS), "--total-steps", str(SOAK_STEPS),
         "--steps-per-session", str(SOAK_SESSION_STEPS), "--sample-s", "0.1", "--warmup-fraction", "0.25",
         "--max-concurrent-calls", "2", "--workers", "2", "--timeout-s", "150"],
        capture_output=True, text=True, timeout=200,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["suite"] == "soak" and report["steps_ok"] == SOAK_STEPS
    assert set(report["calls_by_code"]) <= {"OK", "RESOURCE_EXHAUSTED"}, report["calls_by_code"]
    assert report["errors_by_code"].get("RESOURCE_EXHAUSTED", 0) > 0  # the cap answered explicitly
    per_client = SOAK_STEPS // SOAK_CLIENTS
    sessions = SOAK_CLIENTS * -(-per_client // SOAK_SESSION_STEPS)  # a client's last session may be shorter
    # create + pull + close per session, one per step: every OK accounted for
    assert report["calls_by_code"]["OK"] == SOAK_STEPS + 3 * sessions

    fields = report["rss_sample_fields"]
    rows = [dict(zip(fields, row)) for row in report["rss_samples"]]
    assert report["rss_samples_taken"] >= len(rows) >= 3
    assert [row["steps"] for row in rows] == sorted(row["steps"] for row in rows)
    assert rows[0]["steps"] == 0 and rows[-1]["steps"] == SOAK_STEPS
    for row in rows:
        assert row["gateway"] > 0 and row["ray_other"] > 0, row
        assert row["workers_processes"] == 2 and row["workers"] > 0, row  # the pool: --workers 2
    training = [row for row in rows if row["steps"] > 0]
    assert training and all(row["parameter_servers_processes"] == 1 and row["parameter_servers"] > 0
                            for row in training)
    for role in ("gateway", "workers", "parameter_servers"):
        growth = report["rss_growth_by_role_bytes"][role]
        assert abs(growth) < BOUNDED_GROWTH_BYTES, (role, growth)
        assert growth == report["rss_end_by_role_bytes"][role] - report["rss_warm_by_role_bytes"][role]
        assert report["rss_peak_by_role_bytes"][role] >= report["rss_end_by_role_bytes"][role]
        assert isinstance(report["rss_growth_per_1k_steps_by_role_bytes"][role], float)
    assert not bench_servers()
