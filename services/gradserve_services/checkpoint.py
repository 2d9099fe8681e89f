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


def load_checkpoint(path: str | os.PathLike, allocate=None) -> tuple[dict[str, np.ndarray], dict]:
    """Read `(arrays, meta)` written by `save_checkpoint`; arrays are loaded without pickle.
    `allocate`, given `{name: (dtype, shape)}` of the arrays (from their headers), returns writable
    buffers for those it places: they are read straight into them (the reader's own memory)."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path, "r")
    except FileNotFoundError:
        # The message reaches clients: the checkpoint's name only, never where the server keeps it.
        raise NotFound(f"no checkpoint {os.path.basename(path)!r}", "checkpoint") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
        meta = json.loads(archive.read(META_MEMBER))
        members = [member for member in archive.namelist() if member.endswith(ARRAY_SUFFIX)]
        placed = allocate(_plain_headers(archive, members)) if allocate is not None else {}
        for member in members:
            name = member[: -len(ARRAY_SUFFIX)]
            with archive.open(member) as handle:
                if name in placed:
                    _read_into(handle, placed[name], name)
                    arrays[name] = placed[name]
                else:
                    arrays[name] = np.lib.format.read_array(handle, allow_pickle=False)
    return arrays, meta


def _header(handle) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(handle)


def _plain_headers(archive, members) -> dict:
    """`{name: (dtype, shape)}` of the members a buffer can take as they are (C order, no objects)."""
    specs = {}
    for member in members:
        with archive.open(member) as handle:
            shape, fortran_order, dtype = _header(handle)
        if not fortran_order and not dtype.hasobject:
            specs[member[: -len(ARRAY_SUFFIX)]] = (dtype, shape)
    return specs


def _read_into(handle, buffer: np.ndarray, name: str) -> None:
    _header(handle)
    raw, filled = memoryview(buffer.reshape(-1).view(np.uint8)), 0
    while filled < len(raw):
        count = handle.readinto(raw[filled:])
        if not count:
            raise ValueError(f"array {name!r} ends after {filled} of {len(raw)} bytes")
        filled += count


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
