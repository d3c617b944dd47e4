"""Freeze schedules: pure, deterministic functions of a tick (an epoch or an iteration).

Binary schedules return ``True`` (frozen) or ``False`` (trainable) for a tick; a
:class:`Layerwise` schedule returns one decision per stage. All are immutable, compare
by structure, round-trip through plain-dict configs, and evaluate a whole timeline at once.
:func:`evaluate` and :func:`timeline` accept any schedule or plain function of the tick.
Ticks are ints in ``[0, MAX_TICK]`` (``2**53 - 1``).
"""

from freezesched._validation import MAX_TICK, check_tick
from freezesched.schedules._base import And, BinarySchedule, Not, Or, Schedule
from freezesched.schedules._basic import Constant, Cosine, Step, UnfreezeAt, WarmupThenFreeze
from freezesched.schedules._combinators import Sequential
from freezesched.schedules._config import register_schedule, schedule_from_config
from freezesched.schedules._evaluate import (
    ScheduleLike,
    check_schedule,
    evaluate,
    num_stages,
    timeline,
)
from freezesched.schedules._layerwise import Layerwise, Spacing

__all__ = [
    "MAX_TICK",
    "And",
    "BinarySchedule",
    "Constant",
    "Cosine",
    "Layerwise",
    "Not",
    "Or",
    "Schedule",
    "ScheduleLike",
    "Sequential",
    "Spacing",
    "Step",
    "UnfreezeAt",
    "WarmupThenFreeze",
    "check_schedule",
    "check_tick",
    "evaluate",
    "num_stages",
    "register_schedule",
    "schedule_from_config",
    "timeline",
]
