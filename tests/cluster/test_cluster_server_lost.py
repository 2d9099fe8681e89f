"""A parameter server killed between steps: the next step raises `ParameterServerLost` (its own
class, an Unavailable naming `parameter_server` on the wire), and a restore brings the trainer back."""

from __future__ import annotations

import os
import signal

import pytest

from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import ParameterServerLost, Unavailable
from gradserve_services.gateway.status import status_code_for

from .helpers import MLP_SPEC, batches, gone

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


def test_a_killed_server_is_raised_as_parameter_server_lost(executor):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    trainer = executor.create_trainer(TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 0.1}), params)
    try:
        (x1, y1), (x2, y2) = batches(2, 40)
        trainer.step(1, x1, y1)
        arrays, meta = trainer.state()
        server = executor._backend.servers(1)[0]
        pid = executor._backend.get(server.pid.remote())
        os.kill(pid, signal.SIGKILL)
        assert gone(pid)
        with pytest.raises(ParameterServerLost) as lost:
            trainer.step(2, x2, y2)
        assert isinstance(lost.value, Unavailable)
        assert lost.value.field == "parameter_server"
        assert status_code_for(lost.value).name == "UNAVAILABLE"
        trainer.restore(arrays, meta)  # starts a replacement server
        assert trainer.step(2, x2, y2).version == 2
    finally:
        trainer.close()
