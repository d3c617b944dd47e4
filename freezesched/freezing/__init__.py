"""Applying freeze decisions to modules: the guard (per region) and controller (per epoch).

Both are thin faces of one mechanism (:mod:`freezesched.freezing._mechanism`).
"""

from freezesched.freezing._amp import FreezeAwareGradScaler, has_grads
from freezesched.freezing._controller import (
    FreezeController,
    OptimizerPolicy,
    reset_optimizer_state,
)
from freezesched.freezing._guard import FrozenRegion, FrozenStageGuard
from freezesched.freezing._mechanism import FreezePolicy, ModePolicy, TrainableSpec, is_frozen
from freezesched.freezing._targets import ScheduleLike

__all__ = [
    "FreezeAwareGradScaler",
    "FreezeController",
    "FreezePolicy",
    "FrozenRegion",
    "FrozenStageGuard",
    "ModePolicy",
    "OptimizerPolicy",
    "ScheduleLike",
    "TrainableSpec",
    "has_grads",
    "is_frozen",
    "reset_optimizer_state",
]
