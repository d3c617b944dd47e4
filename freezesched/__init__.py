"""freezesched: when to stop training part of a pretrained model, and what it saves.

Schedules decide, per tick, whether a submodule is frozen; :class:`FrozenStageGuard`
applies that decision to a region of code and restores the module exactly afterwards;
:class:`FreezeController` applies it for whole epochs.
"""

from freezesched.freezing import (
    FreezeAwareGradScaler,
    FreezeController,
    FreezePolicy,
    FrozenRegion,
    FrozenStageGuard,
    ModePolicy,
    OptimizerPolicy,
    ScheduleLike,
    TrainableSpec,
    has_grads,
    is_frozen,
    reset_optimizer_state,
)
from freezesched.schedules import (
    And,
    BinarySchedule,
    Constant,
    Cosine,
    Layerwise,
    Not,
    Or,
    Schedule,
    Sequential,
    Step,
    WarmupThenFreeze,
    schedule_from_config,
)

__version__ = "0.1.0"

__all__ = [
    "And",
    "BinarySchedule",
    "Constant",
    "Cosine",
    "FreezeAwareGradScaler",
    "FreezeController",
    "FreezePolicy",
    "FrozenRegion",
    "FrozenStageGuard",
    "Layerwise",
    "ModePolicy",
    "Not",
    "OptimizerPolicy",
    "Or",
    "Schedule",
    "ScheduleLike",
    "Sequential",
    "Step",
    "TrainableSpec",
    "WarmupThenFreeze",
    "__version__",
    "has_grads",
    "is_frozen",
    "reset_optimizer_state",
    "schedule_from_config",
]
