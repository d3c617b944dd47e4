"""Per-stage schedules: progressive freezing and gradual unfreezing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import check_int, check_tick, describe
from freezesched.schedules._base import (
    END,
    BinarySchedule,
    Not,
    Schedule,
    binary_tuple,
    check_unshared,
)
from freezesched.schedules._basic import Constant, WarmupThenFreeze

__all__ = ["Layerwise", "Spacing"]

Spacing = Literal["linear", "cubic"]
_FROZEN = Constant(True)


@dataclass(frozen=True)
class Layerwise(Schedule):
    r"""One binary schedule per stage (e.g. stem, layer1, ..., layer4), front to back.

    Calling it returns a tuple of decisions, one per stage (``True`` = frozen); its
    :meth:`timeline` has shape ``(ticks, num_stages)``. Build it from any per-stage
    binary schedules, or with :meth:`progressive` / :meth:`gradual_unfreeze`.

    Args:
        stages: The per-stage binary schedules, front stage first.

    Raises:
        TypeError: a stage is not a binary schedule.
        ValueError: ``stages`` is empty.

    Examples:
        >>> from freezesched import Constant, Step
        >>> s = Layerwise([Constant(True), Step(2)])
        >>> s(0), s(1)
        ((True, False), (True, True))
    """

    stages: tuple[BinarySchedule, ...]

    def __post_init__(self) -> None:
        stages = binary_tuple(self.stages, "stages")
        check_unshared(stages, "stages")
        object.__setattr__(self, "stages", stages)

    def _parts(self) -> tuple[tuple[Schedule, int, int], ...]:
        return tuple((stage, 0, END) for stage in self.stages)

    def _summary(self) -> str:
        freeze_at = [
            s.warmup for s in self.stages if isinstance(s, WarmupThenFreeze) and s.then == _FROZEN
        ]
        if len(freeze_at) == len(self.stages):
            return f"Layerwise(freeze at {', '.join(map(str, freeze_at))})"
        unfreeze_at = [
            s.schedule.warmup
            for s in self.stages
            if isinstance(s, Not)
            and isinstance(s.schedule, WarmupThenFreeze)
            and s.schedule.then == _FROZEN
        ]
        if len(unfreeze_at) == len(self.stages):
            return f"Layerwise(unfreeze at {', '.join(map(str, unfreeze_at))})"
        return f"Layerwise({len(self.stages)} stages)"

    @property
    def num_stages(self) -> int:
        """Number of stages this schedule decides for."""
        return len(self.stages)

    def __call__(self, t: int) -> tuple[bool, ...]:
        """Per-stage decisions at tick ``t``, front stage first (``True`` = frozen).

        Raises:
            TypeError: ``t`` is not an integer.
            ValueError: ``t`` is negative.
        """
        tick = check_tick(t)
        self._check_decided(tick, tick + 1)
        row = self._frozen_at(np.array([tick], dtype=np.int64))[0]
        return tuple(bool(x) for x in row)

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        columns = [stage._frozen_at(ticks) for stage in self.stages]
        return np.stack(columns, axis=1).reshape(len(ticks), len(columns))

    @classmethod
    def progressive(
        cls, num_stages: int, first: int, last: int, spacing: Spacing = "linear"
    ) -> Layerwise:
        r"""Progressive freezing (FreezeOut-style): front stages freeze first, for good.

        Stage :math:`i` of :math:`n` is trainable before tick
        :math:`f_i = \text{first} + \lfloor (\text{last} - \text{first})\, g(i / (n-1)) \rfloor`
        and frozen from then on, with :math:`g(x) = x` (``"linear"``) or :math:`g(x) = x^3`
        (``"cubic"``: front stages freeze early and close together, giving deep stages
        most of the training). Integer arithmetic, so no tick is off by rounding.

        Args:
            num_stages: Number of stages, ``>= 1``.
            first: Tick at which stage 0 freezes.
            last: Tick at which the deepest stage freezes, ``>= first``.
            spacing: ``"linear"`` or ``"cubic"``.

        Raises:
            TypeError: an argument has the wrong type.
            ValueError: ``last < first``, ``num_stages < 1`` or an unknown ``spacing``.

        Examples:
            >>> s = Layerwise.progressive(4, first=0, last=27, spacing="cubic")
            >>> [stage.warmup for stage in s.stages]
            [0, 1, 8, 27]
            >>> s(5)
            (True, True, False, False)
        """
        n = check_int(num_stages, "num_stages", minimum=1)
        first = check_tick(first, "first")
        last = check_tick(last, "last")
        if last < first:
            raise ValueError(f"last must be >= first, got first={first}, last={last}")
        if spacing not in ("linear", "cubic"):
            raise ValueError(f"spacing must be 'linear' or 'cubic', got {describe(spacing)}")
        power = 1 if spacing == "linear" else 3
        span = last - first
        ticks = [
            first if n == 1 else first + (span * i**power) // (n - 1) ** power for i in range(n)
        ]
        return cls(tuple(WarmupThenFreeze(tick) for tick in ticks))

    @classmethod
    def gradual_unfreeze(cls, num_stages: int, begin: int = 0, every: int = 1) -> Layerwise:
        r"""Gradual unfreezing (ULMFiT-style): all frozen, then the deepest stage first.

        Stage :math:`i` of :math:`n` is frozen before tick
        :math:`u_i = \text{begin} + (n - 1 - i)\cdot\text{every}` and trainable from then on.

        Args:
            num_stages: Number of stages, ``>= 1``.
            begin: Tick at which the deepest stage unfreezes.
            every: Ticks between two unfreezings, ``>= 1``.

        Raises:
            TypeError: an argument has the wrong type.
            ValueError: an argument is out of range.

        Examples:
            >>> s = Layerwise.gradual_unfreeze(3, begin=1, every=2)
            >>> [s(t) for t in (0, 1, 3, 5)]
            [(True, True, True), (True, True, False), (True, False, False), (False, False, False)]
        """
        n = check_int(num_stages, "num_stages", minimum=1)
        begin = check_tick(begin, "begin")
        every = check_int(every, "every", minimum=1)
        return cls(tuple(Not(WarmupThenFreeze(begin + (n - 1 - i) * every)) for i in range(n)))
