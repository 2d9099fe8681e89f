"""A partition, not a kill: a Ray worker node in a network namespace of its own (another machine as
far as its network and shared memory go) loses its link mid-step, and gets it back later.

Nothing dies at the moment of the cut: the far node's processes keep running, and every packet
between it and the rest is dropped without a word, so only Ray's health checks (the GCS asks each
raylet in turn) can tell a partitioned node from a slow one. This cluster asks every second and
gives up after four unanswered checks of two seconds each, so the node is declared dead within
about ten seconds instead of Ray's default of half a minute; its actors die with it, the
coordinator re-runs their shards on live workers, and the step completes with the fault-free
result. The link is restored once a step has re-run the far shard.
"""

from __future__ import annotations

import threading

import pytest

from tests.support import netns
from tests.support.ray_cluster import start_cluster

from .fixtures import gateway  # noqa: F401 (serves on this module's cluster)
from .helpers import (
    actor_pids,
    assert_exactly_once,
    assert_same_parameters,
    audit,
    new_session,
    train,
    wait_until,
    when_computing,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Tight enough that the test waits seconds for the verdict, loose enough that a live node on a busy
# machine (an answer takes more than two seconds four times in a row) is not declared dead.
HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}
# Detection plus the re-run and apply, with room for a busy machine.
STEP_AFTER_CUT_TIMEOUT_S = 120
FAR_OBJECT_STORE_BYTES = 200_000_000


@pytest.fixture(scope="module")
def far():
    """The namespace that stands for the far machine."""
    with netns.network_namespace() as namespace:
        yield namespace


@pytest.fixture(scope="module")
def cluster(far):
    # The head listens where the namespace reaches this machine; exactly the gateway's two pool
    # workers fit on it.
    cluster = start_cluster(num_cpus=2, node_ip_address=far.host_address, env=HEALTH_CHECKS)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def far_node(cluster, far, gateway):
    """One CPU inside the namespace, added after the gateway's pool filled the head: a session's
    third worker can start only there."""
    return cluster.add_node(num_cpus=1, namespace=far, object_store_bytes=FAR_OBJECT_STORE_BYTES)


def test_worker_node_partitioned_mid_step_then_link_restored(gateway, cluster, far, far_node):
    far_workers = lambda: actor_pids("GradientWorker", far_node.pgid)  # noqa: E731
    with gateway.client() as client:
        # The run without a fault, with the same three workers, one of them across the link.
        reference = new_session(client, num_workers=3)
        train(client, reference)
        assert len(far_workers()) == 1, "the third worker should run on the far node"
        fault_free = audit(client, reference, gateway.checkpoint_dir)
        client.close_session(reference)
        assert_exactly_once(fault_free)

        session = new_session(client, num_workers=3)
        train(client, session, last=1)  # all three workers up, one of them far
        assert len(far_workers()) == 1
        # Room for the lost worker's replacement, on this side of the link.
        spare = cluster.add_node(num_cpus=1, node_ip_address=far.host_address)
        reruns_before = gateway.metric("gradserve_worker_retries_total")
        healer = []

        def heal_once_rerun():
            # A step is counted once it completes: the far shard was re-run elsewhere by then.
            wait_until(lambda: gateway.metric("gradserve_worker_retries_total") > reruns_before,
                       STEP_AFTER_CUT_TIMEOUT_S, "a step re-ran the far worker's shard")
            far.restore()

        def partition_mid_step():
            def cut(_):
                far.cut()
                # Healed from another thread: a cut that came after the far shard's result was
                # through strikes the next step instead, which must run meanwhile.
                healer.append(threading.Thread(target=heal_once_rerun, daemon=True))
                healer[0].start()
            return when_computing(far_workers, cut)

        try:
            train(client, session, first=2, fault_at=3, fault=partition_mid_step)
        finally:
            if healer:
                healer[0].join(timeout=STEP_AFTER_CUT_TIMEOUT_S + 30)
            far.restore()  # whatever happened, the rest of the module gets its link back
        replacements = actor_pids("GradientWorker", spare.pgid)
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    assert gateway.metric("gradserve_worker_retries_total") > reruns_before
    assert healer and not healer[0].is_alive() and not far.is_cut()
    assert len(replacements) == 1, "the lost worker is replaced on the node with room"
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)
