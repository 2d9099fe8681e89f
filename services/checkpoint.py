"""Atomic checkpoints: named arrays plus a JSON-able meta dict in one npz file, never pickled.

One file holds both parts (arrays as `.npy` members, meta as `meta.json`), so a checkpoint is
replaced as a whole: it is written to a temporary file in the target directory, fsynced, renamed over
the target with `os.replace`, and the directory is fsynced so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Mapping

import numpy as np

from gradserve_services.errors import InvalidArgument, NotFound

__all__ = ["save_checkpoint", "load_checkpoint"]

META_MEMBER = "meta.json"
ARRAY_SUFFIX = ".npy"


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
    """Write `arrays` and `meta` to `path` atomically: readers see the old file or the new one."""
    path = os.fspath(path)
    meta_json = json.dumps(meta, sort_keys=True)  # fails early (TypeError) on non-JSON meta
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED,
                                 allowZip64=True) as archive:
                for name, value in arrays.items():
                    _check_name(name)
                    value = np.asarray(value)
                    if value.dtype.hasobject:
                        raise InvalidArgument("object arrays cannot be checkpointed", name)
                    with archive.open(name + ARRAY_SUFFIX, "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
                archive.writestr(META_MEMBER, meta_json)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read `(arrays, meta)` written by `save_checkpoint`; arrays are loaded without pickle."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NotFound(f"no checkpoint at {path}", "checkpoint")
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path, "r") as archive:
        meta = json.loads(archive.read(META_MEMBER))
        for member in archive.namelist():
            if member.endswith(ARRAY_SUFFIX):
                with archive.open(member) as handle:
                    arrays[member[: -len(ARRAY_SUFFIX)]] = np.lib.format.read_array(
                        handle, allow_pickle=False)
    return arrays, meta


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/") \
            or name + ARRAY_SUFFIX == META_MEMBER:
        raise InvalidArgument(f"bad array name {name!r}", "checkpoint.arrays")


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
