"""Combinators: schedules in sequence, and logical and/or/not of schedules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from freezesched.schedules._base import BinarySchedule, Schedule, _describe, check_int

__all__ = ["And", "Not", "Or", "Sequential"]


def _binary_tuple(schedules: object, name: str) -> tuple[BinarySchedule, ...]:
    if isinstance(schedules, BinarySchedule) or not isinstance(schedules, Iterable):
        raise TypeError(f"{name} must be a sequence of BinarySchedule, got {_describe(schedules)}")
    items = tuple(schedules)
    if not items:
        raise ValueError(f"{name} must hold at least one schedule, got an empty sequence")
    for i, item in enumerate(items):
        if not isinstance(item, BinarySchedule):
            raise TypeError(f"{name}[{i}] must be a BinarySchedule, got {_describe(item)}")
    return items


@dataclass(frozen=True)
class Sequential(BinarySchedule):
    """Run ``schedules[i]`` on ``[boundaries[i-1], boundaries[i])``, each on relative ticks.

    Child ``i`` sees ``t - boundaries[i-1]`` (child 0 sees ``t``), as in optax's
    ``join_schedules``, so a child behaves the same wherever it is placed. A one-element
    sequence is its child.

    Args:
        schedules: The children, at least one.
        boundaries: Strictly increasing ticks ``>= 1``, one fewer than ``schedules``.

    Raises:
        TypeError: a child is not a binary schedule or a boundary is not an int.
        ValueError: the counts do not match or the boundaries do not increase.

    Examples:
        >>> from freezesched import Constant, Step
        >>> s = Sequential([Constant(False), Step(2)], boundaries=[3])
        >>> s.timeline(7).astype(int).tolist()
        [0, 0, 0, 0, 1, 0, 1]
    """

    schedules: tuple[BinarySchedule, ...]
    boundaries: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        schedules = _binary_tuple(self.schedules, "schedules")
        given: object = self.boundaries
        if isinstance(given, int) or not isinstance(given, Iterable):
            raise TypeError(f"boundaries must be a sequence of ints, got {_describe(given)}")
        boundaries = tuple(check_int(b, f"boundaries[{i}]", minimum=1) for i, b in enumerate(given))
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                "len(boundaries) must be len(schedules) - 1, got "
                f"{len(boundaries)} boundaries for {len(schedules)} schedules"
            )
        for i in range(1, len(boundaries)):
            if boundaries[i] <= boundaries[i - 1]:
                raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        starts = np.array((0, *self.boundaries), dtype=np.int64)
        which = np.searchsorted(starts, ticks, side="right") - 1
        out = np.zeros(ticks.shape, dtype=np.bool_)
        for i, child in enumerate(self.schedules):
            mask = which == i
            if mask.any():
                out[mask] = child._frozen_at(ticks[mask] - starts[i])
        return out


class _Variadic(BinarySchedule):
    """Shared constructor for logical combinators that take any number of children."""

    schedules: tuple[BinarySchedule, ...]

    def __init__(self, *schedules: BinarySchedule) -> None:
        object.__setattr__(self, "schedules", _binary_tuple(schedules, "schedules"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.schedules))})"

    @classmethod
    def _from_config_kwargs(cls, kwargs: dict[str, Any]) -> Schedule:
        return cls(*kwargs.get("schedules", ()))


@dataclass(frozen=True, init=False, repr=False)
class And(_Variadic):
    """Frozen iff *every* child is frozen (``a & b``).

    Examples:
        >>> from freezesched import Step
        >>> (Step(2) & Step(3)).timeline(7).astype(int).tolist()
        [0, 1, 0, 0, 0, 1, 0]
    """

    schedules: tuple[BinarySchedule, ...]

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        out = self.schedules[0]._frozen_at(ticks)
        for child in self.schedules[1:]:
            out = out & child._frozen_at(ticks)
        return out


@dataclass(frozen=True, init=False, repr=False)
class Or(_Variadic):
    """Frozen iff *any* child is frozen (``a | b``).

    Examples:
        >>> from freezesched import Step
        >>> (Step(2) | Step(3)).timeline(7).astype(int).tolist()
        [0, 1, 1, 1, 1, 1, 0]
    """

    schedules: tuple[BinarySchedule, ...]

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        out = self.schedules[0]._frozen_at(ticks)
        for child in self.schedules[1:]:
            out = out | child._frozen_at(ticks)
        return out


@dataclass(frozen=True)
class Not(BinarySchedule):
    """Frozen iff the child is trainable (``~s``); ``~Not(s)`` is ``s`` itself.

    Examples:
        >>> from freezesched import Step
        >>> (~Step(3)).timeline(4).astype(int).tolist()
        [1, 0, 0, 1]
        >>> ~~Step(3) == Step(3)
        True
    """

    schedule: BinarySchedule

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, BinarySchedule):
            raise TypeError(f"schedule must be a BinarySchedule, got {_describe(self.schedule)}")

    def __invert__(self) -> BinarySchedule:
        return self.schedule

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return ~self.schedule._frozen_at(ticks)
