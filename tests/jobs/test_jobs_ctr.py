"""Click-through jobs end to end, as real processes (the job's gRPC client, the gateway, Ray workers,
the parameter servers holding the tables): examples/ctr_dlrm.yaml's model on the synthetic set
reaches a held-out log-loss within 2 % of the planted model's, and hashed CSV columns train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

CLI = "import sys; from gradserve_services.cli import main; sys.exit(main())"
REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 600  # the DLRM job trains 240,000 rows; generous on a loaded machine


def train(job: dict, folder: Path) -> tuple[dict, str]:
    """Run `gradserve train` on `job` in its own process group; its summary line and stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    process = subprocess.Popen([sys.executable, "-c", CLI, "train", str(path), "--out", str(folder / "out")],
                               cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever the job left of its Ray runtime
        except ProcessLookupError:
            pass
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def scaled_example(samples: int, vocab: int, dim: int) -> dict:
    """examples/ctr_dlrm.yaml's model, its tables and vectors resized: the same graph, smaller."""
    job = yaml.safe_load((REPO / "examples" / "ctr_dlrm.yaml").read_text())
    job["dataset"].update(samples=samples, vocab=vocab)
    for node in job["model"]["nodes"]:
        if node["op"] == "embedding":
            node.update(rows=vocab, dim=dim)
        elif node["op"] == "dot_interaction":
            node["dim"] = dim
        elif node["name"] == "bottom":
            node["units"] = dim
    job.pop("out", None)
    return job


def test_dlrm_example_reaches_the_planted_models_log_loss(tmp_path):
    summary, err = train(scaled_example(samples=300_000, vocab=50, dim=8), tmp_path)
    assert summary["planted_test_loss"] < 0.6  # the planted model is far better than a constant rate
    assert summary["test_loss"] <= 1.02 * summary["planted_test_loss"], summary
    assert 0.5 < summary["test_auc"] <= summary["planted_test_auc"] + 0.01, summary
    assert "planted model" in err  # the job prints its figures beside the planted model's
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_auc"] == summary["test_auc"]


def test_hashed_csv_columns_train_through_the_service(tmp_path):
    """Clicks that depend only on a string column and an integer column: hashed into table rows,
    a model of their embeddings (Adagrad on the tables, as the job file asks) learns them: the
    held-out loss falls well below a constant predictor's."""
    rng = np.random.default_rng(0)
    sites = rng.choice([f"site-{k}" for k in range(12)], size=3000)
    devices = rng.integers(100, 108, size=3000)
    effect = {f"site-{k}": (k - 6) / 3 for k in range(12)}
    logits = np.array([effect[s] for s in sites]) + (devices - 104) / 2
    clicks = (rng.random(3000) < 1 / (1 + np.exp(-logits))).astype(int)
    lines = ["site,device,clicked"] + [f"{s},{d},{c}" for s, d, c in zip(sites, devices, clicks)]
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "clicks.csv").write_text("\n".join(lines) + "\n")
    job = {
        "dataset": {"path": str(tmp_path / "clicks.csv"), "label": "clicked", "categorical": ["site", "device"],
                    "hash_rows": 256},
        "model": {"loss": "binary_cross_entropy", "nodes": [
            {"name": "rows", "op": "embedding", "inputs": ["categorical"], "rows": 256, "dim": 4},
            {"name": "click", "op": "dense", "inputs": ["rows"], "units": 1}], "output": "click"},
        "optimizer": {"name": "adam", "lr": 0.05},
        "table_optimizer": {"name": "adagrad", "lr": 0.3},  # sent with the session
        "train": {"epochs": 8, "batch_size": 200, "workers": 2},
    }
    summary, _ = train(job, tmp_path / "run")
    rate = clicks.mean()
    constant = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert summary["test_loss"] < constant - 0.1, (summary, constant)
    assert summary["test_auc"] > 0.75
