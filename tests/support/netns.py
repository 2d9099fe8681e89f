"""Linux network namespaces that stand for other machines: a process tree with a network stack of
its own, reached from this one over a veth pair with private addresses, whose rate tc can limit
and whose link can be cut and restored.

    with network_namespace(rate_mbit=100) as far:
        subprocess.Popen(far.command(["ray", "start", "--address", ...]))
        far.cut()       # every packet either way is dropped, silently
        far.restore()   # the link as it was (shaped again if it was)

A namespace is `PREFIX` + random hex; the host end of its veth is that name + "h", the inside end
+ "n", addressed `host_address` / `address` in a /30 no route or address of this machine overlaps.
Its creator owns a folder under `OWNERS_ROOT` (a locked marker, see owned_folder.py) for as long as
it lives, made before the namespace: a namespace with no live owner is a leftover of a killed run
and the next `create` removes it, never one a live test is using. `remove()` kills what runs
inside (by pid), deletes the namespace and its veth, bounded in time.

Cutting replaces the root qdisc of both ends with a FIFO of length 0, which drops every packet
while the interfaces stay up: a partition as TCP meets it (no reset, no unreachable error, only
silence and retransmits), rather than `ip link set down`, which fails sends at once. Shaping is a
token bucket (tbf) on both ends. This kernel has no netem, so no delay is modelled here.

Where namespaces cannot be made (not root, no `ip`/`tc`, no CAP_SYS_ADMIN), `create` raises
`NamespacesUnavailable` with the reason, for tests to skip with.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

from gradserve_services.owned_folder import OwnedFolder, remove_orphans

__all__ = ["Namespace", "NamespacesUnavailable", "create", "network_namespace", "remove_leftovers",
           "namespace_names", "namespace_pids", "PREFIX"]

PREFIX = "gsns"
OWNERS_ROOT = "/run/gradserve-netns"
MARKER = "owner"
NETNS_ROOT = "/run/netns"  # where `ip netns` keeps the names
# Private /30 networks are drawn from here (10.200.0.0 - 10.207.255.255).
ADDRESS_POOL = ipaddress.ip_network("10.200.0.0/13")
COMMAND_TIMEOUT_S = 30.0
REMOVE_TIMEOUT_S = 30.0
SHM_BYTES = 2 << 30  # the private /dev/shm's cap; tmpfs pages are only taken when written
IP_BIN = shutil.which("ip") or "/usr/sbin/ip"
TC_BIN = shutil.which("tc") or "/usr/sbin/tc"


class NamespacesUnavailable(RuntimeError):
    """This machine (or this user) cannot make network namespaces; the message says why."""


@dataclass
class Namespace:
    name: str
    host_interface: str
    interface: str  # inside the namespace
    host_address: str  # this machine's end of the link
    address: str  # the namespace's end
    rate_mbit: float | None
    _owner: OwnedFolder

    def command(self, argv: list[str], *, private_shm: bool = True) -> list[str]:
        """`argv` run inside the namespace. With `private_shm` it gets a /dev/shm of its own (a
        fresh tmpfs), as another machine would: processes inside cannot share memory with this
        one's, so everything they exchange with it crosses the link. (`ip netns exec` runs the
        command in a mount namespace of its own; the tmpfs stays there.)"""
        inside = [IP_BIN, "netns", "exec", self.name]
        if not private_shm:
            return [*inside, *argv]
        script = f'mount -t tmpfs -o size={SHM_BYTES},mode=1777 tmpfs /dev/shm && exec "$@"'
        return [*inside, "sh", "-c", script, "sh", *argv]

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def shape(self, rate_mbit: float | None) -> None:
        """Limit both directions to `rate_mbit` (None: unlimited); kept across cut and restore."""
        self.rate_mbit = rate_mbit
        self._set_root_qdiscs(_shaping(rate_mbit))

    def cut(self) -> None:
        """Drop every packet either way from now on, until `restore()`."""
        self._set_root_qdiscs(["pfifo", "limit", "0"])

    def restore(self) -> None:
        """The link as it was before `cut()`: open, shaped at `rate_mbit` if it was."""
        self._set_root_qdiscs(_shaping(self.rate_mbit))

    def is_cut(self) -> bool:
        shown = _run([TC_BIN, "qdisc", "show", "dev", self.host_interface]).stdout
        return "pfifo" in shown and "limit 0p" in shown

    def remove(self) -> None:
        """Kill every process inside, delete the namespace and its veth, release the name."""
        try:
            _destroy(self.name)
        finally:
            self._owner.remove()

    def _set_root_qdiscs(self, qdisc: list[str] | None) -> None:
        for netns in (None, self.name):
            device = self.host_interface if netns is None else self.interface
            prefix = [TC_BIN] if netns is None else [TC_BIN, "-n", netns]
            if qdisc is None:  # back to the device's default
                shown = _run([*prefix, "qdisc", "show", "dev", device]).stdout
                if " root " in shown and "noqueue" not in shown:
                    _run([*prefix, "qdisc", "del", "dev", device, "root"], check=True)
            else:
                _run([*prefix, "qdisc", "replace", "dev", device, "root", *qdisc], check=True)


def create(rate_mbit: float | None = None) -> Namespace:
    """A new namespace linked to this machine (shaped to `rate_mbit` both ways if given), after
    removing leftovers of killed runs. NamespacesUnavailable if namespaces cannot be made here."""
    _check_possible()
    os.makedirs(OWNERS_ROOT, mode=0o700, exist_ok=True)
    # One creator at a time on this machine: the /30 chosen stays free until its address is set.
    with open(os.path.join(OWNERS_ROOT, ".create.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_leftovers()
        name = f"{PREFIX}{secrets.token_hex(4)}"
        owner = OwnedFolder(os.path.join(OWNERS_ROOT, name), marker=MARKER)
        try:
            namespace = _make(name, owner)
        except BaseException:
            try:
                _destroy(name)
            finally:
                owner.remove()
            raise
    try:
        if rate_mbit is not None:
            namespace.shape(rate_mbit)
    except BaseException:
        namespace.remove()
        raise
    return namespace


@contextmanager
def network_namespace(rate_mbit: float | None = None):
    """A namespace for one test (removed after it), or the test skipped with the reason namespaces
    cannot be made here."""
    import pytest

    try:
        namespace = create(rate_mbit)
    except NamespacesUnavailable as reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    try:
        yield namespace
    finally:
        namespace.remove()


def namespace_names() -> list[str]:
    """Names of this harness's namespaces on this machine, live or left over."""
    try:
        return sorted(name for name in os.listdir(NETNS_ROOT) if name.startswith(PREFIX))
    except OSError:
        return []


def remove_leftovers() -> list[str]:
    """Remove the namespaces (and host veth ends) of this harness whose owner is gone; return
    their names. Those of live owners are left alone."""
    remove_orphans(OWNERS_ROOT, PREFIX, marker=MARKER)
    owned = {entry for entry in _listdir(OWNERS_ROOT) if entry.startswith(PREFIX)}
    removed = [name for name in namespace_names() if name not in owned]
    for name in removed:
        _destroy(name)
    for interface in _listdir("/sys/class/net"):
        if interface.startswith(PREFIX) and interface[:-1] not in owned:
            _run([IP_BIN, "link", "del", interface])
    return removed


# ----- making and destroying -------------------------------------------------------------------

def _check_possible() -> None:
    if os.geteuid() != 0:
        raise NamespacesUnavailable("network namespaces need root (ip netns add, veth, tc)")
    for tool in (IP_BIN, TC_BIN):
        if not os.access(tool, os.X_OK):
            raise NamespacesUnavailable(f"{tool} is not installed (iproute2)")


def _make(name: str, owner: OwnedFolder) -> Namespace:
    made = _run([IP_BIN, "netns", "add", name])
    if made.returncode != 0:
        raise NamespacesUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
    host_interface, interface = f"{name}h", f"{name}n"
    network = _free_network()
    host_address, address = (str(host) for host in network.hosts())
    for argv in (
        [IP_BIN, "link", "add", host_interface, "type", "veth", "peer", "name", interface, "netns", name],
        [IP_BIN, "addr", "add", f"{host_address}/{network.prefixlen}", "dev", host_interface],
        [IP_BIN, "link", "set", host_interface, "up"],
        [IP_BIN, "-n", name, "addr", "add", f"{address}/{network.prefixlen}", "dev", interface],
        [IP_BIN, "-n", name, "link", "set", interface, "up"],
        [IP_BIN, "-n", name, "link", "set", "lo", "up"],  # processes inside talk to themselves too
    ):
        done = _run(argv)
        if done.returncode != 0:
            raise NamespacesUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return Namespace(name, host_interface, interface, host_address, address, None, owner)


def _free_network() -> ipaddress.IPv4Network:
    """A random /30 of ADDRESS_POOL overlapping no address or route of this machine (the other
    namespaces' host ends included)."""
    taken = []
    for line in _run([IP_BIN, "-4", "-o", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            taken.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _run([IP_BIN, "-4", "route", "show", "table", "all"]).stdout.splitlines():
        destination = line.split()[0] if line.split() else ""
        if destination in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            destination = line.split()[1] if len(line.split()) > 1 else ""
        try:
            taken.append(ipaddress.ip_network(destination, strict=False))
        except ValueError:
            continue
    subnets = ADDRESS_POOL.num_addresses // 4
    for _ in range(1000):
        candidate = ipaddress.ip_network(
            (int(ADDRESS_POOL.network_address) + 4 * secrets.randbelow(subnets), 30))
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise NamespacesUnavailable(f"no free /30 in {ADDRESS_POOL}")


def _destroy(name: str) -> None:
    """Kill the processes inside `name` by pid, then delete it; bounded by REMOVE_TIMEOUT_S."""
    deadline = time.monotonic() + REMOVE_TIMEOUT_S
    while True:
        inside = namespace_pids(name)
        if not inside:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {inside} in namespace {name} outlived SIGKILL")
        for pid in inside:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    if os.path.exists(os.path.join(NETNS_ROOT, name)):
        _run([IP_BIN, "netns", "del", name], check=True)
    # The veth pair goes with the namespace, which the kernel frees a little later.
    host_interface = f"/sys/class/net/{name}h"
    while os.path.exists(host_interface) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(host_interface):
        _run([IP_BIN, "link", "del", f"{name}h"])


def namespace_pids(name: str) -> list[int]:
    """The processes inside namespace `name` (none if there is no such namespace)."""
    if not os.path.exists(os.path.join(NETNS_ROOT, name)):
        return []
    listed = _run([IP_BIN, "netns", "pids", name]).stdout.split()
    return [int(pid) for pid in listed if pid.isdigit() and int(pid) != os.getpid()]


def _shaping(rate_mbit: float | None) -> list[str] | None:
    if rate_mbit is None:
        return None
    if rate_mbit <= 0:
        raise ValueError(f"rate_mbit must be > 0, got {rate_mbit!r}")
    rate_bytes = rate_mbit * 1e6 / 8
    # The bucket holds 10 ms at the rate (at least a few full frames, or tbf stalls); packets wait
    # up to 100 ms for tokens before they are dropped, as a router's queue would.
    burst = max(int(rate_bytes / 100), 4 * 1514)
    return ["tbf", "rate", f"{int(rate_mbit * 1000)}kbit", "burst", str(burst), "latency", "100ms"]


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _run(argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return done

