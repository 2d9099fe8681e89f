"""`gradserve bench functions` runs end to end and prints its two lines with every field; a short
run on a small model: the figures are the benchmark's business, their consistency is ours."""

import json
import subprocess
import sys
from pathlib import Path


def test_functions_suite_prints_both_cases_with_their_ratios():
    done = subprocess.run([str(Path(sys.executable).parent / "gradserve"), "bench", "functions", "--json",
                           "--repeats", "1", "--steps", "2", "--batch", "16", "--hidden", "32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["case"] for line in lines] == ["train_step", "held_backward"]
    first, second = lines
    assert first["model"] == "784-32-10" and first["batch"] == 16
    assert abs(first["ratio_to_step"] - first["train_step_ms"] / first["step_ms"]) < 2e-3
    assert abs(second["ratio_to_recomputed"] - second["held_ms"] / second["recomputed_forward_ms"]) < 2e-3
    assert all(value > 0 for line in lines for key, value in line.items() if key.endswith("_ms"))
