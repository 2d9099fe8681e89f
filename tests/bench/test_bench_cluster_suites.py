"""`gradserve bench training` and `bench scaling` run end to end on a real embedded Ray runtime (a
short run: the figures themselves are the benchmark's business, the fields and the run are ours)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradserve_services.bench.training import hidden_ms

pytestmark = pytest.mark.integration


def _bench(*args: str) -> list[dict]:
    done = subprocess.run([str(Path(sys.executable).parent / "gradserve"), "bench", *args, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_training_suite_runs_its_steps():
    *each, median = _bench("training", "--steps", "2", "--warmup", "1", "--batch", "64", "--skip-torch",
                           "--repeats", "3")
    assert [line["repetition"] for line in each] == [0, 1, 2] and median["repetition"] == "median"
    for line in (*each, median):
        assert line["suite"] == "training" and line["steps"] == 2 and line["global_batch"] == 64
        assert line["gradserve_samples_per_s"] > 0
        assert line["total_ms"] >= line["compute_ms"] > 0
        # hidden: the phases beyond the wall time plus the servers' summing while workers computed
        assert 0 <= line["overlapped_ms"] <= line["hidden_ms"] <= \
            line["gather_ms"] + line["apply_ms"] + line["overlapped_ms"]
        assert line["returned_samples_per_s"] > 0 and line["pushed_samples_per_s"] > 0
        assert line["serial_samples_per_s"] > 0
        assert line["gradserve_samples_per_s"] == line["pushed_samples_per_s" if line["pushes_gradients"]
                                                       else "returned_samples_per_s"]
    for line in each:  # (a median's ratio is the median of the ratios)
        assert line["ahead_over_serial"] == pytest.approx(  # (each printed rounded)
            line["returned_samples_per_s"] / line["serial_samples_per_s"], rel=1e-3)
    for field in ("gradserve_samples_per_s", "total_ms", "hidden_ms"):
        assert median[field] == sorted(line[field] for line in each)[1]


def test_training_hidden_time_is_the_phases_beyond_the_wall_time():
    serial = {"broadcast": 1.0, "compute": 10.0, "gather": 2.0, "apply": 3.0, "total": 16.0}
    assert hidden_ms(serial) == 0.0
    assert hidden_ms({**serial, "total": 12.5}) == 3.5
    assert hidden_ms({**serial, "total": 12.5, "overlapped": 1.25}) == 4.75


def test_scaling_suite_runs_each_worker_count():
    lines = _bench("scaling", "--workers", "1,2", "--per-worker-batch", "32", "--steps", "2", "--warmup", "1")
    assert [line["workers"] for line in lines] == [1, 2]
    assert lines[0]["efficiency"] == 1.0 and all(line["samples_per_s"] > 0 for line in lines)
