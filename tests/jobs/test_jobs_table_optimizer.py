"""The job file's `table_optimizer:` section: left out, nothing is sent (the service derives the rule
from `optimizer`); given, the keys it leaves out take the derived values, and bad values are named."""

from __future__ import annotations

import pytest

from gradserve_services.errors import InvalidArgument
from gradserve_services.jobs.jobfile import parse_job
from gradserve_services.optim.rows import TableOptimizerConfig, default_table_optimizer

BASE = {"dataset": {"name": "digits"}, "model": {"mlp": {}}, "optimizer": {"name": "adam", "lr": 0.01, "beta2": 0.99}}


def tables(section=None, **optimizer):
    raw = {**BASE, "optimizer": {**BASE["optimizer"], **optimizer}}
    if section is not None:
        raw["table_optimizer"] = section
    return parse_job(raw).table_optimizer


def test_left_out_nothing_is_sent():
    assert tables() is None


def test_given_keys_override_the_rule_derived_from_the_optimizer():
    derived = default_table_optimizer({"name": "adam", "lr": 0.01, "beta2": 0.99}).to_dict()
    assert derived["name"] == "sparse_adam" and derived["lr"] == 0.01 and derived["beta2"] == 0.99
    assert tables({}) == derived
    assert tables({"lr": 0.05}) == {**derived, "lr": 0.05}
    adagrad = tables({"name": "adagrad", "initial_accumulator_value": 0.1})
    assert adagrad == {**derived, "name": "adagrad", "eps": None, "initial_accumulator_value": 0.1}
    assert TableOptimizerConfig.from_dict(adagrad).epsilon == 1e-10  # torch's Adagrad default
    assert tables({"name": "sgd"}, name="momentum", lr=0.2)["lr"] == 0.2


@pytest.mark.parametrize("section, field", [
    ({"name": "rmsprop"}, "table_optimizer.name"),
    ({"lr": 0}, "table_optimizer.lr"),
    ({"beta1": 1.5}, "table_optimizer.beta1"),
    ({"lr": "fast"}, "table_optimizer.lr"),
    ({"momentum": 0.9}, "table_optimizer.momentum"),
    ("adagrad", "table_optimizer"),
])
def test_bad_values_are_named(section, field):
    with pytest.raises(InvalidArgument) as raised:
        tables(section)
    assert raised.value.field == field
