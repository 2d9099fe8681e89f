"""Optimizers: SGD, momentum, Nesterov, Adam, AdamW; global-norm clipping; learning-rate schedules.

One concept per module: `config` (names, `OptimizerConfig`, validation), `schedules` (the learning
rate of each update), `clipping` (the global norm), `rules` (one in-place block update per
optimizer, following `torch.optim`'s operation order), `finite` (the check that refuses an update
that would overflow), `blocks` (the cache-sized walk over parameters, gradient parts and state),
`parallel` (that walk's update split over threads, bitwise the one-thread result) and `optimizer`
(what the parameter server calls).
"""

from gradserve_services.optim.blocks import BLOCK_ELEMENTS, all_finite
from gradserve_services.optim.clipping import global_norm
from gradserve_services.optim.config import (OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerConfig,
                                             ScheduleConfig, check_fits_dtype)
from gradserve_services.optim.optimizer import Optimizer
from gradserve_services.optim.schedules import learning_rate

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "ScheduleConfig",
    "OptimizerConfig",
    "Optimizer",
    "learning_rate",
    "global_norm",
    "check_fits_dtype",
    "all_finite",
    "BLOCK_ELEMENTS",
]
