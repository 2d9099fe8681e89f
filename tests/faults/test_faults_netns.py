"""The network-namespace harness (tests/support/netns.py) that partition and slow-link tests stand
on: a link that carries data, a cut that drops it silently and a restore that lets the same TCP
connection go on, shaping that survives both, a /dev/shm of its own, and removal of what killed
runs left behind without touching a live run's namespace."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.support import netns
from tests.support.serve_process import REPO

pytestmark = [pytest.mark.integration]

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    listener = socket.create_server((sys.argv[1], 0))
    print(listener.getsockname()[1], flush=True)
    connection, _ = listener.accept()
    while data := connection.recv(65536):
        connection.sendall(data)
""")
# Creates a namespace with a process inside, prints its name, then waits to be killed.
OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from tests.support import netns
    namespace = netns.create()
    subprocess.Popen(namespace.command(["sleep", "600"], private_shm=False))
    print(namespace.name, flush=True)
    time.sleep(600)
""")
SILENCE_S = 2.0  # a cut link answers nothing for at least this long
DELIVERY_TIMEOUT_S = 60.0  # TCP retransmits what the cut dropped within this, once restored


@pytest.fixture
def far():
    with netns.network_namespace() as namespace:
        yield namespace
    assert namespace.name not in netns.namespace_names()
    assert not os.path.exists(f"/sys/class/net/{namespace.host_interface}")


@pytest.fixture
def echo(far):
    """A TCP connection to an echo server inside the namespace."""
    server = subprocess.Popen(far.command([sys.executable, "-c", ECHO_SERVER, far.address]),
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        with socket.create_connection((far.address, port), timeout=DELIVERY_TIMEOUT_S) as connection:
            yield connection
    finally:
        server.kill()
        server.wait(timeout=30)


def qdisc(far) -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", far.host_interface], capture_output=True,
                          text=True, timeout=30, check=True).stdout


def test_cut_drops_silently_and_restore_resumes_the_same_connection(far, echo):
    echo.sendall(b"before")
    assert echo.recv(64) == b"before"
    far.cut()
    assert far.is_cut()
    echo.sendall(b"during")  # accepted by the kernel, then dropped on the wire: no error
    echo.settimeout(SILENCE_S)
    with pytest.raises(socket.timeout):
        echo.recv(64)
    far.restore()
    assert not far.is_cut()
    echo.settimeout(DELIVERY_TIMEOUT_S)
    assert echo.recv(64) == b"during"  # retransmitted once the link came back


def test_shaping_holds_across_cut_and_restore(far, echo):
    far.shape(40)
    assert "tbf" in qdisc(far) and "rate 40Mbit" in qdisc(far)
    far.cut()
    far.restore()
    assert "tbf" in qdisc(far) and "rate 40Mbit" in qdisc(far)
    echo.sendall(b"shaped")
    assert echo.recv(64) == b"shaped"
    far.shape(None)
    assert "tbf" not in qdisc(far)


def test_namespace_has_its_own_shared_memory(far):
    name = f"gradserve-netns-probe-{uuid.uuid4().hex}"
    inside = subprocess.run(far.command(["sh", "-c", f"touch /dev/shm/{name} && ls /dev/shm"]),
                            capture_output=True, text=True, timeout=30, check=True)
    assert name in inside.stdout.split()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_leftovers_of_a_killed_run_are_removed_and_a_live_run_is_not(far):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owners = [subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                               cwd=REPO, env=env, start_new_session=True) for _ in range(2)]
    try:
        killed_name, live_name = (owner.stdout.readline().strip() for owner in owners)
        assert netns.namespace_pids(killed_name), "the run to be killed has a process inside"
        owners[0].kill()  # the owner only: what it started inside lives on
        owners[0].wait(timeout=30)
        assert netns.namespace_pids(killed_name)

        removed = netns.remove_leftovers()
        assert killed_name in removed
        assert killed_name not in netns.namespace_names()
        assert not os.path.exists(f"/sys/class/net/{killed_name}h")
        assert not netns.namespace_pids(killed_name)
        # the live owners' namespaces (that of this test's fixture included) are untouched
        assert {live_name, far.name} <= set(netns.namespace_names())
        assert live_name not in removed and far.name not in removed
    finally:
        for owner in owners:
            if owner.poll() is None:
                os.killpg(owner.pid, signal.SIGKILL)
            owner.wait(timeout=30)
        netns.remove_leftovers()  # the second owner's, now that it was killed too
    assert live_name not in netns.namespace_names()
