"""The README's "training your own data" walkthrough, run as written: examples/wine.csv (a CSV file
with a header) -> examples/wine.yaml -> `gradserve train` -> the summary line and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GRADSERVE = str(Path(sys.executable).with_name("gradserve"))
JOB = REPO / "examples" / "wine.yaml"
EPOCHS = 3

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_readme_shows_the_job_file_and_the_command():
    readme = (REPO / "README.md").read_text()
    assert f"```yaml\n{JOB.read_text()}```" in readme
    assert "gradserve train examples/wine.yaml" in readme
    header = (REPO / "examples" / "wine.csv").read_text().splitlines()[0].split(",")
    assert ",".join(header[:4]) in readme and header[-1] in readme


def test_walkthrough_trains_the_csv_and_draws_the_plot(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([GRADSERVE, "train", str(JOB), "--epochs", str(EPOCHS), "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout  # the summary, nothing else
    summary = json.loads(lines[0])
    assert summary["epochs"] == EPOCHS and summary["steps"] % EPOCHS == 0 and summary["steps"] > 0
    assert 0.0 < summary["test_loss"] < 1.1  # ln(3) = 1.0986 is a model that learnt nothing
    assert summary["test_accuracy"] > 0.6  # three classes: chance is about 0.4
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert (out / "parameters.npz").is_file()

    # one gradserve line says the embedded Ray runtime starts, where it listens and its auth mode;
    # Ray's own notice is not printed
    announcements = [line for line in run.stderr.splitlines() if "starting the embedded Ray runtime" in line]
    assert len(announcements) == 1, run.stderr
    assert announcements[0].startswith("gradserve train: ")
    assert "127.0.0.1 only" in announcements[0] and "token authentication" in announcements[0]
    assert "Token authentication is enabled" not in run.stderr and "RAY_AUTH_MODE" not in run.stderr
