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
from contextlib import contextmanager
from typing import BinaryIO, Iterator, Mapping

import numpy as np

from gradserve_services.errors import InvalidArgument, NotFound

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_file"]

META_MEMBER = "meta.json"
ARRAY_SUFFIX = ".npy"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at `path` only once the block succeeds: written to a temporary
    file in the same directory, fsynced, renamed over `path`, then the directory fsynced so the rename
    survives a crash too. On failure the temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
    """Write `arrays` and `meta` to `path` atomically: readers see the old file or the new one."""
    path = os.fspath(path)
    meta_json = json.dumps(meta, sort_keys=True)  # fails early (TypeError) on non-JSON meta
    with atomic_file(path) as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                _check_name(name)
                value = np.asarray(value)
                if value.dtype.hasobject:
                    raise InvalidArgument("object arrays cannot be checkpointed", name)
                with archive.open(name + ARRAY_SUFFIX, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)
            archive.writestr(META_MEMBER, meta_json)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read `(arrays, meta)` written by `save_checkpoint`; arrays are loaded without pickle."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path, "r")
    except FileNotFoundError:
        # The message reaches clients: the checkpoint's name only, never where the server keeps it.
        raise NotFound(f"no checkpoint {os.path.basename(path)!r}", "checkpoint") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
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
