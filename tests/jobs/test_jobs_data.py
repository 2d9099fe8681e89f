"""Datasets, the split, standardisation and the batch order (no service needed)."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.errors import InvalidArgument
from gradserve_services.jobs.datasets import load_dataset
from gradserve_services.jobs.jobfile import apply_overrides, parse_job
from gradserve_services.jobs.split import BatchOrder, Standardizer, split_dataset


def dataset_config(tmp_path, **dataset):
    job = parse_job({"dataset": dataset, "model": {"mlp": {"hidden": [4]}}}, base_dir=tmp_path)
    return job.dataset


def test_builtin_digits_and_diabetes():
    digits = load_dataset(dataset_config(".", name="digits"))
    assert digits.x.shape == (1797, 64) and digits.x.dtype == np.float32
    assert digits.y.dtype == np.int64 and digits.task == "classification" and digits.num_outputs == 10
    diabetes = load_dataset(dataset_config(".", name="diabetes"))
    assert diabetes.x.shape == (442, 10) and diabetes.y.shape == (442, 1)
    assert diabetes.task == "regression" and diabetes.y.dtype == np.float32
    assert diabetes.feature_names[:3] == ("age", "sex", "bmi")


def test_csv_columns_labels_and_relative_path(tmp_path):
    (tmp_path / "data.csv").write_text("a, b ,label,c\n1,2,1,3\n4,5,0,6\n7,8,2,9\n")
    data = load_dataset(dataset_config(tmp_path, path="data.csv"))  # `path:` alone names the kind
    assert data.feature_names == ("a", "b", "c") and data.task == "classification" and data.num_outputs == 3
    np.testing.assert_array_equal(data.x, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(data.y, [1, 0, 2])
    chosen = load_dataset(dataset_config(tmp_path, path="data.csv", features=["c"], task="regression"))
    assert chosen.x.shape == (3, 1) and chosen.y.dtype == np.float32 and chosen.y.shape == (3, 1)


def test_csv_drop_missing_keeps_the_complete_rows(tmp_path):
    (tmp_path / "data.csv").write_text("a,y\n1,0\n,1\n3,NaN\n4,1\n")
    data = load_dataset(dataset_config(tmp_path, path="data.csv", label="y", drop_missing=True))
    np.testing.assert_array_equal(data.x[:, 0], [1, 4])
    np.testing.assert_array_equal(data.y, [0, 1])


def test_npz_images_are_flattened_and_float_labels_mean_regression(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 2, 3)), y=np.linspace(0, 1, 6))
    data = load_dataset(dataset_config(tmp_path, path="d.npz"))
    assert data.x.shape == (6, 6) and data.task == "regression" and data.num_outputs == 1


def test_loss_decides_the_task_and_must_agree_with_a_declared_one(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 2)), y=np.array([0, 1, 1, 0, 1, 0]))
    config = dataset_config(tmp_path, path="d.npz")
    assert load_dataset(config, "binary_cross_entropy").y.shape == (6, 1)
    declared = dataset_config(tmp_path, path="d.npz", task="classification")
    with pytest.raises(InvalidArgument) as raised:
        load_dataset(declared, "mse")
    assert raised.value.field == "dataset.task"


def test_negative_class_labels_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.array([0, -1, 1, 0]))
    with pytest.raises(InvalidArgument) as raised:
        load_dataset(dataset_config(tmp_path, path="d.npz"))
    assert raised.value.field == "dataset.label" and ">= 0" in raised.value.message


def test_split_is_seeded_stratified_and_scaled_on_train_only():
    data = load_dataset(dataset_config(".", name="digits"))
    first = split_dataset(data, test_fraction=0.2, seed=3, standardize=True, standardize_target=True)
    again = split_dataset(data, test_fraction=0.2, seed=3, standardize=True, standardize_target=True)
    other = split_dataset(data, test_fraction=0.2, seed=4, standardize=True, standardize_target=True)
    assert len(first.x_test) == 360 and len(first.x_train) == 1437
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert not np.array_equal(first.x_test, other.x_test)
    # Stratified: every class keeps its share of the test set to within one sample.
    expected = np.bincount(data.y) * 0.2
    assert np.all(np.abs(np.bincount(first.y_test) - expected) <= 1)
    # Train features are centred exactly; test features only approximately (fitted on train).
    np.testing.assert_allclose(first.x_train.mean(axis=0), 0, atol=1e-5)
    assert np.abs(first.x_test.mean(axis=0)).max() > 1e-3
    assert np.isfinite(first.x_train).all()  # constant pixels did not divide by zero


def test_regression_targets_are_standardised_and_invertible():
    data = load_dataset(dataset_config(".", name="diabetes"))
    split = split_dataset(data, test_fraction=0.2, seed=0, standardize=True, standardize_target=True)
    assert abs(float(split.y_train.std()) - 1) < 1e-4
    scaler = split.target_scaler
    restored = scaler.inverse(split.y_test)
    assert restored.min() >= data.y.min() - 1e-3 and restored.max() <= data.y.max() + 1e-3


def test_standardizer_leaves_constant_columns_finite():
    scaler = Standardizer.fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_array_equal(scaler.transform(np.array([[2.0, 5.0]])), [[0.0, 0.0]])


def test_batch_order_covers_each_epoch_once_and_depends_only_on_seed_and_step():
    order = BatchOrder(num_samples=10, batch_size=4, seed=7)
    assert order.steps_per_epoch == 3
    for epoch in range(3):
        rows = np.concatenate([order.indices(step) for step in range(epoch * 3, epoch * 3 + 3)])
        assert sorted(rows.tolist()) == list(range(10))
    assert [len(order.indices(step)) for step in range(3)] == [4, 4, 2]
    assert not np.array_equal(order.permutation(0), order.permutation(1))
    # A fresh object (a resumed process) draws the very same batch for the same step.
    np.testing.assert_array_equal(BatchOrder(10, 4, 7).indices(5), order.indices(5))
    assert order.position(5) == {"step": 5, "epoch": 1, "batch_in_epoch": 2, "steps_per_epoch": 3,
                                 "batch_size": 4, "num_samples": 10, "seed": 7}


def test_overrides_replace_nested_keys_without_touching_the_original():
    raw = {"train": {"epochs": 3}, "optimizer": {"name": "sgd"}}
    merged = apply_overrides(raw, {"epochs": 9, "lr": 0.5, "batch_size": None, "checkpoint_dir": "ck"})
    assert merged == {"train": {"epochs": 9}, "optimizer": {"name": "sgd", "lr": 0.5}, "checkpoint": {"dir": "ck"}}
    assert raw == {"train": {"epochs": 3}, "optimizer": {"name": "sgd"}}


def test_yaml_style_exponent_strings_are_numbers():
    job = parse_job({"dataset": {"name": "digits"}, "model": {"mlp": {"hidden": [4]}},
                     "optimizer": {"name": "adam", "lr": "3e-4"}})
    assert job.optimizer["lr"] == pytest.approx(3e-4)
