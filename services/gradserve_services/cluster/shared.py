"""Shared-memory blocks on the coordinator's machine: the fast lane between workers and parameter
servers that share it.

Through the object store a sync step copies every gradient into it and the new parameters out of
the server into it again: about 3 ms per 7.5 MB copy here, on the step's critical path. Processes on
one machine can instead share files in a tmpfs folder (the *area*, one per executor): a parameter
server keeps its parameters in a block there and updates them in place; a worker writes its
gradient sum into a block of its own; the other side maps the block and reads it where it lies.
Only small descriptors (`BlockRef`) travel through Ray.

This is safe only while nobody writes a block someone else is reading. The coordinator guarantees
that in sync mode alone: a worker reads parameters only between two applies, and writes a gradient
block again only after the server has applied the last one (the next step waits for that apply).
A process that cannot see the area (another machine) falls back to the object store.

`SharedMemoryLane` is a process's way into the area: put a batch, put gradients, allocate a server's
parameters, read a block by its reference. A process makes it once, when it starts (`joined`: the
area's marker holds its token where this process sees the same tmpfs); one without it uses the
object store only, and the coordinator, which knows from each worker's start which it is, sends
blocks only to workers that have one.
"""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from gradserve_services.owned_folder import OwnedFolder, remove_orphans

__all__ = ["BlockRef", "SharedArea", "SharedMemoryLane", "area_visible", "write_block", "allocate_block",
           "open_block", "write_at", "Attachments", "remove_block", "remove_prefixed", "huge_pages"]

ALIGNMENT = 64  # bytes; each array starts on a cache line
RESERVE_BYTES = 64 << 20  # left free in the tmpfs for everyone else
ROOT_CANDIDATES = ("/dev/shm",)
# A tmpfs tried before them, where an operator mounted one with huge pages (`mount -t tmpfs -o
# huge=within_size`): /dev/shm follows the kernel's shmem setting, often `never`, and filling 4 KiB
# pages costs about 3.5 times as much as 2 MiB ones here (0.2 s against 0.055 s per 400 MB pushed).
ROOT_ENV = "GRADSERVE_SHARED_ROOT"
MARKER = "area"
AREA_PREFIX = "gradserve-"


@dataclass(frozen=True)
class BlockRef:
    """Where a block lies and what it holds: `layout` is `(name, dtype, shape, offset)` per array.
    `area` names the folder's marker so a reader can tell whether it sees the same folder."""

    path: str
    area: str
    layout: tuple


class SharedArea:
    """A folder in tmpfs for one executor's blocks, removed with it (and, when this process was
    killed before it could remove it, by the next executor on this machine)."""

    def __init__(self, root: str):
        self.token = uuid.uuid4().hex
        # Its marker holds the token (readers compare it) and stays locked while this area lives.
        self._folder = OwnedFolder(os.path.join(root, f"{AREA_PREFIX}{os.getpid()}-{self.token[:12]}"),
                                   marker=MARKER, stamp=self.token)
        self.path = self._folder.path

    @classmethod
    def create(cls) -> "SharedArea | None":
        """An area in `GRADSERVE_SHARED_ROOT` where it is set and usable, else in the first usable
        tmpfs; None where there is none (no fast lane then)."""
        if not enabled():
            return None
        configured = os.environ.get(ROOT_ENV, "")
        for root in ((configured,) if configured else ()) + ROOT_CANDIDATES:
            if os.path.isdir(root) and os.access(root, os.W_OK):
                remove_orphans(root, AREA_PREFIX, marker=MARKER)  # areas of executors killed earlier
                try:
                    return cls(root)
                except OSError:
                    continue
        return None

    def remove(self) -> None:
        self._folder.remove()


def huge_pages(path: str) -> str:
    """The `huge=` option of the tmpfs holding `path` ("never" where it has none or is no tmpfs)."""
    path, best = os.path.realpath(path), ("", "never")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 4:
                    continue
                point = fields[1]
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                    options = dict(option.partition("=")[::2] for option in fields[3].split(","))
                    best = (point, options.get("huge", "never") if fields[2] == "tmpfs" else "never")
    except OSError:
        pass
    return best[1]


def remove_prefixed(folder: str, prefix: str) -> None:
    """Remove every block in `folder` whose name starts with `prefix` (a closed trainer's blocks,
    whoever wrote them: a worker killed since could not remove its own)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            remove_block(os.path.join(folder, name))


def enabled() -> bool:
    """`GRADSERVE_SHARED_MEMORY=off` turns the fast lane off in a process (everything then goes
    through the object store, as between machines)."""
    return os.environ.get("GRADSERVE_SHARED_MEMORY", "on").lower() not in ("off", "0", "false", "no")


def area_visible(folder: str, token: str) -> bool:
    """Whether this process sees the area `(folder, token)` (same machine, same tmpfs)."""
    if not enabled():
        return False
    try:
        with open(os.path.join(folder, MARKER)) as handle:
            return handle.read() == token
    except OSError:
        return False


def _layout(arrays: Mapping[str, tuple]) -> tuple[tuple, int]:
    layout, offset = [], 0
    for name, (dtype, shape) in arrays.items():
        dtype = np.dtype(dtype)
        layout.append((name, dtype.str, tuple(int(d) for d in shape), offset))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return tuple(layout), max(offset, ALIGNMENT)


def allocate_block(area_path: str, area_token: str, name: str,
                   arrays: Mapping[str, tuple]) -> tuple[BlockRef, dict[str, np.ndarray]]:
    """A new block for arrays `{name: (dtype, shape)}`: its ref and writable views into it.
    OSError where the tmpfs lacks room for it (touching pages of a file beyond that would kill the
    process with SIGBUS, so the caller falls back to the object store instead)."""
    layout, size = _layout(arrays)
    space = os.statvfs(area_path)
    if size + RESERVE_BYTES > space.f_bavail * space.f_frsize:
        raise OSError(errno.ENOSPC, f"{size} bytes do not fit in {area_path}")
    path = os.path.join(area_path, name)
    with open(path, "w+b") as handle:
        try:
            # Reserve the pages now: a sparse file would only fail when written, with SIGBUS.
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError:
            remove_block(path)
            raise
        buffer = mmap.mmap(handle.fileno(), size)
    ref = BlockRef(path, area_token, layout)
    return ref, _views(buffer, layout, writable=True)


def open_block(area_path: str, area_token: str, name: str,
               arrays: Mapping[str, tuple]) -> tuple[BlockRef, dict[str, np.ndarray], int]:
    """A new block like `allocate_block`'s whose pages are not reserved, to be filled with
    `write_at` on the returned descriptor (the caller closes it): the kernel allocates each page
    as it is written, none zeroed first and none faulted in, and a full tmpfs answers ENOSPC
    instead of SIGBUS. Its views may be read and written once every byte of theirs was written."""
    layout, size = _layout(arrays)
    space = os.statvfs(area_path)
    if size + RESERVE_BYTES > space.f_bavail * space.f_frsize:
        raise OSError(errno.ENOSPC, f"{size} bytes do not fit in {area_path}")
    path = os.path.join(area_path, name)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(descriptor, size)
        buffer = mmap.mmap(descriptor, size)
    except OSError:
        os.close(descriptor)
        remove_block(path)
        raise
    return BlockRef(path, area_token, layout), _views(buffer, layout, writable=True), descriptor


def write_at(descriptor: int, offset: int, data) -> None:
    """All of `data` into the file at `offset` (OSError, ENOSPC where the tmpfs is full)."""
    data = memoryview(data).cast("B")
    while data:
        written = os.pwrite(descriptor, data, offset)
        data, offset = data[written:], offset + written


def kept_block(area_path: str, area_token: str, name: str, wanted: Mapping[str, tuple],
               cache: dict) -> tuple[BlockRef, dict[str, np.ndarray]]:
    """The block kept in `cache` under `name` for arrays `{name: (dtype, shape)}` (its ref and
    writable views), reused while the layout holds. A new layout gets a new file (a new path):
    readers may still map the old one, which stays valid for them, and a path never changes what
    it holds."""
    held = cache.get(name)
    if held is None or held[0].layout != _layout(wanted)[0]:
        if held is not None:
            remove_block(cache.pop(name)[0])
        cache[name] = allocate_block(area_path, area_token, f"{name}-{uuid.uuid4().hex[:8]}", wanted)
    return cache[name]


def write_block(area_path: str, area_token: str, name: str,
                arrays: Mapping[str, np.ndarray], cache: dict) -> BlockRef:
    """Copy `arrays` into the block kept in `cache` under `name` (`kept_block`)."""
    ref, views = kept_block(area_path, area_token, name,
                            {key: (value.dtype, value.shape) for key, value in arrays.items()}, cache)
    for key, value in arrays.items():
        np.copyto(views[key], value, casting="no")
    return ref


def remove_block(ref_or_path) -> None:
    path = ref_or_path.path if isinstance(ref_or_path, BlockRef) else ref_or_path
    try:
        os.unlink(path)
    except OSError:
        pass


class Attachments:
    """Read-only maps of other processes' blocks, by path, the newest few kept."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._maps: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()

    def arrays(self, ref: BlockRef) -> dict[str, np.ndarray]:
        key = (ref.path, ref.layout)
        views = self._maps.get(key)
        if views is None:
            with open(ref.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                buffer = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)
            views = self._maps[key] = _views(buffer, ref.layout, writable=False)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        self._maps.move_to_end(key)
        return views

    def forget(self, prefix: str) -> None:
        for key in [key for key in self._maps if os.path.basename(key[0]).startswith(prefix)]:
            del self._maps[key]


def _views(buffer, layout, *, writable: bool) -> dict[str, np.ndarray]:
    views = {}
    for name, dtype, shape, offset in layout:
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(buffer, dtype=np.dtype(dtype), count=count, offset=offset).reshape(shape)
        if not writable:
            array.flags.writeable = False
        views[name] = array
    return views


class SharedMemoryLane:
    """One process's use of an area `(folder, token)`: the blocks it writes (reused while their
    layout holds, removed with `forget`) and its read-only maps of other processes' blocks."""

    def __init__(self, area: tuple[str, str]):
        self.area = area
        self._written: dict[str, tuple] = {}  # block name -> (BlockRef, writable views)
        self._mapped = Attachments()

    @classmethod
    def joined(cls, shared_area: tuple[str, str] | None) -> "SharedMemoryLane | None":
        """The lane of this process into `shared_area`, or None where it does not see it (another
        machine, or `GRADSERVE_SHARED_MEMORY=off`): asked once, when the process starts."""
        return cls(shared_area) if shared_area is not None and area_visible(*shared_area) else None

    def put(self, name: str, arrays: Mapping[str, np.ndarray]) -> BlockRef | None:
        """`arrays` copied into this process's block `name` (a batch, a gradient sum); None where
        the tmpfs has no room for it (the caller sends them through the object store)."""
        try:
            return write_block(self.area[0], self.area[1], name, arrays, self._written)
        except OSError:
            return None

    def kept(self, name: str, arrays: Mapping[str, tuple]) -> tuple[BlockRef, dict] | None:
        """This process's block `name` for `{name: (dtype, shape)}` (the one `put` writes), its
        ref and writable views, to be filled in place; None where the tmpfs has no room."""
        try:
            return kept_block(self.area[0], self.area[1], name, arrays, self._written)
        except OSError:
            return None

    def allocate(self, name: str, arrays: Mapping[str, tuple]) -> tuple[BlockRef, dict] | None:
        """A new block for `{name: (dtype, shape)}`, its ref and writable views; None without room."""
        try:
            return allocate_block(self.area[0], self.area[1], f"{name}-{uuid.uuid4().hex[:8]}", arrays)
        except OSError:
            return None

    def adopt(self, name: str, ref: BlockRef) -> tuple[BlockRef, dict] | None:
        """Another process's block `ref` (a gateway's received parameters) made this process's own
        block `name-...`: a second name for the same pages (a hard link, no copy), its ref and
        writable views. None unless it lies in this area and holds exactly the arrays of its
        layout (a shard's part of a bigger block is copied out instead)."""
        folder, token = self.area
        layout, size = _layout({entry[0]: (entry[1], entry[2]) for entry in ref.layout})
        if ref.area != token or os.path.dirname(ref.path) != folder or layout != ref.layout:
            return None
        path = os.path.join(folder, f"{name}-{uuid.uuid4().hex[:8]}")
        try:
            os.link(ref.path, path)
            with open(path, "r+b") as handle:
                if os.fstat(handle.fileno()).st_size != size:
                    raise OSError(errno.EINVAL, f"{ref.path} holds more than its layout")
                buffer = mmap.mmap(handle.fileno(), size)
        except OSError:
            remove_block(path)
            return None
        return BlockRef(path, token, layout), _views(buffer, layout, writable=True)

    def read(self, ref: BlockRef) -> dict[str, np.ndarray]:
        """Read-only views of another process's block (mapped once, the newest few kept)."""
        return self._mapped.arrays(ref)

    def forget(self, prefix: str) -> None:
        """Drop the maps of blocks named `prefix...` and remove this process's own."""
        self._mapped.forget(prefix)
        for name in [name for name in self._written if name.startswith(prefix)]:
            remove_block(self._written.pop(name)[0])

    def remove_all(self, prefix: str) -> None:
        """Remove every block named `prefix...` whoever wrote it (a closed trainer's)."""
        self.forget(prefix)
        remove_prefixed(self.area[0], prefix)
