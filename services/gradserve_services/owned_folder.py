"""Folders that tell whether their owner still lives, so that what a killed process left behind can
be told apart from what a live one is using, and removed.

The owner keeps a marker file in the folder open and locked (`flock`) for as long as it lives; the
kernel drops the lock when the process ends, however it ends (SIGKILL included). A lock anyone can
take therefore means the owner is gone. A pid in the name would not say so: pids are reused, and
mean nothing across containers that share one tmpfs.
"""

from __future__ import annotations

import fcntl
import os
import shutil

__all__ = ["OwnedFolder", "remove_orphans"]


class OwnedFolder:
    """A new folder at `path` (mode 0700), owned by this process until `remove()` or its end.
    `stamp` is written into the marker for readers that want to recognise the folder."""

    def __init__(self, path: str, *, marker: str, stamp: str = ""):
        os.makedirs(path, mode=0o700)
        # Locked before it gets its name: a sweeper that finds the marker always finds it locked
        # while the owner lives (between creating and locking it, its lock would look free).
        staging = os.path.join(path, f".{marker}.new")
        handle = open(staging, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.write(stamp)
            handle.flush()
            os.rename(staging, os.path.join(path, marker))
        except BaseException:
            handle.close()
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.path = path
        self._marker = handle

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._marker.close()


def remove_orphans(root: str, prefix: str, *, marker: str) -> list[str]:
    """Remove the folders in `root` named `prefix...` whose owner is gone (their marker's lock is
    free); return their paths. Folders of live owners, folders without a marker (being created, or
    not made by `OwnedFolder`) and folders this process may not open are left alone."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        folder = os.path.join(root, entry)
        if os.path.islink(folder):
            continue
        try:
            with open(os.path.join(folder, marker)) as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)  # lock held: no one takes the folder meanwhile
        except OSError:  # locked (alive), unreadable (not ours) or no marker yet (being created)
            continue
        removed.append(folder)
    return removed
