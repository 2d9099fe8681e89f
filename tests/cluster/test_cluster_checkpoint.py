"""Checkpoints round-trip arrays and meta, replace atomically, and never unpickle."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

from gradserve_services.checkpoint import load_checkpoint, save_checkpoint
from gradserve_services.errors import InvalidArgument, NotFound


def test_round_trip_keeps_dtype_shape_and_meta(tmp_path):
    arrays = {
        "param/fc1.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "optim/fc1.weight/exp_avg": np.full((3, 4), 0.5),
        "scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 5), dtype=np.float16),
    }
    meta = {"version": 3, "steps": {"a": {"loss": 0.25}}, "name": "adam"}
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, arrays, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)


def test_replace_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"a": np.ones(3)}, {"version": 1})
    save_checkpoint(path, {"a": np.zeros(3)}, {"version": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    arrays, meta = load_checkpoint(path)
    assert meta["version"] == 2 and not arrays["a"].any()


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"a": np.ones(3)}, {"version": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"a": np.zeros(3)}, {"version": object()})
    with pytest.raises(InvalidArgument):
        save_checkpoint(path, {"a": np.array([object()], dtype=object)}, {"version": 2})
    arrays, meta = load_checkpoint(path)
    assert meta == {"version": 1} and arrays["a"].all()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]


def test_pickled_member_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", buffer.getvalue())
        archive.writestr("meta.json", "{}")
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(path)


def test_missing_checkpoint_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        load_checkpoint(tmp_path / "nothing.npz")
