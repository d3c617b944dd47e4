"""Freeze schedules: pure, deterministic functions of a tick (an epoch or an iteration).

Binary schedules return ``True`` (frozen) or ``False`` (trainable) for a tick; a
:class:`Layerwise` schedule returns one decision per stage. All are immutable, compare
by structure, round-trip through plain-dict configs, and evaluate a whole timeline at once.
"""

from freezesched.schedules._base import BinarySchedule, Schedule, check_tick, schedule_from_config
from freezesched.schedules._basic import Constant, Cosine, Step, WarmupThenFreeze
from freezesched.schedules._combinators import And, Not, Or, Sequential
from freezesched.schedules._layerwise import Layerwise, Spacing

__all__ = [
    "And",
    "BinarySchedule",
    "Constant",
    "Cosine",
    "Layerwise",
    "Not",
    "Or",
    "Schedule",
    "Sequential",
    "Spacing",
    "Step",
    "WarmupThenFreeze",
    "check_tick",
    "schedule_from_config",
]
