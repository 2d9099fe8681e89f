"""The module-scoped fixtures the fault cases share: a separate Ray cluster (`ray start`), the
session id of its head node, and the gateway process serving on it. Test modules import the ones
they use; a module that needs another cluster (test_faults_partition: the head on a namespace's
address) defines its own `cluster`, and the shared `gateway` serves on that one."""

from __future__ import annotations

import pytest

from tests.support.ray_cluster import start_cluster

from .helpers import Gateway

__all__ = ["cluster", "head_sid", "gateway"]


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(num_cpus=2)  # exactly the gateway's two pool workers fit on the head
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def head_sid(cluster):
    return cluster.nodes[0].pgid  # `ray start` leads its session; its raylet's workers stay in it


@pytest.fixture(scope="module")
def gateway(cluster, request, tmp_path_factory):
    # a module's GATEWAY_ARGS: more `gradserve serve` flags for its cases
    gateway = Gateway(cluster, tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]),
                      getattr(request.module, "GATEWAY_ARGS", ()))
    try:
        yield gateway
    finally:
        gateway.server.stop()
