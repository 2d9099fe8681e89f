"""Steps begun ahead (`Trainer.step(..., then=next)`) on a real embedded Ray runtime: the next step's
workers wait for this update's published parameters as arguments. The trajectory is bitwise the one
of steps run one at a time, through a refused step, a stuck worker, a step never asked for and the
calls that meet one in flight."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition

from .helpers import MLP_SPEC, batches, gone

pytestmark = pytest.mark.integration

BOUND_S = 5  # call_timeout_s: far above these tiny steps, far below the suite's


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


# No saturating activation: a batch of huge finite values overflows its loss, and the step is refused
LINEAR_SPEC = {"input_features": 6, "nodes": [{"name": "logits", "op": "dense", "inputs": ["input"], "units": 3}],
               "output": "logits", "loss": "softmax_cross_entropy"}


def _trainer(executor, spec=MLP_SPEC, **config):
    config.setdefault("call_timeout_s", BOUND_S)
    params = Model(spec).init_parameters(seed=0, dtype="float64")
    return executor.create_trainer(TrainerConfig(spec, {"name": "momentum", "lr": 0.1}, num_workers=2,
                                                 push_gradients=False, **config),
                                   params)


def _run(executor, data, *, ahead: bool, refuse=None, spec=MLP_SPEC):
    """Step ids 0.. over `data`, each given the next as `then` where `ahead`; a step in `refuse`
    is expected to be refused. Returns the results (None for a refused one) and the parameters."""
    trainer = _trainer(executor, spec)
    try:
        results = []
        for index, (x, y) in enumerate(data):
            then = (index + 1, *data[index + 1]) if ahead and index + 1 < len(data) else None
            if refuse is not None and index in refuse:
                with pytest.raises(FailedPrecondition):
                    trainer.step(index, x, y, then=then)
                results.append(None)
                continue
            results.append(trainer.step(index, x, y, then=then))
        return results, trainer.parameters()
    finally:
        trainer.close()


def _assert_same(first, second):
    (first_version, first_params), (second_version, second_params) = first, second
    assert first_version == second_version
    for name, value in first_params.items():
        np.testing.assert_array_equal(second_params[name], value, err_msg=name)


def test_steps_begun_ahead_follow_the_one_at_a_time_trajectory_bitwise(executor):
    data = batches(6, 40)
    plain, plain_params = _run(executor, data, ahead=False)
    ahead, ahead_params = _run(executor, data, ahead=True)
    _assert_same(plain_params, ahead_params)
    assert plain_params[0] == 6
    assert [r.loss for r in ahead] == [r.loss for r in plain]
    assert [r.version for r in ahead] == list(range(1, 7))
    assert not any(r.duplicate for r in ahead)
    for result in ahead:  # a phase never negative, the step's total its wall time from its start
        assert min(result.timings[phase] for phase in ("broadcast", "compute", "gather", "apply")) >= 0.0


def test_a_refused_step_drops_the_one_begun_after_it_which_then_runs_afresh(executor):
    data = batches(5, 40)
    huge, labels = data[2][0].copy(), data[2][1].copy()
    huge[:4], labels[:4] = 1e308, 0  # finite inputs whose gradient sum overflows: the update is refused
    data[2] = (huge, labels)
    plain, plain_params = _run(executor, data, ahead=False, refuse={2}, spec=LINEAR_SPEC)
    ahead, ahead_params = _run(executor, data, ahead=True, refuse={2}, spec=LINEAR_SPEC)
    _assert_same(plain_params, ahead_params)
    assert plain_params[0] == 4
    assert [r and r.loss for r in ahead] == [r and r.loss for r in plain]


def test_a_step_begun_ahead_and_never_called_is_applied_and_answered_once(executor):
    data = batches(3, 40)
    trainer = _trainer(executor)
    try:
        trainer.step(0, *data[0], then=(1, *data[1]))
        version, _ = trainer.parameters()  # waits for step 1, begun ahead
        assert version == 2
        first = trainer.step(1, *data[1])
        assert not first.duplicate and first.version == 2
        again = trainer.step(1, *data[1])
        assert again.duplicate and again.loss == first.loss
        assert trainer.step(2, *data[2]).version == 3
        at_once, at_once_params = _run(executor, data, ahead=False)
        _assert_same(at_once_params, trainer.parameters())
    finally:
        trainer.close()


def test_a_call_for_another_step_records_the_one_begun_ahead_first(executor):
    data = batches(4, 40)
    trainer = _trainer(executor)
    try:
        trainer.step(0, *data[0], then=(1, *data[1]))
        assert trainer.step(2, *data[2]).version == 3  # step 1 applied before it
        assert not trainer.step(1, *data[1]).duplicate
        assert trainer.step(1, *data[1]).duplicate
    finally:
        trainer.close()


def test_a_stuck_worker_drops_the_step_begun_ahead_and_the_trajectory_holds(executor):
    data = batches(4, 40)
    clean, clean_params = _run(executor, data, ahead=False)
    trainer = _trainer(executor)
    pid = None
    try:
        trainer.step(0, *data[0])
        pid = executor._backend.get(executor._backend.workers(2)[0].pid.remote())
        os.kill(pid, signal.SIGSTOP)
        stuck = trainer.step(1, *data[1], then=(2, *data[2]))
        assert gone(pid), "the stuck worker was stopped"
        assert stuck.worker_failures == 1 and stuck.retries >= 1
        results = [trainer.step(2, *data[2], then=(3, *data[3])), trainer.step(3, *data[3])]
        assert [r.loss for r in results] == [r.loss for r in clean[2:]]
        _assert_same(clean_params, trainer.parameters())
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        trainer.close()


@pytest.mark.parametrize("ps_shards", [1, 2])
def test_a_step_begun_ahead_waits_on_the_servers_boards_and_keeps_the_trajectory(executor, ps_shards):
    """Once an update reported its servers' boards, the workers of the next step begun ahead
    are given the parameter blocks by value and wait for the update there, not through Ray."""
    data = batches(5, 40)
    trainer = _trainer(executor, ps_shards=ps_shards)
    at_once = _trainer(executor, ps_shards=ps_shards)
    try:
        followed = []
        for index, (x, y) in enumerate(data):
            then = (index + 1, *data[index + 1]) if index + 1 < len(data) else None
            result = trainer.step(index, x, y, then=then)
            assert result.loss == at_once.step(index, x, y).loss
            ahead = trainer._ahead
            followed.append(ahead is not None and all(call.inputs.follows is not None for call in ahead.calls))
        assert followed == [False, True, True, True, False]  # (step 0's servers had posted nothing yet)
        _assert_same(at_once.parameters(), trainer.parameters())
    finally:
        trainer.close()
        at_once.close()


def test_a_worker_waiting_on_the_boards_is_released_when_its_step_is_dropped(executor):
    """The step before fails with no outcome on any board (a shard's loss is not finite: its
    update never runs); the trainer gives the step begun after it up, and its workers, released,
    serve the next call at once instead of waiting out their bound."""
    data = batches(4, 40)
    huge = data[2][0].copy()
    huge[:] = 1e308  # finite, but every shard's loss overflows: the shards are refused
    trainer = _trainer(executor, spec=LINEAR_SPEC, call_timeout_s=600)
    try:
        trainer.step(0, *data[0], then=(1, *data[1]))
        trainer.step(1, *data[1])
        started = time.monotonic()
        with pytest.raises(FailedPrecondition):
            trainer.step(2, huge, data[2][1], then=(3, *data[3]))
        assert trainer.step(3, *data[3]).version == 3
        assert time.monotonic() - started < 60, "the dropped step's workers waited for an update never made"
    finally:
        trainer.close()
