"""The call bound in process: `call_timeout_s` validated and carried from the gateway's limits; which
shard counts as stuck when none answered in time; and how a wait for the servers that ran out is
told apart (a server that answers no probe is replaced: ParameterServerLost; one that answers makes
the trainer read the servers afresh before its next step). The real stuck actors are
test_cluster_stuck.py's."""

from __future__ import annotations

import pytest

from gradserve_services.cluster import DEFAULT_CALL_TIMEOUT_S, LocalExecutor, TrainerConfig
from gradserve_services.cluster.backend import CallTimedOut
from gradserve_services.cluster.parameter_shards import ParameterShards
from gradserve_services.cluster.recovery import ServersSlow, get_from_servers
from gradserve_services.cluster.shard_runner import ShardCall, ShardRunner
from gradserve_services.errors import InvalidArgument, ParameterServerLost
from gradserve_services.gateway.sessions import SessionLimits, SessionRegistry

from .helpers import MLP_SPEC


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "60"])
def test_a_bound_that_is_not_a_positive_whole_number_of_seconds_is_refused(bad):
    with pytest.raises(InvalidArgument) as refused:
        TrainerConfig(MLP_SPEC, call_timeout_s=bad).validated()
    assert refused.value.field == "config.call_timeout_s"


def test_the_bound_defaults_to_ten_minutes_and_may_be_lifted():
    assert TrainerConfig(MLP_SPEC).validated().call_timeout_s == DEFAULT_CALL_TIMEOUT_S == 600
    assert TrainerConfig(MLP_SPEC, call_timeout_s=None).validated().call_timeout_s is None


def test_a_session_takes_the_gateways_bound():
    executor = LocalExecutor(num_workers=1)
    registry = SessionRegistry(executor, limits=SessionLimits(call_timeout_s=7))
    try:
        session = registry.create("alice", TrainerConfig(MLP_SPEC, call_timeout_s=None, num_workers=1), None,
                                  init_seed=0, init_dtype="float64", checkpoint_every_steps=0)
        assert session.config.call_timeout_s == 7
    finally:
        registry.close_all()
        executor.shutdown()


class _Backend:
    """Answers the calls in `answering` (future: value); every other wait runs out."""

    def __init__(self, answering=None):
        self.answering = dict(answering or {})
        self.replaced: list[tuple[int, object]] = []
        self.waited: list = []

    def servers(self, count):
        return [f"s{index}" for index in range(count)]

    def submit(self, handle, method, *args, num_returns=1):
        return [f"{handle}.{method}"]

    def get(self, futures, timeout_s=None):
        self.waited.append(timeout_s)
        if isinstance(futures, list):
            return [self.get(future, timeout_s) for future in futures]
        if futures not in self.answering:
            raise CallTimedOut(f"no answer within {timeout_s:g} s", "workers")
        return self.answering[futures]

    def wait_one(self, futures, timeout_s=None):
        ready = [index for index, future in enumerate(futures) if future in self.answering]
        return ready[0] if ready else None

    def replace_server(self, position, lost):
        self.replaced.append((position, lost))
        return f"new{position}"


def _call(stats, deadline):
    return ShardCall(0, {"start": 0, "stop": 1}, None, [], stats, deadline=deadline)


def test_when_no_shard_answered_in_time_the_one_whose_deadline_passed_first_is_taken():
    runner = ShardRunner(_Backend(), timeout_s=1)
    calls = [_call("a", 20.0), _call("b", 10.0), _call("c", 30.0)]
    assert runner.next_done(calls) == 1
    with pytest.raises(CallTimedOut) as stuck:
        runner.stats_of(calls[1])
    assert "shard 0:1" in stuck.value.message and "within 1 s" in stuck.value.message
    answering = ShardRunner(_Backend(answering={"c": {}}), timeout_s=1)
    assert answering.next_done(calls) == 2  # one that answered comes first


def test_a_server_that_answers_no_probe_is_replaced_and_the_trainer_lost():
    backend = _Backend(answering={"s0.pid": 11})  # s1 is stuck in the call: it answers nothing
    with pytest.raises(ParameterServerLost) as lost:
        get_from_servers(backend, ["s0", "s1"], ["s0.apply", "s1.apply"], timeout_s=3)
    assert backend.replaced == [(1, "s1")]
    assert "within 3 s" in lost.value.message and lost.value.field == "parameter_server"


def test_servers_that_answer_a_probe_fail_the_step_and_are_read_afresh_before_the_next():
    backend = _Backend(answering={"s0.pid": 11, "s0.published": (7, {})})
    shards = ParameterShards(backend, "t", [["w"]], False, 16, timeout_s=3)
    with pytest.raises(ServersSlow) as slow:
        shards.get(["s0.apply"])
    assert slow.value.field == "parameter_server" and not backend.replaced
    assert 3 in backend.waited
    shards.version = 1
    shards.refresh()  # reads `published` afresh: the version the servers hold
    assert shards.version == 7 and shards.published == ["s0.published"]
    backend.answering.clear()
    shards.refresh()  # once only: nothing outlived its bound since
    assert shards.version == 7
