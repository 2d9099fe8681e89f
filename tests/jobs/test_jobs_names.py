"""The job file accepts what the service accepts: its names and ranges come from the engine, the
optimizer and the cluster definitions, so the two cannot drift apart."""

from __future__ import annotations

import pytest

from gradserve_services.cluster.config import CONSISTENCY_MODES
from gradserve_services.engine.losses import LOSSES
from gradserve_services.errors import InvalidArgument
from gradserve_services.jobs.jobfile import ACTIVATIONS, parse_job
from gradserve_services.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerConfig

BASE = {"dataset": {"name": "digits"}, "model": {"mlp": {"hidden": [4]}}}


def job_with(**sections):
    return parse_job({**BASE, **sections})


def test_momentum_one_is_accepted_as_the_service_accepts_it():
    OptimizerConfig.from_dict({"name": "momentum", "momentum": 1.0})  # the service's rule
    job = job_with(optimizer={"name": "momentum", "momentum": 1.0})
    assert job.optimizer["momentum"] == 1.0


def test_momentum_above_one_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as refused:
        job_with(optimizer={"name": "momentum", "momentum": 1.5})
    assert refused.value.field == "optimizer.momentum"


def test_a_beta_of_one_is_refused_as_the_service_refuses_it():
    with pytest.raises(InvalidArgument) as refused:
        job_with(optimizer={"name": "adam", "beta2": 1.0})
    assert refused.value.field == "optimizer.beta2"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_the_service_knows(name):
    assert job_with(optimizer={"name": name}).optimizer["name"] == name


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_the_service_knows(name):
    assert job_with(optimizer={"schedule": name}).optimizer["schedule"]["name"] == name


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_the_engine_knows(name):
    assert job_with(model={"mlp": {}, "loss": name}).model.loss == name


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_the_engine_knows(name):
    assert job_with(model={"mlp": {"hidden": [4], "activation": name}}).model.mlp["activation"] == name


def test_activations_are_the_engines_elementwise_ops():
    assert set(ACTIVATIONS) == {"relu", "leaky_relu", "sigmoid", "tanh", "gelu"}


@pytest.mark.parametrize("mode", CONSISTENCY_MODES)
def test_every_consistency_mode_the_cluster_knows(mode):
    assert job_with(train={"consistency": mode}).train.consistency == mode


def test_an_unhashable_name_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as refused:
        job_with(model={"mlp": {}, "loss": ["mse"]})
    assert refused.value.field == "model.loss"
