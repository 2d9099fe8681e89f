"""The session registry over its store, with the in-process executor: the step count a session
reports is the trainer's (through duplicates, a restore and a gateway restart), and the store
brings back exactly the open sessions."""

from __future__ import annotations

import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.errors import FailedPrecondition
from gradserve_services.gateway.sessions import SessionRegistry

from tests.cluster.helpers import MLP_SPEC, batches


@pytest.fixture
def executor():
    started = LocalExecutor(num_workers=1)
    yield started
    started.shutdown()


def new_session(registry, every=0):
    config = TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1)
    return registry.create("alice", config, None, init_seed=0, init_dtype="float64",
                           checkpoint_every_steps=every)


def run_steps(registry, session, ids):
    data = batches(max(ids), 16)
    return [registry.step(session, i, *data[i - 1], lambda: None) for i in ids]


def test_steps_count_the_trainers_steps_through_duplicates_and_restores(executor, tmp_path):
    registry = SessionRegistry(executor, checkpoint_dir=str(tmp_path))
    try:
        session = new_session(registry)
        run_steps(registry, session, [1, 2])
        name, _ = registry.save_checkpoint(session)
        results = run_steps(registry, session, [3, 3, 4])
        assert [r.duplicate for r in results] == [False, True, False]
        assert session.steps == 4 == session.trainer.steps_run
        registry.restore_checkpoint(session, name)
        assert session.steps == 2 and session.version == 2
    finally:
        registry.close_all()


def test_a_restarted_registry_recovers_open_sessions_only(executor, tmp_path):
    first = SessionRegistry(executor, checkpoint_dir=str(tmp_path))
    kept, closed = new_session(first, every=2), new_session(first, every=2)
    run_steps(first, kept, [1, 2, 3])
    first.close("alice", closed.session_id)
    first.close_all()
    second = SessionRegistry(executor, checkpoint_dir=str(tmp_path))
    try:
        assert second.recover() == 1
        (recovered,) = second.list("alice")
        assert recovered.session_id == kept.session_id
        assert recovered.steps == 2 and recovered.version == 2  # the checkpoint after step 2
        assert run_steps(second, recovered, [2])[0].duplicate  # its step log came back too
    finally:
        second.close_all()


def test_a_checkpoint_policy_without_a_directory_names_the_field(executor):
    registry = SessionRegistry(executor)
    with pytest.raises(FailedPrecondition) as refused:
        new_session(registry, every=2)
    assert refused.value.field == "config.checkpoint_every_steps"
    assert registry.list("alice") == []
