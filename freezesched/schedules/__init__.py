"""Freeze schedules: deterministic functions of a tick (an epoch or an iteration).

Binary schedules return ``True`` (frozen) or ``False`` (trainable) for a tick; a
:class:`Layerwise` schedule returns one decision per stage. All are immutable, compare
by structure, round-trip through plain-dict configs, and evaluate a whole timeline at once.
:func:`evaluate` and :func:`timeline` accept any schedule or plain function of the tick.
Ticks are ints in ``[0, MAX_TICK]`` (``2**53 - 1``).

Adaptive schedules (:class:`Plateau`, :class:`GradientFreeze`) also depend on the
observations they are given (``observe(tick, value)``); they record each decision, so
they evaluate like any schedule on decided ticks, and save and restore exactly
(``state_dict()``). :func:`commit` is what applying a tick does.
"""

from freezesched._validation import MAX_TICK, check_tick
from freezesched.schedules._adaptive import GradientFreeze, Plateau
from freezesched.schedules._base import (
    And,
    BinarySchedule,
    Not,
    Or,
    Schedule,
    UndecidedTickError,
)
from freezesched.schedules._basic import Constant, Cosine, Step, UnfreezeAt, WarmupThenFreeze
from freezesched.schedules._combinators import Sequential
from freezesched.schedules._config import register_schedule, schedule_from_config
from freezesched.schedules._evaluate import (
    ScheduleLike,
    check_schedule,
    commit,
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
    "GradientFreeze",
    "Layerwise",
    "Not",
    "Or",
    "Plateau",
    "Schedule",
    "ScheduleLike",
    "Sequential",
    "Spacing",
    "Step",
    "UndecidedTickError",
    "UnfreezeAt",
    "WarmupThenFreeze",
    "check_schedule",
    "check_tick",
    "commit",
    "evaluate",
    "num_stages",
    "register_schedule",
    "schedule_from_config",
    "timeline",
]
