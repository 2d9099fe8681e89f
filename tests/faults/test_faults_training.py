"""Faults during training, with real processes only: a separate Ray cluster (`ray start`), the
gateway as a `gradserve serve --ray-address` process, the SDK over real gRPC.

Every case runs the same seeded sync training run (Adam, float64, 8 steps) with its fault, and
compares with the same run without it: the final parameters are bitwise equal, and the service's
own apply log shows no update lost and none applied twice.
"""

from __future__ import annotations

import os
import signal

import pytest

import gradserve
from gradserve_services import procfs

from tests.support.tcp_proxy import CuttingProxy

from .fixtures import cluster, gateway, head_sid  # noqa: F401 (fixtures the tests request)
from .helpers import (
    OTHER_TOKEN,
    STEPS,
    actor_pids,
    assert_exactly_once,
    assert_same_parameters,
    audit,
    batch,
    kill_pid,
    new_session,
    train,
    wait_until,
    when_computing,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALL_TIMEOUT_S = 30  # a step here takes well under a second; a stuck worker counts after this
GATEWAY_ARGS = ("--call-timeout-s", str(CALL_TIMEOUT_S))


@pytest.fixture(scope="module")
def fault_free(gateway):
    """The run without any fault (2 workers), audited like the others."""
    with gateway.client() as client:
        session = new_session(client)
        train(client, session)
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    assert_exactly_once(result)
    return result


def test_worker_process_sigkilled_mid_step(gateway, fault_free, head_sid):
    failures_before = gateway.metric("gradserve_worker_failures_total")
    with gateway.client() as client:
        session = new_session(client)
        workers = actor_pids("GradientWorker", head_sid)
        assert len(workers) == 2, workers
        killed = []

        def kill_a_computing_worker():
            return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                  lambda pid: (kill_pid(pid), killed.append(pid)))

        results = train(client, session, fault_at=4, fault=kill_a_computing_worker)
        assert not results[4].duplicate and results[4].version == 4
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    assert killed and killed[0] not in actor_pids("GradientWorker", head_sid)
    assert gateway.metric("gradserve_worker_failures_total") > failures_before  # the fault was real
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)


def test_worker_process_stopped_mid_step_is_replaced_after_the_call_bound(gateway, fault_free, head_sid):
    """SIGSTOP, not SIGKILL: the worker lives on but never answers, so nothing reports it lost;
    the gateway's call bound does, and the shard is re-run on the other worker."""
    failures_before = gateway.metric("gradserve_worker_failures_total")
    stopped = []
    try:
        with gateway.client() as client:
            session = new_session(client)

            def stop_a_computing_worker():
                return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                      lambda pid: (os.kill(pid, signal.SIGSTOP), stopped.append(pid)))

            results = train(client, session, fault_at=4, fault=stop_a_computing_worker)
            assert not results[4].duplicate and results[4].version == 4
            result = audit(client, session, gateway.checkpoint_dir)
            client.close_session(session)
        assert stopped
        wait_until(lambda: stopped[0] not in actor_pids("GradientWorker", head_sid), 60,
                   "the stuck worker stopped")
    finally:
        for pid in stopped:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert gateway.metric("gradserve_worker_failures_total") > failures_before
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)


def test_parameter_server_killed_session_restores_from_checkpoint(gateway, fault_free, head_sid):
    with gateway.client() as client:
        # Checkpoints after steps 3 and 6: a kill in step 5 restores version 3 and replays step 4
        # (in step 6, 7 or 8 if step 5 went by too fast to strike).
        session = new_session(client, checkpoint_every_steps=3)
        servers = actor_pids("ParameterServer", head_sid)
        assert len(servers) == 1, servers

        def kill_the_server_mid_step():
            return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                  lambda _: kill_pid(servers[0]))

        results = train(client, session, fault_at=5, fault=kill_the_server_mid_step)
        # the session went on at the right step: step 5 made version 5, then 6, 7, 8
        assert [results[s].version for s in range(1, STEPS + 1)] == list(range(1, STEPS + 1))
        assert not any(r.duplicate for r in results.values())
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    replacement = actor_pids("ParameterServer", head_sid)
    assert replacement and servers[0] not in replacement
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)


def test_connection_dropped_mid_call_then_retried(gateway, fault_free):
    with CuttingProxy(gateway.server.serving["port"]) as proxy, \
            gateway.client(proxy.address, retries=5, retry_backoff_s=0.1) as client:
        session = new_session(client)
        train(client, session, last=3)
        # Cut after the server applied step 4, before its answer reaches the client: the SDK's retry
        # (same step id) gets the recorded result, and nothing is applied again.
        proxy.cut_before_response()
        x, y = batch(4)
        fourth = client.step(session, x, y, step_id=4)
        assert proxy.cuts == 1
        assert fourth.duplicate and fourth.version == 4 and not fourth.applied
        train(client, session, first=5, last=5)
        # Cut in the middle of step 6's request (its batch is 1 MiB): the server never saw a whole
        # step, so the retry is the first time it is applied.
        proxy.cut_after_request_bytes(300_000)
        x, y = batch(6)
        sixth = client.step(session, x, y, step_id=6)
        assert proxy.cuts == 2
        assert not sixth.duplicate and sixth.version == 6
        train(client, session, first=7)
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)


def test_gateway_process_killed_and_restarted(gateway, fault_free, head_sid):
    # Generous retries: the SDK keeps retrying UNAVAILABLE with the same step id while the new
    # gateway starts on the same port.
    with gateway.client(retries=10, retry_backoff_s=0.5) as client:
        session = new_session(client, checkpoint_every_steps=1)
        before = train(client, session, last=4)
        old_gateway = gateway.server.pid

        def kill_gateway_mid_step_and_restart():
            return when_computing(lambda: actor_pids("GradientWorker", head_sid),
                                  lambda _: gateway.restart_after_kill())

        after = train(client, session, first=5, fault_at=5, fault=kill_gateway_mid_step_and_restart)
        assert gateway.server.pid != old_gateway
        # the session came back with its owner, version and step log
        listed = {info.session_id: info for info in client.list_sessions()}
        assert listed[session].version == STEPS
        # a client retrying a step the old gateway answered gets the recorded result
        x, y = batch(4)
        again = client.step(session, x, y, step_id=4)
        assert again.duplicate and (again.version, again.loss) == (before[4].version, before[4].loss)
        x, y = batch(5)
        again = client.step(session, x, y, step_id=5)
        assert again.duplicate and (again.version, again.loss) == (after[5].version, after[5].loss)
        with gradserve.Client(gateway.target, token=OTHER_TOKEN, retries=0) as other:
            with pytest.raises(gradserve.NotFound):
                other.pull_parameters(session)
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)


def test_ray_node_removed_mid_step(gateway, cluster):
    # Two more nodes. The head is full with the gateway's two pool workers, so a 4-worker session's
    # other two workers must start on the new nodes; whichever node hosts one is removed, and the
    # other has room for its replacement.
    nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    with gateway.client() as client:
        fault_free_session = new_session(client, num_workers=4)
        train(client, fault_free_session)
        fault_free = audit(client, fault_free_session, gateway.checkpoint_dir)
        client.close_session(fault_free_session)
        assert_exactly_once(fault_free)

        session = new_session(client, num_workers=4)
        train(client, session, last=1)  # all four workers up
        # the parameter servers live on the gateway's node (the head), whatever node is removed
        assert actor_pids("ParameterServer", cluster.nodes[0].pgid)
        assert not [pid for node in nodes for pid in actor_pids("ParameterServer", node.pgid)]
        removed = []

        def remove_node(computing: int) -> None:
            node = next(node for node in nodes if procfs.session_id(computing) == node.pgid)
            removed.append(node)
            # every process of that node, by pid: raylet, its agents and its workers
            for pid in [pid for pid in procfs.pids() if procfs.session_id(pid) == node.pgid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        def remove_node_mid_step():
            # listed afresh while waiting: the closed session's workers may still be exiting
            return when_computing(
                lambda: [pid for node in nodes for pid in actor_pids("GradientWorker", node.pgid)],
                remove_node)

        train(client, session, first=2, fault_at=4, fault=remove_node_mid_step)
        result = audit(client, session, gateway.checkpoint_dir)
        client.close_session(session)
    assert removed and not any(procfs.session_id(pid) == removed[0].pgid for pid in procfs.pids())
    assert_exactly_once(result)
    assert_same_parameters(result.parameters, fault_free.parameters)
