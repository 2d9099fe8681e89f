"""Job files in local-round mode: the train keys (local_steps, inner_optimizer, compression,
powersgd_rank) and their defaults, a job step as a round of batches, bad values named by key, and
examples/digits_local.yaml training end to end through an embedded service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradserve_services.cluster.config import OUTER_OPTIMIZER
from gradserve_services.errors import InvalidArgument
from gradserve_services.jobs.jobfile import parse_job

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from gradserve_services.cli import main; sys.exit(main())"


def _job(**train):
    return {"dataset": {"name": "digits"}, "model": {"mlp": {"hidden": [8]}},
            "train": {"batch_size": 16, "consistency": "local", **train}}


def test_local_keys_defaults_and_a_step_is_a_round():
    job = parse_job(_job())
    assert job.optimizer == OUTER_OPTIMIZER  # no optimizer section: the outer one is DiLoCo's
    assert (job.train.local_steps, job.train.inner_optimizer, job.train.compression) == (10, None, "none")
    assert job.train.rows_per_step == 160
    given = parse_job({**_job(local_steps=4, inner_optimizer={"name": "sgd", "lr": 0.05},
                              compression="int8"), "optimizer": {"name": "momentum", "lr": 0.5}})
    assert given.optimizer["name"] == "momentum" and given.train.inner_optimizer == {"name": "sgd", "lr": 0.05}
    assert given.train.rows_per_step == 64 and given.train.compression == "int8"
    assert parse_job(_job(consistency="sync")).train.rows_per_step == 16


@pytest.mark.parametrize("train, field", [
    ({"local_steps": 0}, "train.local_steps"),
    ({"inner_optimizer": {"name": "adamw", "lr": -1.0}}, "train.inner_optimizer.lr"),
    ({"inner_optimizer": {"name": "lion"}}, "train.inner_optimizer.name"),
    ({"compression": "zip"}, "train.compression"),
    ({"powersgd_rank": 0}, "train.powersgd_rank"),
])
def test_bad_local_keys_are_named(train, field):
    with pytest.raises(InvalidArgument) as refused:
        parse_job(_job(**train))
    assert refused.value.field == field


@pytest.mark.integration
def test_the_digits_local_example_trains(tmp_path):
    done = subprocess.run([sys.executable, "-c", CLI, "train", str(REPO / "examples" / "digits_local.yaml"),
                           "--epochs", "3", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # 1437 training rows in rounds of 10 x 32: 5 rounds an epoch
    assert summary["steps"] == 15 and summary["test_accuracy"] > 0.85
