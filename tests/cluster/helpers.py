"""Small models and data shared by the cluster tests."""

from __future__ import annotations

import numpy as np

MLP_SPEC = {
    "input_features": 6,
    "nodes": [
        {"name": "fc1", "op": "dense", "inputs": ["input"], "units": 16},
        {"name": "act1", "op": "tanh", "inputs": ["fc1"]},
        {"name": "logits", "op": "dense", "inputs": ["act1"], "units": 3},
    ],
    "output": "logits",
    "loss": "softmax_cross_entropy",
}


def classification_data(rows: int, seed: int = 0, dtype="float64"):
    """A learnable 3-class problem: the label is the argmax of a fixed linear map of x."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, MLP_SPEC["input_features"])).astype(dtype)
    mixing = np.random.default_rng(1234).standard_normal((MLP_SPEC["input_features"], 3))
    y = np.argmax(x @ mixing, axis=1).astype(np.int64)
    return x, y


def batches(steps: int, rows: int, seed: int = 0, dtype="float64"):
    return [classification_data(rows, seed * 1000 + index, dtype) for index in range(steps)]


def relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_step_refused_changing_nothing(trainer, step_id, x, y, field: str) -> None:
    """The step is refused (FailedPrecondition naming `field`) and the trainer's version and
    parameters stay exactly as they were."""
    import pytest

    from gradserve_services.errors import FailedPrecondition

    version, before = trainer.parameters()
    with pytest.raises(FailedPrecondition) as refused:
        trainer.step(step_id, x, y)
    assert refused.value.field == field
    assert trainer.parameters()[0] == trainer.version == version
    for name, value in trainer.parameters()[1].items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def gone(pid: int, within_s: float = 60.0) -> bool:
    """Whether process `pid` has exited within `within_s`."""
    import os
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
