"""Handed-over arrays become the parameter server's own (no copy); every other array is copied,
so a caller's arrays never change under it."""

import numpy as np

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.cluster.handover import hand_over, take
from gradserve_services.engine import Model

SPEC = {"input_features": 5, "nodes": [{"name": "fc", "op": "dense", "inputs": ["input"], "units": 3}],
        "output": "fc", "loss": "mse"}


def _batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)


def _tables(executor):
    return [table for server in executor._backend._servers for table in server.tables.values()]


def test_a_handed_over_array_is_taken_once():
    array = np.zeros(4)
    assert not take(array)  # never handed over
    hand_over({"a": array})
    assert take(array) and not take(array)


def test_only_writable_contiguous_arrays_are_taken():
    read_only, strided = np.zeros(4), np.zeros((4, 4))[:, 1]
    read_only.flags.writeable = False
    hand_over({"r": read_only, "s": strided})
    assert not take(read_only) and not take(strided)


def test_the_server_keeps_handed_over_parameters_and_trains_them_in_place():
    executor = LocalExecutor(num_workers=1)
    try:
        params = Model(SPEC).init_parameters(seed=1)
        expected = {name: value.copy() for name, value in params.items()}
        trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1),
                                          hand_over(params))
        (table,) = _tables(executor)
        assert all(table.params[name] is params[name] for name in params)
        trainer.step(0, *_batch())
        version, pulled = trainer.parameters()
        assert version == 1 and not np.array_equal(pulled["fc.weight"], expected["fc.weight"])
        np.testing.assert_array_equal(params["fc.weight"], pulled["fc.weight"])  # the same memory
        trainer.close()
    finally:
        executor.shutdown()


def test_parameters_not_handed_over_are_copied_and_stay_the_callers():
    executor = LocalExecutor(num_workers=1)
    try:
        params = Model(SPEC).init_parameters(seed=1)
        before = {name: value.copy() for name, value in params.items()}
        trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1), params)
        (table,) = _tables(executor)
        assert not any(np.shares_memory(table.params[name], params[name]) for name in params)
        trainer.step(0, *_batch())
        for name in params:
            np.testing.assert_array_equal(params[name], before[name])
        trainer.close()
    finally:
        executor.shutdown()
