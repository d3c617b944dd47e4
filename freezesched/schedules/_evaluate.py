"""Evaluating anything that can act as a schedule: the one place decisions are made.

Wherever freezesched needs a decision (the guard, the controller, the accounting, the
plots, the command line), it calls :func:`evaluate` or :func:`timeline` here. They accept
a :class:`Schedule` or any plain function of the tick (like the DBF paper's
``freezing_scheduler(epoch)``), validate the tick and what the function returns, and give
one decision per stage: a binary decision is broadcast to every stage asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import MAX_TICK, check_int, check_tick, describe
from freezesched.schedules._base import BinarySchedule, Schedule

__all__ = ["ScheduleLike", "check_schedule", "commit", "evaluate", "num_stages", "timeline"]

#: A schedule object, or any pure function of the tick returning ``bool`` (frozen) or a
#: tuple of ``bool`` (one per stage), e.g. the DBF paper's ``freezing_scheduler(epoch)``.
ScheduleLike: TypeAlias = Schedule | Callable[[int], bool] | Callable[[int], tuple[bool, ...]]


def check_schedule(schedule: object, name: str = "schedule") -> ScheduleLike:
    """Return ``schedule`` if it is a :class:`Schedule` or a callable; ``TypeError`` otherwise.

    Examples:
        >>> check_schedule(lambda t: t > 3)(5)
        True
    """
    if not callable(schedule):
        raise TypeError(
            f"{name} must be a freezesched Schedule or a callable tick -> bool, "
            f"got {describe(schedule)}"
        )
    return schedule


def num_stages(schedule: ScheduleLike) -> int | None:
    """How many stages ``schedule`` decides for.

    1 for a binary schedule, ``n`` for a per-stage one, ``None`` for a plain function
    (known only once it is called).

    Examples:
        >>> from freezesched import Layerwise, Step
        >>> num_stages(Step(2)), num_stages(Layerwise.gradual_unfreeze(3)), num_stages(bool)
        (1, 3, None)
    """
    if isinstance(schedule, BinarySchedule):
        return 1
    if isinstance(schedule, Schedule):
        return schedule.num_stages
    return None


def _fit(
    decisions: tuple[bool, ...], stages: int | None, where: str, *, binary: bool
) -> tuple[bool, ...]:
    if stages is None or len(decisions) == stages:
        return decisions
    if binary:
        return decisions * stages
    raise ValueError(
        f"the schedule decides for {len(decisions)} stages {where}, but {stages} targets "
        "were given; give one target (a module, a name or a group of them) per stage"
    )


def evaluate(schedule: ScheduleLike, tick: int, stages: int | None = None) -> tuple[bool, ...]:
    """The decision at ``tick``, one bool per stage (``True`` = frozen); reads only.

    For an adaptive schedule, ``tick`` must be decided already (see :func:`commit`);
    otherwise :class:`~freezesched.schedules.UndecidedTickError` is raised.

    Args:
        schedule: A schedule or a function of the tick returning a bool or a tuple of bools.
        tick: An int in ``[0, 2**53 - 1]``.
        stages: How many decisions are needed: a binary decision (a bool) is repeated
            that many times; a per-stage one (a tuple) must have exactly that many.
            ``None`` returns what the schedule gives.

    Raises:
        TypeError: the tick is not an int, or a function returned something other than a
            bool or a tuple of bools.
        ValueError: the tick is out of range, or the number of stages does not fit.

    Examples:
        >>> from freezesched import Step
        >>> evaluate(Step(2), 1), evaluate(Step(2), 1, stages=3)
        ((True,), (True, True, True))
    """
    tick = check_tick(tick, "tick")
    result = schedule(tick)
    binary = isinstance(result, bool | np.bool_)
    if binary:
        decisions: tuple[bool, ...] = (bool(result),)
    elif (
        isinstance(result, tuple) and result and all(isinstance(x, bool | np.bool_) for x in result)
    ):
        decisions = tuple(bool(x) for x in result)
    else:
        raise TypeError(
            "a schedule must return a bool or a non-empty tuple of bools (True = frozen), "
            f"got {describe(result)} at tick {tick}"
        )
    return _fit(decisions, stages, f"at tick {tick}", binary=binary)


def commit(schedule: ScheduleLike, tick: int, stages: int | None = None) -> tuple[bool, ...]:
    """Decide ``tick`` for good and return the decision: what applying a tick does.

    For an adaptive schedule, every tick up to ``tick`` is decided from the observations
    given so far and recorded (:meth:`Schedule.commit`), so later questions about them get
    the same answer and late observations of earlier ticks are refused. For any other
    schedule or function this is :func:`evaluate`. The controller and the guard call it
    for each tick they apply; :func:`evaluate` and :func:`timeline` only read.

    Args:
        schedule: A schedule or a function of the tick.
        tick: An int in ``[0, 2**53 - 1]``.
        stages: As in :func:`evaluate`.

    Raises:
        TypeError, ValueError: as :func:`evaluate`.

    Examples:
        >>> from freezesched.schedules import Plateau
        >>> s = Plateau(patience=0)
        >>> s.observe(0, 1.0)
        >>> commit(s, 3)
        (False,)
        >>> s.observe(1, 2.0)  # tick 2 was decided without it
        Traceback (most recent call last):
        ...
        ValueError: tick 1 (its own tick) of Plateau(min, patience 0) is observed too late:
        tick 3 was already decided without it...
    """
    if isinstance(schedule, Schedule):
        schedule.commit(tick)
    return evaluate(schedule, tick, stages)


def timeline(
    schedule: ScheduleLike, stop: int, start: int = 0, stages: int | None = None
) -> NDArray[np.bool_]:
    """Decisions on every tick of ``[start, stop)``: a bool array ``(ticks, stages)``.

    A :class:`Schedule` is evaluated vectorized (a million ticks in well under a second);
    a plain function is called once per tick.

    Args:
        schedule: A schedule or a function of the tick.
        stop: One past the last tick.
        start: The first tick.
        stages: As in :func:`evaluate`.

    Raises:
        TypeError, ValueError: as :func:`evaluate`, and for a bad range.

    Examples:
        >>> from freezesched import Step
        >>> timeline(Step(2), 4).astype(int).tolist()
        [[0], [1], [0], [1]]
        >>> timeline(lambda t: t >= 2, 4, stages=2).sum(axis=0).tolist()
        [2, 2]
    """
    start = check_tick(start, "start")
    stop = check_int(stop, "stop", maximum=MAX_TICK + 1)
    if stop < start:
        raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
    if stop == start:
        return np.zeros((0, stages or num_stages(schedule) or 1), dtype=np.bool_)
    if isinstance(schedule, Schedule):
        line = schedule.timeline(stop, start=start).reshape(stop - start, -1)
    else:
        rows = [evaluate(schedule, t) for t in range(start, stop)]
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise ValueError(
                f"the schedule returned tuples of different lengths {sorted(widths)} "
                f"over ticks [{start}, {stop})"
            )
        line = np.array(rows, dtype=np.bool_).reshape(stop - start, -1)
    binary = isinstance(schedule, BinarySchedule) or (
        not isinstance(schedule, Schedule) and isinstance(schedule(start), bool | np.bool_)
    )
    if stages is not None and line.shape[1] != stages:
        _fit((False,) * line.shape[1], stages, f"over ticks [{start}, {stop})", binary=binary)
        line = np.repeat(line, stages, axis=1)
    return line
