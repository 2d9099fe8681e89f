"""Arrays handed over to a parameter server in this process: it keeps them as its parameters
instead of copying them.

A parameter table normally copies what it is given, because the caller may still read or write
its arrays. The gateway's received parameters (CreateSession) and a checkpoint's loaded arrays
(RestoreCheckpoint) are fresh buffers nobody else holds; copying 400 MB of them again costs a
second pass into freshly faulted pages, slower than the network here. `hand_over` marks such
arrays; a table created in the same process `take`s a marked array as its own (each array once:
a second table, or a retry, copies it). Arrays crossing to another process are serialized
anyway, so the mark never leaves this process.
"""

from __future__ import annotations

import threading
import weakref
from typing import Mapping

import numpy as np

__all__ = ["hand_over", "take"]

_lock = threading.RLock()  # a weakref callback may run while it is held (a collection)
_handed: dict[int, weakref.ref] = {}  # id(array) -> the array, while it lives


def hand_over(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Mark `arrays` (returned as they are) for a table to keep; the caller gives them up."""
    with _lock:
        for array in arrays.values():
            if isinstance(array, np.ndarray):
                key = id(array)
                _handed[key] = weakref.ref(array, lambda _, key=key: _forget(key))
    return arrays


def take(array) -> bool:
    """Whether `array` was handed over and fits a table as it is (C-contiguous, aligned,
    writable); it is unmarked either way."""
    with _lock:
        marked = _handed.pop(id(array), None)
    if marked is None or marked() is not array:
        return False
    flags = array.flags
    return bool(flags.c_contiguous and flags.aligned and flags.writeable)


def _forget(key: int) -> None:
    with _lock:
        ref = _handed.get(key)
        if ref is not None and ref() is None:
            del _handed[key]
