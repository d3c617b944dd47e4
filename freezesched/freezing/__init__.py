"""Applying freeze decisions to modules: one mechanism, three faces.

:func:`freeze` freezes now, :class:`FrozenStageGuard` freezes a region of code when its
schedule says so, and :class:`FreezeController` applies schedules at epoch granularity;
all three are thin faces of :mod:`freezesched.freezing._mechanism`, configured by one
:class:`FreezePolicy`. :class:`GradientSignal` and :func:`agree_across_ranks` measure
what adaptive schedules observe and make every rank observe the same.
"""

from freezesched.freezing._amp import FreezeAwareGradScaler, has_grads
from freezesched.freezing._controller import FreezeController
from freezesched.freezing._distributed import (
    check_ddp_settings,
    constant_decision,
    managed_parameters,
    unwrap,
)
from freezesched.freezing._fast import (
    FastFrozen,
    FastMismatchError,
    FastModeWarning,
    FastReport,
    drop_fast,
    fast_report,
)
from freezesched.freezing._features import FeatureCache, FeatureCacheMismatchError, sample_keys
from freezesched.freezing._guard import FrozenRegion, FrozenStageGuard, freeze
from freezesched.freezing._mechanism import is_frozen, thawed
from freezesched.freezing._optim import LRRamp, check_optimizers, reset_optimizer_state
from freezesched.freezing._policy import (
    FreezePolicy,
    ModePolicy,
    OptimizerPolicy,
    TrainableRule,
    TrainableSpec,
    resolve_policy,
)
from freezesched.freezing._signals import GradientSignal, agree_across_ranks, as_observation
from freezesched.freezing._targets import TargetSpec

__all__ = [
    "FastFrozen",
    "FastMismatchError",
    "FastModeWarning",
    "FastReport",
    "FeatureCache",
    "FeatureCacheMismatchError",
    "FreezeAwareGradScaler",
    "FreezeController",
    "FreezePolicy",
    "FrozenRegion",
    "FrozenStageGuard",
    "GradientSignal",
    "LRRamp",
    "ModePolicy",
    "OptimizerPolicy",
    "TargetSpec",
    "TrainableRule",
    "TrainableSpec",
    "agree_across_ranks",
    "as_observation",
    "check_ddp_settings",
    "check_optimizers",
    "constant_decision",
    "drop_fast",
    "fast_report",
    "freeze",
    "has_grads",
    "is_frozen",
    "managed_parameters",
    "reset_optimizer_state",
    "resolve_policy",
    "sample_keys",
    "thawed",
    "unwrap",
]
