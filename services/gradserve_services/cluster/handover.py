"""Parameters handed over to a parameter server: it keeps them as its parameters instead of
copying them.

A parameter table normally copies what it is given, because the caller may still read or write
its arrays. The gateway's received parameters (CreateSession) and a checkpoint's loaded arrays
(RestoreCheckpoint) are fresh buffers nobody else holds; copying 400 MB of them again costs a
second pass into freshly faulted pages, slower than the network here. Two ways, by where the
server runs:

- In this process: `hand_over` marks such arrays; a table created here `take`s a marked array as
  its own (each array once: a second table, or a retry, copies it).
- In another process on this machine (a Ray actor that maps the executor's shared-memory area,
  shared.py): the gateway decodes the pushed tensors straight into a block of the area (`Landing`:
  one block per request, removed when the request is done). `received` tells the coordinator that
  a shard's arrays lie in such a block, and it sends the server `Received` (the block's path and
  layout, a few bytes) instead of the arrays; a table in shared memory adopts a block that holds
  exactly its parameters as its parameter block (a second name for the same pages), any other
  server copies out of it. Each block is given once, like a marked array.

Arrays crossing to another machine are serialized anyway, so neither mark leaves this machine.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from gradserve_services.errors import ResourceExhausted

from .shared import BlockRef, allocate_block, open_block, remove_block, write_at

__all__ = ["hand_over", "take", "Landing", "Received", "received"]

_lock = threading.RLock()  # a weakref callback may run while it is held (a collection)
_handed: dict[int, weakref.ref] = {}  # id(array) -> the array, while it lives
# id(view) -> (the view, while it lives; its block; its layout entry), while nobody was given it
_landed: dict[int, tuple[weakref.ref, BlockRef, tuple]] = {}


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


def _forget_landed(key: int) -> None:
    with _lock:
        mark = _landed.get(key)
        if mark is not None and mark[0]() is None:
            del _landed[key]


@dataclass(frozen=True)
class Received:
    """Arrays that lie in a received block, as a parameter server is given them: `block`'s layout
    names them as the table does, `prefix` + name in the mapping (a state's `param/`); `others`
    are the rest of the mapping (a state's optimizer arrays and table rows), sent as they are."""

    block: BlockRef
    others: Mapping = field(default_factory=dict)
    prefix: str = ""

    def arrays(self, views: Mapping[str, np.ndarray]) -> dict:
        """The whole mapping, with `views` of the block (by layout name) in its place."""
        return {**self.others, **{self.prefix + name: view for name, view in views.items()}}


class Landing:
    """Where one request's tensors are decoded: a block of the executor's shared-memory area
    `(folder, token)`, or nowhere (None: no area, or no room; `allocate` then places nothing and
    the decoder allocates its own buffers). The block is removed when the landing closes: a server
    that adopted it holds the pages under a name of its own by then."""

    def __init__(self, area: tuple[str, str] | None):
        self._area = area
        self._blocks: list[BlockRef] = []
        self._descriptors: list[int] = []

    def allocate(self, arrays: Mapping[str, tuple]) -> dict[str, np.ndarray]:
        """Writable views for arrays `{name: (dtype, shape)}`, all in one new block (its pages
        reserved), marked as landed there; `{}` without an area or room."""
        if self._area is None or not arrays:
            return {}
        try:
            block, views = allocate_block(*self._area, f"received-{uuid.uuid4().hex}", arrays)
        except OSError:
            return {}
        return self._landed(block, views)

    def receive(self, arrays: Mapping[str, tuple]) -> dict[str, tuple]:
        """`{name: (view, write)}` for arrays `{name: (dtype, shape)}` in one new block, marked as
        landed there, to be filled by `write(offset, bytes)`: the kernel allocates each page as
        it is written (no page zeroed first nor faulted in, faster than copying into the views);
        `{}` without an area or room. A write that finds the tmpfs full is ResourceExhausted."""
        if self._area is None or not arrays:
            return {}
        try:
            block, views, descriptor = open_block(*self._area, f"received-{uuid.uuid4().hex}", arrays)
        except OSError:
            return {}
        self._descriptors.append(descriptor)
        self._landed(block, views)

        def writer(name: str, start: int):
            def write(offset: int, data) -> None:
                try:
                    write_at(descriptor, start + offset, data)
                except OSError as error:
                    raise ResourceExhausted(f"no room in shared memory for the parameters ({error.strerror})",
                                            name) from None
            return write

        return {entry[0]: (views[entry[0]], writer(entry[0], entry[3])) for entry in block.layout}

    def _landed(self, block: BlockRef, views: dict) -> dict:
        self._blocks.append(block)
        entries = {entry[0]: entry for entry in block.layout}
        with _lock:
            for name, view in views.items():
                key = id(view)
                _landed[key] = (weakref.ref(view, lambda _, key=key: _forget_landed(key)), block, entries[name])
        return views

    def close(self) -> None:
        for descriptor in self._descriptors:
            os.close(descriptor)
        for block in self._blocks:
            remove_block(block)
        self._blocks.clear()
        self._descriptors.clear()

    def __enter__(self) -> "Landing":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def received(arrays: Mapping[str, object], names=None, prefix: str = "") -> Received | None:
    """`arrays` as `Received` where the ones named `names` (default all; each `prefix` + the name
    the table knows it by) are views that landed in one block, the rest going as `others`; None
    otherwise. The views are unmarked: given once."""
    names = list(arrays) if names is None else list(names)
    if not names:
        return None
    with _lock:
        marks = [_landed.get(id(arrays[name])) for name in names]
        if any(mark is None or mark[0]() is not arrays[name] for name, mark in zip(names, marks)) \
                or len({mark[1] for mark in marks}) != 1:
            return None
        for name in names:
            del _landed[id(arrays[name])]
    block = marks[0][1]
    layout = tuple((name[len(prefix):], *mark[2][1:]) for name, mark in zip(names, marks))
    others = {key: value for key, value in arrays.items() if key not in set(names)}
    return Received(BlockRef(block.path, block.area, layout), others, prefix)
