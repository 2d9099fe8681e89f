"""This machine's processes, read from Linux's /proc: what the load benchmark and the tests that
find, watch and kill real processes need. A process that exits while being read is simply absent."""

from __future__ import annotations

import collections
import os

__all__ = ["pids", "cmdline", "stat_fields", "parent_pid", "session_id", "descendants", "rss_bytes", "minor_faults"]


def pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def cmdline(pid: int) -> str:
    """The command line (as set by the process: Ray titles actors `ray::Class.method`), or ""."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the parenthesised command (so the command's own spaces
    and parentheses cannot shift them): state is [0], parent [1], process group [2], session [3]."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_pid(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def session_id(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[3]) if fields else None


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, their children, ...)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid in pids():
        parent = parent_pid(pid)
        if parent is not None:
            children[parent].append(pid)
    found, frontier = [], list(children[root])
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier.extend(children[pid])
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size, or 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def minor_faults(pid: int) -> int:
    """Page faults served without I/O so far (a freshly touched page each, a copy's cost), or 0
    for a process that is gone."""
    fields = stat_fields(pid)
    return int(fields[7]) if fields else 0
