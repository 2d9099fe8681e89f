"""A real, separate Ray cluster for tests: `ray start --head` (plus extra `ray start --address`
nodes), each in its own process group so it can be stopped by pid, bounded in time.

Ray advertises this machine's interface address even when asked for 127.0.0.1, so callers connect
with the address `ray start` prints (`RayCluster.address`), never a guessed one.

A node may stand for another machine: `add_node(namespace=...)` starts it inside a network
namespace (netns.py) with that namespace's address; the head must then be bound to the address
the namespace reaches this machine by (`start_cluster(node_ip_address=namespace.host_address)`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gradserve_services import procfs

__all__ = ["RayCluster", "RayNode", "start_cluster", "running_cluster", "free_port"]

RAY_BIN = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120
STOP_GRACE_S = 5.0
ADDRESS_PATTERN = re.compile(r"ray start --address='([^']+)'")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RayNode:
    """One `ray start` invocation: its processes share the process group `pgid`."""

    pgid: int
    log_path: Path

    def kill(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole group, then SIGKILL what is left (gcs_server and raylet may ignore
        SIGTERM for a while). Safe to call twice."""
        for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(self.pgid, signum)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _group_alive(self.pgid):
                    return
                time.sleep(0.1)


@dataclass
class RayCluster:
    """`env` holds what a process needs to join or drive this cluster (its auth token): pass it to
    every subprocess (`gradserve serve --ray-address`, extra nodes)."""

    address: str
    temp_dir: Path
    env: dict[str, str]
    nodes: list[RayNode] = field(default_factory=list)

    def add_node(self, num_cpus: int = 1, *, namespace=None, node_ip_address: str | None = None,
                 object_store_bytes: int | None = None) -> RayNode:
        """Another `ray start --address`; inside `namespace` (a netns.Namespace) it advertises the
        namespace's address and has a /dev/shm of its own, as another machine would."""
        args = ["--address", self.address]
        if namespace is not None:
            node_ip_address = namespace.address
        if node_ip_address is not None:
            args += ["--node-ip-address", node_ip_address]
        if object_store_bytes is not None:
            args += ["--object-store-memory", str(object_store_bytes)]
        wrap = namespace.command if namespace is not None else None
        node = _ray_start(args, num_cpus, self.temp_dir, self.env, f"node{len(self.nodes)}", wrap)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(num_cpus: int = 2, object_store_bytes: int = 300_000_000, *,
                  node_ip_address: str = "127.0.0.1", env: dict[str, str] | None = None) -> RayCluster:
    """`env`: more settings for every node and driver of the cluster (e.g. RAY_health_check_*)."""
    # Ray's unix socket paths must stay short: keep the temp dir directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="gsray", dir="/tmp"))
    head_args = [
        "--head", "--node-ip-address", node_ip_address, "--port", str(free_port()),
        "--include-dashboard=false", "--object-store-memory", str(object_store_bytes),
        "--temp-dir", str(temp_dir),
    ]
    # Ray's token authentication, with a token of our own that every node and driver is given.
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           **(env or {})}
    head = _ray_start(head_args, num_cpus, temp_dir, env, "head")
    cluster = RayCluster(address="", temp_dir=temp_dir, env=env, nodes=[head])
    match = ADDRESS_PATTERN.search(head.log_path.read_text())
    if not match:
        cluster.stop()
        raise RuntimeError(f"`ray start --head` printed no address:\n{head.log_path.read_text()[-3000:]}")
    cluster.address = match.group(1)
    return cluster


@contextmanager
def running_cluster(num_cpus: int = 2, extra_nodes: int = 0):
    cluster = start_cluster(num_cpus)
    try:
        for _ in range(extra_nodes):
            cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


def _ray_start(args: list[str], num_cpus: int, temp_dir: Path, env: dict[str, str], name: str,
               wrap=None) -> RayNode:
    """`wrap(argv)`: the command that runs argv elsewhere (inside a network namespace); it must
    exec argv in place, so the group led by the starter stays the node's."""
    log_path = temp_dir / f"ray-start-{name}.log"
    argv = [RAY_BIN, "start", *args, "--num-cpus", str(num_cpus), "--disable-usage-stats"]
    with open(log_path, "wb") as log:
        starter = subprocess.Popen(
            wrap(argv) if wrap is not None else argv,
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True,
        )
    node = RayNode(pgid=starter.pid, log_path=log_path)
    try:
        code = starter.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        node.kill()
        raise RuntimeError(f"`ray start {name}` did not finish in {START_TIMEOUT_S} s")
    except BaseException:  # interrupted (a stop signal raised here): the caller never gets the node
        node.kill()
        raise
    if code != 0:
        node.kill()
        raise RuntimeError(f"`ray start {name}` exited {code}:\n{log_path.read_text()[-3000:]}")
    return node


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in the group."""
    for pid in procfs.pids():
        fields = procfs.stat_fields(pid)
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
