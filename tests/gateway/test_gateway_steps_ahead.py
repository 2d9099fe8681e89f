"""The session registry with steps begun ahead (`step(..., then=next)`, as StreamSteps passes the
stream's next step), on the in-process executor: another call of the session runs the step begun
ahead out, with its bookkeeping (replay for recovery), and the stream's call for it gets that
result, not a duplicate; no step is begun ahead across a checkpoint or past the caller's deadline."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.gateway.sessions import SessionRegistry

from tests.cluster.helpers import MLP_SPEC, batches


@pytest.fixture
def registry(tmp_path):
    executor = LocalExecutor(num_workers=2)
    registry = SessionRegistry(executor, checkpoint_dir=str(tmp_path))
    yield registry
    registry.close_all()
    executor.shutdown()


def _session(registry, every=0):
    config = TrainerConfig(MLP_SPEC, {"name": "momentum", "lr": 0.1}, num_workers=2)
    return registry.create("alice", config, None, init_seed=0, init_dtype="float64", checkpoint_every_steps=every)


DATA = batches(4, 24)


def _step(registry, session, step_id, then: bool = True, seconds_left=lambda: None):
    following = (step_id + 1, *DATA[step_id]) if then and step_id < len(DATA) else None
    return registry.step(session, step_id, *DATA[step_id - 1], seconds_left, then=following)


def test_a_call_between_streamed_steps_runs_the_one_begun_ahead_out(registry):
    plain = _session(registry)
    expected = [_step(registry, plain, step_id, then=False) for step_id in (1, 2, 3)]
    session = _session(registry, every=10)
    first = _step(registry, session, 1)
    assert session.ahead is not None and session.ahead[0] == 2
    version, params = registry.parameters(session)  # waits for step 2
    assert version == 2 and session.ahead is None
    assert [step_id for step_id, _, _ in session.replay] == [1, 2]  # a lost server replays it too
    second = _step(registry, session, 2)
    assert not second.duplicate and second.version == 2
    assert _step(registry, session, 2, then=False).duplicate
    third = _step(registry, session, 3, then=False)
    assert [r.loss for r in (first, second, third)] == [r.loss for r in expected]
    _, plain_params = registry.parameters(plain)
    _, params = registry.parameters(session)
    for name, value in plain_params.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_no_step_is_begun_ahead_across_a_checkpoint(registry):
    session = _session(registry, every=2)
    _step(registry, session, 1)
    assert session.ahead is not None and session.ahead[0] == 2
    _step(registry, session, 2)  # a checkpoint falls after step 2: it saves a state no step is in
    assert session.ahead is None and session.base_checkpoint is not None
    _step(registry, session, 3)
    assert session.ahead is not None and session.ahead[0] == 4


def test_no_step_is_begun_ahead_past_the_deadline(registry):
    session = _session(registry)
    _step(registry, session, 1, then=False)  # the session learns how long a step takes
    _step(registry, session, 2, seconds_left=lambda: 1.5 * session.step_seconds)
    assert session.ahead is None
    _step(registry, session, 3, seconds_left=lambda: 3.0 * session.step_seconds)
    assert session.ahead is not None and session.ahead[0] == 4
