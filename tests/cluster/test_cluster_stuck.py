"""Stuck actors on a real embedded Ray runtime: a worker or parameter server that is alive but never
answers (SIGSTOP) holds no step past `call_timeout_s`. A stuck worker is stopped and replaced and its
shard re-run, with the fault-free result; a stuck server is stopped and replaced and the step raises
ParameterServerLost, after which a restore brings the trainer back."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import ParameterServerLost

from .helpers import MLP_SPEC, batches, gone

pytestmark = pytest.mark.integration

BOUND_S = 5  # the trainers' call_timeout_s here: far above these tiny steps, far below the suite's


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


def _release(pid: int) -> None:
    """Whatever happened, never leave a stopped process behind."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _trainer(executor, **config):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    return executor.create_trainer(TrainerConfig(MLP_SPEC, {"name": "momentum", "lr": 0.1}, num_workers=2,
                                                 call_timeout_s=BOUND_S, **config), params)


# (only sync steps push their gradients during backward)
@pytest.mark.parametrize("consistency, push_gradients", [("sync", False), ("sync", True), ("async", False)])
def test_a_stuck_worker_is_replaced_and_its_shard_rerun_with_the_fault_free_result(executor, consistency,
                                                                                   push_gradients):
    data = batches(3, 40)

    def run(stop_a_worker: bool):
        trainer = _trainer(executor, consistency=consistency, push_gradients=push_gradients)
        try:
            trainer.step(0, *data[0])
            pid = None
            if stop_a_worker:
                pid = executor._backend.get(executor._backend.workers(2)[0].pid.remote())
                os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                result = trainer.step(1, *data[1])
                waited = time.monotonic() - started
                if pid is not None:
                    assert gone(pid), "the stuck worker was stopped"
            finally:
                if pid is not None:
                    _release(pid)
            after = trainer.step(2, *data[2])  # the pool is whole again
            return result, waited, after, trainer.parameters()
        finally:
            trainer.close()

    clean, _, clean_after, (clean_version, clean_params) = run(stop_a_worker=False)
    stuck, waited, stuck_after, (stuck_version, stuck_params) = run(stop_a_worker=True)
    assert clean.retries == 0 and clean.worker_failures == 0
    assert stuck.worker_failures == 1 and stuck.retries >= 1
    assert waited >= BOUND_S * 0.9, "the worker had its bound before it counted as stuck"
    assert stuck_after.retries == 0
    if consistency == "sync":  # the same update, whichever worker computed the shard
        assert stuck.loss == clean.loss and stuck_version == clean_version == 3
        for name, value in clean_params.items():
            np.testing.assert_array_equal(stuck_params[name], value, err_msg=name)


def test_a_stuck_parameter_server_is_replaced_and_the_trainer_restored(executor):
    (x1, y1), (x2, y2) = batches(2, 40)
    trainer = _trainer(executor)
    pid = None
    try:
        trainer.step(1, x1, y1)
        arrays, meta = trainer.state()
        pid = trainer.server_pids()[0]
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ParameterServerLost) as lost:
            trainer.step(2, x2, y2)
        waited = time.monotonic() - started
        assert lost.value.field == "parameter_server"
        assert "within 5 s" in lost.value.message
        assert waited >= BOUND_S * 0.9
        assert gone(pid), "the stuck server was stopped"
        trainer.restore(arrays, meta)  # onto the server that replaced it
        result = trainer.step(2, x2, y2)
        assert result.version == 2 and result.applied
        assert trainer.server_pids()[0] != pid
    finally:
        if pid is not None:
            _release(pid)
        trainer.close()
