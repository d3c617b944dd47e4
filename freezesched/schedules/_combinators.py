"""Schedules in sequence: each child owns a range of ticks and sees them from its start."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import check_int, describe
from freezesched.schedules._base import END, BinarySchedule, Schedule, binary_tuple, check_unshared

__all__ = ["Sequential"]


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
        schedules = binary_tuple(self.schedules, "schedules")
        given: object = self.boundaries
        if isinstance(given, int | str) or not isinstance(given, Iterable):
            raise TypeError(f"boundaries must be a sequence of ints, got {describe(given)}")
        boundaries = tuple(check_int(b, f"boundaries[{i}]", minimum=1) for i, b in enumerate(given))
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                "len(boundaries) must be len(schedules) - 1, got "
                f"{len(boundaries)} boundaries for {len(schedules)} schedules"
            )
        for i in range(1, len(boundaries)):
            if boundaries[i] <= boundaries[i - 1]:
                raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")
        check_unshared(schedules, "schedules")
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def _parts(self) -> tuple[tuple[Schedule, int, int], ...]:
        starts = (0, *self.boundaries)
        ends = (*self.boundaries, END)
        return tuple(zip(self.schedules, starts, ends, strict=True))

    def _summary(self) -> str:
        parts = [s._summary() for s in self.schedules]
        joined = " | ".join(
            f"{p} from {b}" for p, b in zip(parts[1:], self.boundaries, strict=True)
        )
        return f"Sequential({parts[0]}" + (f"; {joined})" if joined else ")")

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        starts = np.array((0, *self.boundaries), dtype=np.int64)
        which = np.searchsorted(starts, ticks, side="right") - 1
        out = np.zeros(ticks.shape, dtype=np.bool_)
        for i, child in enumerate(self.schedules):
            mask = which == i
            if mask.any():
                out[mask] = child._frozen_at(ticks[mask] - starts[i])
        return out
