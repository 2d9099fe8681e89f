"""The job's checkpoint records: commit point, newest complete one wins, other jobs refused."""

from __future__ import annotations

import pytest

from gradserve_services.jobs.state import CheckpointMismatch, CheckpointStore, JobRecord


def record(step: int, *, fingerprint="f1", state_file=True) -> JobRecord:
    return JobRecord(step=step, position={"step": step}, fingerprint=fingerprint, spec={"nodes": []},
                     epoch_loss_sum=1.5, epoch_samples=3,
                     service={"target": "t", "session_id": "s", "checkpoint": f"v{step}.npz", "version": step},
                     state_file=f"step-{step:08d}.npz" if state_file else None)


def commit(store: CheckpointStore, step: int, tmp_path, **kwargs) -> None:
    service_file = tmp_path / f"service-{step}.npz"
    service_file.write_bytes(b"state %d" % step)
    assert store.keep_copy(step, service_file) == f"step-{step:08d}.npz"
    store.commit(record(step, **kwargs))


def test_newest_record_wins_and_round_trips(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    assert store.latest("f1") is None
    for step in (7, 14, 21):
        commit(store, step, tmp_path)
    assert store.latest("f1") == record(21)
    assert (tmp_path / "ck" / "step-00000021.npz").read_bytes() == b"state 21"


def test_state_without_a_record_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    commit(store, 7, tmp_path)
    store.keep_copy(14, tmp_path / "service-7.npz")  # killed before the record was written
    assert store.latest("f1").step == 7


def test_record_whose_state_is_missing_falls_back_to_an_older_one(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    commit(store, 7, tmp_path)
    store.commit(record(14))  # names step-00000014.npz, which is not there
    assert store.latest("f1").step == 7
    store.commit(record(21, state_file=False))  # a remote service holds the state: no local file
    assert store.latest("f1").step == 21


def test_only_the_newest_few_are_kept(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    for step in range(1, 7):
        commit(store, step, tmp_path)
    names = sorted(path.name for path in (tmp_path / "ck").iterdir())
    assert names == [f"step-{step:08d}.{kind}" for step in (4, 5, 6) for kind in ("json", "npz")]


def test_another_jobs_checkpoint_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    commit(store, 7, tmp_path, fingerprint="other")
    with pytest.raises(CheckpointMismatch) as raised:
        store.latest("f1")
    assert raised.value.field == "checkpoint.dir" and "different job" in raised.value.message


def test_clear_removes_only_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    commit(store, 7, tmp_path)
    (tmp_path / "ck" / "notes.txt").write_text("keep me")
    store.clear()
    assert [path.name for path in (tmp_path / "ck").iterdir()] == ["notes.txt"]
