"""`gradserve train` end to end, as real processes: the job's gRPC client, the gateway, Ray workers
and the parameter server. Two ways to reach a service are covered: embedded (the job starts and
stops its own) and `--target` (a `gradserve serve` process started here).

The resume tests SIGKILL a job mid-epoch after it has checkpointed, rerun it with `--resume`, and
require exactly the parameters (bit for bit) and per-epoch metrics of an uninterrupted run. Embedded,
the killed job also leaves its service's temporary folder behind: the rerun removes it, and the
rerun's own folder survives a sweep made while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gradserve_services.checkpoint import load_checkpoint
from gradserve_services.jobs.service import SERVICE_FOLDER_MARKER, SERVICE_FOLDER_PREFIX
from gradserve_services.jobs.report import SIGNAL_FIELDS
from gradserve_services.owned_folder import remove_orphans

pytestmark = pytest.mark.integration

CLI = "import sys; from gradserve_services.cli import main; sys.exit(main())"
REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"steps", "epochs", "train_loss", "test_loss", "test_accuracy", "samples_per_s", "wall_s"}
JOB_TIMEOUT_S = 240

# Small enough to run in seconds, long enough (15 steps per epoch, 6 epochs) to be killed mid-epoch.
# Checkpoints every 7 steps never fall on an epoch boundary before the end (lcm(7, 15) = 105 > 90).
RESUME_JOB = {
    "seed": 3,
    "dataset": {"name": "digits"},
    "model": {"mlp": {"hidden": [48], "activation": "relu"}},
    "optimizer": {"name": "adam", "lr": 0.003, "schedule": {"name": "cosine"}},
    "train": {"epochs": 6, "batch_size": 100, "workers": 2, "consistency": "sync"},
    "checkpoint": {"every_steps": 7},
}
RESUME_STEPS = 6 * 15


def start_process(argv, cwd, **kwargs) -> subprocess.Popen:
    # A session of its own: whatever it starts (Ray's processes) shares its process group id.
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def stop_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal what is left of the process group this test started (by its id)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def train(*args, cwd, env=None) -> tuple[int, dict | None, str]:
    return finish(start_process([sys.executable, "-c", CLI, "train", *map(str, args)], cwd, env=env))


def finish(process: subprocess.Popen) -> tuple[int, dict | None, str]:
    """Wait for a started job; its exit code, summary line (None on failure) and stderr."""
    try:
        out, err = process.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        stop_group(process)
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1]) if process.returncode == 0 else None
    if process.returncode == 0:
        assert len(lines) == 1, f"stdout must hold only the summary line: {out!r}"
    return process.returncode, summary, err


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `gradserve serve` process on 127.0.0.1 (ephemeral ports) with its own Ray runtime."""
    folder = tmp_path_factory.mktemp("served")
    process = start_process(
        [sys.executable, "-c", CLI, "serve", "--port", "0", "--metrics-port", "0", "--no-auth",
         "--workers", "2", "--checkpoint-dir", str(folder / "checkpoints")], folder)
    try:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"gradserve serve did not start: {process.stderr.read()[-2000:]}")
        event = json.loads(line)
        yield f"127.0.0.1:{event['port']}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        stop_group(process)
        process.wait(timeout=10)


def write_job(folder: Path, job: dict, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def final_parameters(out: Path) -> tuple[dict, dict]:
    return load_checkpoint(out / "parameters.npz")


def training_record(row: dict) -> dict:
    """A metrics.jsonl row without its observations of the run (timings, smoothed signals)."""
    return {key: value for key, value in row.items() if key not in SIGNAL_FIELDS}


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted embedded run of RESUME_JOB: the end-to-end test and the resume baseline."""
    folder = tmp_path_factory.mktemp("reference")
    job = write_job(folder, RESUME_JOB)
    code, summary, err = train(job, "--out", folder / "out", "--checkpoint-dir", folder / "checkpoints", cwd=folder)
    assert code == 0, err
    return folder / "out", summary, err


def test_embedded_job_trains_digits_and_reports(reference):
    out, summary, err = reference
    assert set(summary) == SUMMARY_KEYS
    assert summary["steps"] == RESUME_STEPS and summary["epochs"] == 6
    assert summary["test_accuracy"] > 0.9 and summary["test_loss"] < 0.5
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    rows = metrics_rows(out)
    assert [row["epoch"] for row in rows] == list(range(6))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["train_loss"] == summary["train_loss"]
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    arrays, meta = final_parameters(out)
    assert meta["version"] == RESUME_STEPS  # sync: one parameter version per step, none doubled
    assert set(arrays) == {"fc1.weight", "fc1.bias", "logits.weight", "logits.bias"}
    assert "epoch 1/6" not in err.replace("gradserve train: epoch 1/6", "")  # a pipe: no progress bar
    # the gradient signals and stragglers of every epoch: in metrics.jsonl and one stderr line each
    for row in rows:
        assert row["noise_scale"] > 0 and -1.0 <= row["shard_cosine_mean"] <= 1.0
        assert row["update_ratio_median"] > 0 and row["compute_spread_max"] >= 1.0
        assert set(row["slowest_worker_steps"]) <= {"0", "1"}
        assert sum(row["slowest_worker_steps"].values()) == RESUME_STEPS // 6
    summaries = [line for line in err.splitlines() if line.startswith("gradserve train: epoch ")]
    assert [line.split()[3] for line in summaries] == [f"{e}/6" for e in range(1, 7)]
    assert all("noise_scale=" in line and "slowest=worker " in line for line in summaries)


def kill_after_first_checkpoint(job: Path, folder: Path, *extra, env=None) -> dict:
    """Start the job, SIGKILL it as soon as a checkpoint record exists; return that newest record."""
    checkpoints = folder / "checkpoints"
    process = start_process([sys.executable, "-c", CLI, "train", str(job), "--out", str(folder / "out"),
                             "--checkpoint-dir", str(checkpoints), *extra], folder, env=env)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not list(checkpoints.glob("step-*.json")):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stop_group(process)
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    newest = sorted(checkpoints.glob("step-*.json"))[-1]
    return json.loads(newest.read_text())


def private_temp_dir(folder: Path) -> dict:
    """The environment of a job whose temporary folders land in `folder/tmp` (so only this test's
    jobs are seen there); Ray keeps its usual place (its socket paths must stay short)."""
    (folder / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(folder / "tmp"), "RAY_TMPDIR": "/tmp"}


def service_folders(env: dict) -> list[Path]:
    return sorted(Path(env["TMPDIR"]).glob(f"{SERVICE_FOLDER_PREFIX}*"))


def wait_for_own_service_folder(process: subprocess.Popen, env: dict, orphans: list[Path]) -> Path:
    """The folder the running job made for its service (it removed the orphans just before)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        fresh = [path for path in service_folders(env) if path not in orphans]
        if fresh and (fresh[0] / SERVICE_FOLDER_MARKER).exists():
            return fresh[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the job made no service folder in time"
        time.sleep(0.005)


@pytest.mark.parametrize("where", ["embedded", "target"])
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(where, reference, tmp_path, request):
    extra = ("--target", request.getfixturevalue("served")) if where == "target" else ()
    env = private_temp_dir(tmp_path)
    job = write_job(tmp_path, RESUME_JOB)
    record = kill_after_first_checkpoint(job, tmp_path, *extra, env=env)
    assert 0 < record["step"] < RESUME_STEPS
    assert record["position"]["batch_in_epoch"] != 0  # the kill left an epoch half done
    orphans = service_folders(env)
    if where == "embedded":  # the killed job's service folder, with its session's checkpoints
        assert len(orphans) == 1 and [path for path in orphans[0].iterdir() if path.is_dir()], orphans
    else:
        assert orphans == []  # a job against a running service makes none

    process = start_process([sys.executable, "-c", CLI, "train", str(job), "--out", str(tmp_path / "out"),
                             "--checkpoint-dir", str(tmp_path / "checkpoints"), "--resume", *extra],
                            tmp_path, env=env)
    if where == "embedded":
        live = wait_for_own_service_folder(process, env, orphans)
        assert not orphans[0].exists()  # removed by the new job before it made its own
        # A sweep while the job runs (what any other job starting now does) spares its folder.
        assert remove_orphans(str(tmp_path / "tmp"), SERVICE_FOLDER_PREFIX, marker=SERVICE_FOLDER_MARKER) == []
        assert live.exists()
    code, summary, err = finish(process)
    assert code == 0, err
    assert service_folders(env) == []  # the finished job removed its own
    assert f"resumed at step {record['step']}" in err
    assert summary["steps"] == RESUME_STEPS

    reference_out, reference_summary, _ = reference
    resumed, resumed_meta = final_parameters(tmp_path / "out")
    expected, expected_meta = final_parameters(reference_out)
    assert resumed_meta["version"] == expected_meta["version"] == RESUME_STEPS
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    # Each epoch once, with the uninterrupted run's numbers (the half epoch's loss sum was restored).
    resumed_rows, reference_rows = metrics_rows(tmp_path / "out"), metrics_rows(reference_out)
    assert [training_record(row) for row in resumed_rows] == [training_record(row) for row in reference_rows]
    assert all(set(SIGNAL_FIELDS) <= set(row) for row in resumed_rows + reference_rows)
    assert summary["test_accuracy"] == reference_summary["test_accuracy"]

    # The same folder with another job's settings is refused before any training.
    code, _, err = train(job, "--out", tmp_path / "out", "--checkpoint-dir", tmp_path / "checkpoints",
                         "--resume", "--batch-size", "50", *extra, cwd=tmp_path)
    assert code == 2 and "different job" in err and len(err.strip().splitlines()) == 1


def test_digits_example_reaches_097_through_a_running_service(served, tmp_path):
    code, summary, err = train(REPO / "examples" / "digits_mlp.yaml", "--target", served,
                               "--out", tmp_path / "out", "--checkpoint-dir", tmp_path / "ck", cwd=tmp_path)
    assert code == 0, err
    assert summary["test_accuracy"] >= 0.97, summary


def test_residual_example_with_fan_out_trains(served, tmp_path):
    code, summary, err = train(REPO / "examples" / "residual_mlp.yaml", "--target", served, "--epochs", "3",
                               "--out", tmp_path / "out", "--checkpoint-dir", tmp_path / "ck", cwd=tmp_path)
    assert code == 0, err
    assert summary["test_accuracy"] > 0.85, summary  # 3 of its 20 epochs; chance is 0.1


def test_diabetes_regression_reports_no_accuracy(served, tmp_path):
    code, summary, err = train(REPO / "examples" / "diabetes_mse.yaml", "--target", served,
                               "--out", tmp_path / "out", "--checkpoint-dir", tmp_path / "ck", cwd=tmp_path)
    assert code == 0, err
    assert set(summary) == SUMMARY_KEYS - {"test_accuracy"}
    assert summary["test_loss"] < 0.8  # standardised target: 1.0 is what predicting the mean scores
    assert "test_accuracy" not in metrics_rows(tmp_path / "out")[0]


def test_every_example_is_a_valid_job():
    from gradserve_services.jobs.jobfile import load_job
    from gradserve_services.jobs.prepare import prepare_job

    for path in sorted((REPO / "examples").glob("*.yaml")):
        prepared = prepare_job(load_job(path))
        assert prepared.total_steps > 0, path
