"""A far site for `gradserve bench links`: each Ray worker node in a Linux network namespace of its
own, linked to this machine by a veth pair whose rate tc limits (a token bucket both ways), so all
a worker exchanges with the coordinator and the parameter servers (the head node, here) crosses a
slow link, and the link's own byte counters say how much did.

The namespaces, their addresses and the Ray nodes come from the test harness (tests/support/netns.py
and ray_cluster.py: namespaces the run makes and removes itself, owned by this process while it
lives, leftovers of killed runs removed by the next); the suite therefore runs from a source checkout,
as root. Delay is not modelled: this kernel has no netem, and a token bucket only limits the rate.
(A round trip could be stretched by holding packets in a queue of the bucket, but that ties delay
to load; the rate is what local rounds and compression change.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["FarSite", "far_site", "harness", "SiteUnavailable"]

REPO = Path(__file__).resolve().parents[3]
WORKER_OBJECT_STORE_BYTES = 300_000_000


class SiteUnavailable(RuntimeError):
    """No far site here (not a source checkout, or namespaces cannot be made); says why."""


def harness():
    """`(netns, ray_cluster)` modules of the test harness."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from tests.support import netns, ray_cluster
    except ImportError as missing:
        raise SiteUnavailable(f"the namespace harness (tests/support) is not here: {missing}") from None
    return netns, ray_cluster


@dataclass
class FarSite:
    address: str  # the Ray cluster's, for RayExecutor
    env: dict  # what a driver of the cluster needs (its token)
    rate_mbit: float
    interfaces: list[str] = field(default_factory=list)  # host ends of the veth pairs
    # Removes the site now (by pid; from any thread, once): far_site does on leaving, a stopped
    # run's last resort may sooner (stop_signals.py). None in a description sent elsewhere.
    remove: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def link_bytes(self) -> int:
        """Bytes that crossed the links so far, both directions, every namespace."""
        total = 0
        for interface in self.interfaces:
            for direction in ("tx", "rx"):
                with open(f"/sys/class/net/{interface}/statistics/{direction}_bytes") as counter:
                    total += int(counter.read())
        return total


@contextmanager
def far_site(workers: int, rate_mbit: float):
    """A Ray cluster whose head (no CPUs: the parameter servers and this process's coordinator) is
    here and whose `workers` one-CPU nodes sit each in a namespace behind a `rate_mbit` link."""
    netns, ray_cluster = harness()
    made = _Made()
    try:
        try:
            for _ in range(workers):
                made.spaces.append(netns.create(rate_mbit=rate_mbit))
        except netns.NamespacesUnavailable as reason:
            raise SiteUnavailable(f"cannot make network namespaces here: {reason}") from None
        spaces = made.spaces
        for space in spaces:  # the head listens on the first namespace's host end: route there
            subprocess.run([netns.IP_BIN, "-n", space.name, "route", "add", "default", "via",
                            space.host_address], check=True, capture_output=True, timeout=30)
        cluster = made.cluster = ray_cluster.start_cluster(num_cpus=0, node_ip_address=spaces[0].host_address)
        for space in spaces:
            cluster.add_node(num_cpus=1, namespace=space, object_store_bytes=WORKER_OBJECT_STORE_BYTES)
        saved = {key: os.environ.get(key) for key in cluster.env}
        os.environ.update(cluster.env)
        try:
            yield FarSite(cluster.address, dict(cluster.env), rate_mbit,
                          [space.host_interface for space in spaces], remove=made.remove)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        made.remove()


class _Made:
    """What far_site has made so far. `remove()` removes it once, whichever thread calls first (the
    run's own way out, or a stopped run's last resort); a second caller waits for the first."""

    def __init__(self):
        self.spaces: list = []
        self.cluster = None
        self._lock = threading.Lock()
        self._removed = False

    def remove(self) -> None:
        with self._lock:
            if self._removed:
                return
            self._removed = True
            try:
                if self.cluster is not None:
                    self.cluster.stop()
            finally:
                for space in self.spaces:
                    space.remove()
