"""The bounded exactly-once log: a high-water mark plus a window of recent step ids, in the log
itself, in a trainer, in its parameter-server tables and across state() / restore()."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.cluster.steplog import StepLog, step_number, update_key
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, InvalidArgument

from .helpers import MLP_SPEC, batches

WINDOW = 4


def _record(step):
    return {"loss": float(step)}


def test_window_edge_answers_inside_and_refuses_at_mark_minus_window():
    log = StepLog(WINDOW)
    for step in range(1, 11):
        assert log.lookup(update_key(step)) is None
        log.record(update_key(step), _record(step))
    assert log.mark == 10 and len(log) == WINDOW
    assert log.lookup("7") == _record(7)  # the oldest retained: mark - window + 1
    with pytest.raises(FailedPrecondition) as refused:
        log.lookup("6")  # mark - window: forgotten, so refused
    assert refused.value.field == "step_id"
    assert "step_id 6 is older than the retained window" in refused.value.message
    with pytest.raises(FailedPrecondition):
        log.lookup("1")
    assert log.lookup("11") is None  # above the mark: new


def test_ids_out_of_order_inside_the_window_are_new_once():
    log = StepLog(WINDOW)
    for step in (5, 3, 4):
        assert log.lookup(update_key(step)) is None
        log.record(update_key(step), _record(step))
    assert log.lookup("2") is None  # 2 > mark 5 - window 4: never seen, inside the window
    log.record("2", _record(2))
    assert log.lookup("2") == _record(2)
    log.record("8", _record(8))  # the mark moves to 8: 4 and below are forgotten
    assert log.state()[0] == 8 and sorted(log.state()[1]) == ["5", "8"]
    with pytest.raises(FailedPrecondition):
        log.lookup("4")


def test_update_keys_of_one_step_age_together():
    log = StepLog(2)
    for step in (1, 2, 3):
        for shard in range(3):
            log.record(update_key(step, shard), _record(step))
    assert sorted(log.state()[1]) == ["2/0", "2/1", "2/2", "3/0", "3/1", "3/2"]
    with pytest.raises(FailedPrecondition):
        log.lookup("1/0")


def test_state_round_trip_and_logs_written_before_the_bound():
    log = StepLog(WINDOW)
    for step in range(1, 8):
        log.record(update_key(step), _record(step))
    mark, records = log.state()
    restored = StepLog.from_state(mark, json.loads(json.dumps(records)), WINDOW)
    assert restored.state() == (7, {str(s): _record(s) for s in range(4, 8)})
    # an unbounded log (no mark) from an older checkpoint: its highest step is the mark
    unbounded = {str(step): _record(step) for step in range(1, 100)}
    old = StepLog.from_state(None, unbounded, WINDOW)
    assert old.mark == 99 and len(old) == WINDOW
    with pytest.raises(FailedPrecondition):
        old.lookup("95")
    # a smaller window than the checkpoint's keeps only what it holds
    assert len(StepLog.from_state(mark, records, 2)) == 2


@pytest.mark.parametrize("bad", ["s1", "", "-1", -1, True, 1.0, None])
def test_step_ids_are_integers(bad):
    with pytest.raises(InvalidArgument) as error:
        step_number(bad)
    assert error.value.field == "step_id"


def test_step_number_accepts_decimal_strings():
    assert step_number("12") == step_number(np.int64(12)) == 12


@pytest.fixture
def params():
    return Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")


@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_trainer_keeps_a_window_refuses_older_and_state_carries_only_the_window(params, consistency):
    data = batches(12, 24)
    config = TrainerConfig(MLP_SPEC, {"name": "momentum", "lr": 0.1}, num_workers=2, ps_shards=2,
                           consistency=consistency, step_window=WINDOW)
    with LocalExecutor(num_workers=2) as executor:
        trainer = executor.create_trainer(config, params)
        results = {step: trainer.step(step, *data[step - 1]) for step in range(1, 11)}
        version, before = trainer.parameters()

        again = trainer.step(7, *data[0])  # the window's oldest step: answered from the log
        assert again.duplicate and (again.loss, again.version) == (results[7].loss, results[7].version)
        with pytest.raises(FailedPrecondition) as refused:
            trainer.step(6, *data[5])  # mark 10 - window 4
        assert refused.value.field == "step_id" and "older than the retained window" in str(refused.value)
        assert trainer.parameters()[0] == version
        for name, value in trainer.parameters()[1].items():
            np.testing.assert_array_equal(value, before[name])

        arrays, meta = trainer.state()
        meta = json.loads(json.dumps(meta))  # what a checkpoint holds
        assert meta["step_mark"] == 10 and sorted(meta["step_log"], key=int) == ["7", "8", "9", "10"]
        assert len(meta["table"]["log"]) <= WINDOW * config.num_workers  # the servers' log too
        assert meta["table"]["log_mark"] == 10

        restored = executor.create_trainer(config, params)
        restored.restore(arrays, meta)
        assert restored.step(8, *data[0]).duplicate
        with pytest.raises(FailedPrecondition):
            restored.step(6, *data[5])
        fresh = restored.step(11, *data[10])
        assert not fresh.duplicate and fresh.version > version
        assert trainer.step(11, *data[10]).loss == fresh.loss  # the same state, the same step
        trainer.close()
        restored.close()
