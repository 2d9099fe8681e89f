"""Ray execution: sharded gradient workers, parameter-server actors, the step coordinator.

`LocalExecutor` runs the same classes in process (tests, small jobs); `RayExecutor` runs them as Ray
actors. See docs/ARCHITECTURE.md ("Cluster API") for the contract.
"""

from .config import COMPRESSIONS, CONSISTENCY_MODES, DEFAULT_CALL_TIMEOUT_S, STALE_POLICIES, StepResult, TrainerConfig
from .executor import Executor, LocalExecutor, RayExecutor
from .steplog import DEFAULT_STEP_WINDOW
from .trainer import Trainer

__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "Trainer",
    "TrainerConfig",
    "StepResult",
    "CONSISTENCY_MODES",
    "STALE_POLICIES",
    "COMPRESSIONS",
    "DEFAULT_STEP_WINDOW",
    "DEFAULT_CALL_TIMEOUT_S",
]
