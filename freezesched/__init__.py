"""freezesched: when to stop training part of a pretrained model, and what it saves.

The names a training loop needs are here: schedules decide, per tick, whether a part of
the model is frozen; :class:`FrozenStageGuard` applies that decision to a region of code
(:func:`freeze` unconditionally) and :class:`FreezeController` for whole epochs, both
configured by one :class:`FreezePolicy`. Everything else lives in the subpackages:
:mod:`freezesched.schedules` (the schedule algebra), :mod:`freezesched.freezing` (the
mechanism and its helpers), :mod:`freezesched.profiling` (what it saves),
:mod:`freezesched.integrations` (MMEngine, Lightning, Hugging Face).
"""

from __future__ import annotations

import warnings
from typing import Any

from freezesched.freezing import (
    FreezeAwareGradScaler,
    FreezeController,
    FreezePolicy,
    FrozenStageGuard,
    LRRamp,
    freeze,
    is_frozen,
)
from freezesched.schedules import (
    Constant,
    Cosine,
    GradientFreeze,
    Layerwise,
    Plateau,
    Sequential,
    Step,
    UnfreezeAt,
    WarmupThenFreeze,
    schedule_from_config,
)

__version__ = "0.2.0"
#: The oldest torch freezesched supports and is tested on (CI runs the core tests on it).
TORCH_MINIMUM = "2.12.0"

__all__ = [
    "TORCH_MINIMUM",
    "Constant",
    "Cosine",
    "FreezeAwareGradScaler",
    "FreezeController",
    "FreezePolicy",
    "FrozenStageGuard",
    "GradientFreeze",
    "LRRamp",
    "Layerwise",
    "Plateau",
    "Sequential",
    "Step",
    "UnfreezeAt",
    "WarmupThenFreeze",
    "__version__",
    "freeze",
    "is_frozen",
    "schedule_from_config",
]

#: Names that moved to a subpackage in 0.2; importing them from the top level still works
#: for one release, with a DeprecationWarning.
_MOVED = {
    "And": "freezesched.schedules",
    "Or": "freezesched.schedules",
    "Not": "freezesched.schedules",
    "BinarySchedule": "freezesched.schedules",
    "Schedule": "freezesched.schedules",
    "ScheduleLike": "freezesched.schedules",
    "FrozenRegion": "freezesched.freezing",
    "ModePolicy": "freezesched.freezing",
    "OptimizerPolicy": "freezesched.freezing",
    "TrainableSpec": "freezesched.freezing",
    "has_grads": "freezesched.freezing",
    "reset_optimizer_state": "freezesched.freezing",
}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'freezesched' has no attribute {name!r}")
    warnings.warn(
        f"freezesched.{name} moved to {home}.{name}; import it from there "
        "(the top-level name goes away in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    import importlib

    return getattr(importlib.import_module(home), name)
