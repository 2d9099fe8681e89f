"""The job file's `table_optimizer:` section: the per-row rule of the model's tables (optim/rows.py).

Left out, the job sends none and the service derives it from `optimizer` (lazy Adam at the dense
rate and moments for adam/adamw, SGD otherwise). Given, every key it leaves out takes that derived
value, except that naming another rule drops the derived `eps` for that rule's own (torch's).
"""

from __future__ import annotations

from collections.abc import Mapping

from gradserve_services.optim.rows import TABLE_OPTIMIZER_NAMES, TableOptimizerConfig, default_table_optimizer

from .job_keys import TABLE_OPTIMIZER_KEYS
from .values import choice, number, reject_unknown

__all__ = ["parse_table_optimizer"]

NUMBER_KEYS = ("lr", "beta1", "beta2", "eps", "initial_accumulator_value")


def parse_table_optimizer(raw: Mapping | None, dense: Mapping) -> dict | None:
    """The complete table optimizer config, or None when the section is absent; errors name
    `table_optimizer.KEY` (the service's own ranges, checked here before any training)."""
    if raw is None:
        return None
    reject_unknown(raw, TABLE_OPTIMIZER_KEYS, "table_optimizer")
    config = default_table_optimizer(dense).to_dict()
    if "name" in raw:
        choice(raw["name"], TABLE_OPTIMIZER_NAMES, "table_optimizer.name", what="table optimizer")
        if raw["name"] != config["name"]:
            config.update(name=raw["name"], eps=None)
    for key in NUMBER_KEYS:
        if raw.get(key) is not None:
            config[key] = number(raw[key], f"table_optimizer.{key}")
    return TableOptimizerConfig.from_dict(config).to_dict()
