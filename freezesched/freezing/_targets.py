"""Turning (schedule, tick, modules) into one decision per module, with validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
from torch import nn

from freezesched.schedules import BinarySchedule, Schedule, check_tick
from freezesched.schedules._base import _describe

__all__ = ["ScheduleLike", "as_modules", "check_schedule", "decide"]

#: A schedule object, or any pure function of the tick returning ``bool`` (frozen) or a
#: tuple of ``bool`` (one per stage), e.g. the DBF paper's ``freezing_scheduler(epoch)``.
ScheduleLike: TypeAlias = Schedule | Callable[[int], bool] | Callable[[int], tuple[bool, ...]]


def check_schedule(schedule: object, name: str = "schedule") -> ScheduleLike:
    """Raise ``TypeError`` unless ``schedule`` is a :class:`Schedule` or a callable."""
    if not callable(schedule):
        raise TypeError(
            f"{name} must be a freezesched Schedule or a callable tick -> bool, "
            f"got {_describe(schedule)}"
        )
    return schedule


def as_modules(modules: object, name: str = "modules") -> tuple[nn.Module, ...]:
    """A module, or a non-empty sequence of modules, as a tuple; ``TypeError`` otherwise."""
    if isinstance(modules, nn.Module):
        return (modules,)
    if isinstance(modules, Sequence) and not isinstance(modules, str) and modules:
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name}[{i}] must be an nn.Module, got {_describe(m)}")
        return tuple(modules)
    raise TypeError(
        f"{name} must be an nn.Module or a non-empty sequence of nn.Module, "
        f"got {_describe(modules)}"
    )


def decide(schedule: ScheduleLike, tick: int, num_modules: int) -> tuple[bool, ...]:
    """One freeze decision per module for ``tick``.

    A binary decision applies to every module; a per-stage decision needs exactly one
    module per stage.

    Raises:
        TypeError: the tick is not an int, or a callable returned something other than a
            bool or a tuple of bools.
        ValueError: the tick is negative, or the number of stages and modules differ.
    """
    tick = check_tick(tick, "tick")
    stages = schedule.num_stages if isinstance(schedule, Schedule) else None
    if stages is not None and not isinstance(schedule, BinarySchedule) and stages != num_modules:
        raise ValueError(
            f"a per-stage schedule with {stages} stages needs exactly {stages} modules, "
            f"one per stage, got {num_modules}"
        )
    result = schedule(tick)
    if isinstance(result, bool | np.bool_):
        return (bool(result),) * num_modules
    if isinstance(result, tuple) and all(isinstance(x, bool | np.bool_) for x in result):
        if len(result) != num_modules:
            raise ValueError(
                f"the schedule returned {len(result)} per-stage decisions at tick {tick}, "
                f"but {num_modules} modules were given; pass one module per stage"
            )
        return tuple(bool(x) for x in result)
    raise TypeError(
        f"a schedule must return a bool or a tuple of bools (True = frozen), "
        f"got {_describe(result)} at tick {tick}"
    )
