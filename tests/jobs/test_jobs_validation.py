"""Bad job files and bad data fail before any training: exit code 2, one line on stderr naming the
problem, nothing on stdout.

Every case passes `--target 127.0.0.1:1` (nothing listens there): a job that got as far as training
would fail to connect and exit 1 instead, so exit 2 proves the problem was caught first.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

NO_SERVICE = ("--target", "127.0.0.1:1")
CLI = "import sys; from gradserve_services.cli import main; sys.exit(main())"


def digits_job(**overrides) -> dict:
    job = {
        "dataset": {"name": "digits"},
        "model": {"mlp": {"hidden": [8]}},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 1, "batch_size": 64},
    }
    job.update(overrides)
    return job


def assert_refused(result, *words):
    code, out, err = result
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write_csv(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def csv_job(path, **dataset) -> dict:
    return digits_job(dataset={"name": "csv", "path": str(path), "label": "y", **dataset})


def test_missing_label_column(tmp_path, write_job, run_cli):
    data = write_csv(tmp_path, "a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    job = write_job(csv_job(data, label="price"))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.label", "'price'", "columns: a, b, y")


def test_missing_feature_column(tmp_path, write_job, run_cli):
    data = write_csv(tmp_path, "a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    job = write_job(csv_job(data, features=["a", "c"]))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.features", "'c'")


def test_fractional_labels_for_classification(tmp_path, write_job, run_cli):
    data = write_csv(tmp_path, "a,b,y\n1,2,0\n3,4,1.5\n5,6,0\n7,8,1\n")
    job = write_job(csv_job(data, task="classification"))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.label", "integer class indices", "line 3", "'1.5'")


def test_text_labels_for_regression(tmp_path, write_job, run_cli):
    data = write_csv(tmp_path, "a,b,y\n1,2,0.5\n3,4,tall\n5,6,0.1\n7,8,1\n")
    job = csv_job(data)
    job["model"]["loss"] = "mse"
    assert_refused(run_cli("train", write_job(job), *NO_SERVICE), "dataset.label", "numbers", "'tall'")


def test_nan_rows_in_csv(tmp_path, write_job, run_cli):
    data = write_csv(tmp_path, "a,b,y\n1,2,0\n3,,1\n5,nan,0\n7,8,1\n")
    job = write_job(csv_job(data))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset:", "2 rows with missing or NaN", "line 3",
                   "drop_missing")


def test_non_numeric_feature_cell(tmp_path, write_job, run_cli):
    data = write_csv(tmp_path, "a,b,y\n1,2,0\n3,x7,1\n5,6,0\n7,8,1\n")
    job = write_job(csv_job(data))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.features", "line 3", "column 'b'", "'x7'")


def test_nan_rows_in_npz(tmp_path, write_job, run_cli):
    x = np.ones((10, 3))
    x[4, 1] = np.nan
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(10) % 2)
    job = write_job(digits_job(dataset={"name": "npz", "path": str(tmp_path / "data.npz")}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "1 rows with missing or NaN", "row 4")


def test_npz_without_the_named_array(tmp_path, write_job, run_cli):
    np.savez(tmp_path / "data.npz", features=np.ones((10, 3)), y=np.arange(10) % 2)
    job = write_job(digits_job(dataset={"name": "npz", "path": str(tmp_path / "data.npz")}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.x_key", "no array 'x'", "features, y")


def test_data_file_that_does_not_exist(tmp_path, write_job, run_cli):
    job = write_job(csv_job(tmp_path / "absent.csv"))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.path", "no such file")


def test_unknown_op(write_job, run_cli):
    model = {"nodes": [{"name": "bad", "op": "conv2d", "inputs": ["input"]}], "output": "bad"}
    job = write_job(digits_job(model=model))
    assert_refused(run_cli("train", job, *NO_SERVICE), "model.nodes[bad]", "unknown op 'conv2d'")


def test_graph_output_narrower_than_the_classes(write_job, run_cli):
    model = {"nodes": [{"name": "logits", "op": "dense", "inputs": ["input"], "units": 3}], "output": "logits"}
    job = write_job(digits_job(model=model))
    assert_refused(run_cli("train", job, *NO_SERVICE), "model.output", "3 features", "needs 10")


def test_unknown_dataset(write_job, run_cli):
    job = write_job(digits_job(dataset={"name": "mnist"}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "dataset.name", "unknown dataset 'mnist'")


def test_bad_optimizer_name(write_job, run_cli):
    job = write_job(digits_job(optimizer={"name": "adagrad"}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "optimizer.name", "unknown optimizer 'adagrad'")


def test_negative_epochs_in_the_file(write_job, run_cli):
    job = write_job(digits_job(train={"epochs": -3}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "train.epochs", ">= 1", "-3")


def test_negative_epochs_from_the_flag(write_job, run_cli):
    assert_refused(run_cli("train", write_job(digits_job()), "--epochs", "-1", *NO_SERVICE), "train.epochs")


def test_non_positive_learning_rate_from_the_flag(write_job, run_cli):
    assert_refused(run_cli("train", write_job(digits_job()), "--lr", "0", *NO_SERVICE), "optimizer.lr", "> 0")


def test_misspelt_key(write_job, run_cli):
    job = write_job(digits_job(train={"epoch": 3}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "train.epoch", "unknown key", "epochs")


def test_unknown_loss_and_unknown_activation(write_job, run_cli):
    job = write_job(digits_job(model={"mlp": {"hidden": [4]}, "loss": "hinge"}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "model.loss", "'hinge'")
    job = write_job(digits_job(model={"mlp": {"hidden": [4], "activation": "swish"}}))
    assert_refused(run_cli("train", job, *NO_SERVICE), "model.mlp.activation", "'swish'")


def test_bad_target(write_job, run_cli):
    assert_refused(run_cli("train", write_job(digits_job()), "--target", "localhost"), "service.target", "host:port")


def test_resume_without_checkpoint_dir(write_job, run_cli):
    assert_refused(run_cli("train", write_job(digits_job()), "--resume", *NO_SERVICE), "checkpoint.dir")


def test_job_file_missing_and_malformed(tmp_path, run_cli):
    assert_refused(run_cli("train", tmp_path / "nope.yaml", *NO_SERVICE), "nope.yaml", "cannot read")
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: {name: digits\nmodel: [\n")
    assert_refused(run_cli("train", broken, *NO_SERVICE), "invalid YAML", "line")


def test_a_valid_job_gets_past_validation(write_job, run_cli):
    """The control for all of the above: the same job, valid, reaches the (absent) service -> exit 1."""
    code, out, err = run_cli("train", write_job(digits_job()), *NO_SERVICE)
    assert code == 1, err
    assert out == ""
    assert "training failed" in err


def test_real_process_exit_code_and_single_line(tmp_path, write_job):
    job = write_job(digits_job(optimizer={"name": "adagrad"}))
    done = subprocess.run(
        [sys.executable, "-c", CLI, "train", str(job), *NO_SERVICE],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "optimizer.name" in done.stderr
