"""Trainer.parameters_in_place: the servers' parameters as read-only views, equal to the copies
`parameters()` makes, from in-process tables, from shared-memory blocks (Ray, sync) and from the
object store (Ray, async); no step runs while they are held."""

import threading

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model

SPEC = {"input_features": 5, "nodes": [
    {"name": "fc1", "op": "dense", "inputs": ["input"], "units": 7},
    {"name": "act", "op": "relu", "inputs": ["fc1"]},
    {"name": "fc2", "op": "dense", "inputs": ["act"], "units": 3}], "output": "fc2", "loss": "mse"}


def _batch(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)


def _check_in_place_equals_copies(executor, **config):
    params = Model(SPEC).init_parameters(seed=1)
    trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, **config), params)
    try:
        for step in range(2):
            trainer.step(step, *_batch(step))
        version, copies = trainer.parameters()
        with trainer.parameters_in_place() as (held_version, held):
            assert held_version == version > 0 and list(held) == list(copies)
            for name, value in held.items():
                assert not value.flags.writeable
                np.testing.assert_array_equal(value, copies[name])
        trainer.step(2, *_batch(2))
        assert trainer.parameters()[0] > version
    finally:
        trainer.close()


def test_local_tables_in_place():
    executor = LocalExecutor(num_workers=2)
    try:
        _check_in_place_equals_copies(executor, num_workers=2, ps_shards=2)
    finally:
        executor.shutdown()


def test_no_step_runs_while_the_parameters_are_held():
    executor = LocalExecutor(num_workers=1)
    trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1),
                                      Model(SPEC).init_parameters(seed=1))
    try:
        stepped = threading.Event()
        with trainer.parameters_in_place() as (_, held):
            before = {name: value.copy() for name, value in held.items()}
            worker = threading.Thread(target=lambda: (trainer.step(0, *_batch(0)), stepped.set()))
            worker.start()
            assert not stepped.wait(0.5)  # the step waits for the block to end
            for name, value in held.items():
                np.testing.assert_array_equal(value, before[name])
        worker.join(60)
        assert stepped.is_set() and trainer.parameters()[0] == 1
    finally:
        trainer.close()
        executor.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_ray_parameters_in_place(consistency):
    executor = RayExecutor(num_workers=2, num_cpus=2, object_store_memory=128 * 1024 * 1024)
    try:
        _check_in_place_equals_copies(executor, num_workers=2, ps_shards=2, consistency=consistency)
    finally:
        executor.shutdown()
