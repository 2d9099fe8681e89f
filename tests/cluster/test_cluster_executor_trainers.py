"""The executor holds only open trainers: a closed trainer its caller dropped is freed (a gateway
opens and closes sessions for as long as it runs), and shutdown still closes the open ones."""

from __future__ import annotations

import gc
import weakref

import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition

from .helpers import MLP_SPEC


def test_closed_trainers_are_not_kept_and_open_ones_close_at_shutdown():
    executor = LocalExecutor(num_workers=1)
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    config = TrainerConfig(MLP_SPEC, optimizer={"name": "sgd", "lr": 0.1})
    closed = executor.create_trainer(config, params)
    closed.close()
    closed_ref = weakref.ref(closed)
    del closed
    gc.collect()
    assert closed_ref() is None

    still_open = executor.create_trainer(config, params)
    executor.shutdown()
    with pytest.raises(FailedPrecondition):
        still_open.parameters()
