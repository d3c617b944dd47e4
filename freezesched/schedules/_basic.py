"""Elementary binary schedules: constant, the paper's step rule, warm-up, cosine duty."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from freezesched.schedules._base import BinarySchedule, _describe, check_int

__all__ = ["Constant", "Cosine", "Step", "WarmupThenFreeze"]


@dataclass(frozen=True)
class Constant(BinarySchedule):
    """Always frozen (``Constant(True)``) or never frozen (``Constant(False)``).

    Args:
        frozen: The decision at every tick.

    Examples:
        >>> Constant(True)(0), Constant(False)(10**9)
        (True, False)
    """

    frozen: bool

    def __post_init__(self) -> None:
        if not isinstance(self.frozen, bool | np.bool_):
            raise TypeError(f"frozen must be a bool, got {_describe(self.frozen)}")
        object.__setattr__(self, "frozen", bool(self.frozen))

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return np.full(ticks.shape, self.frozen, dtype=np.bool_)


@dataclass(frozen=True)
class Step(BinarySchedule):
    r"""The DBF paper's *Step Freezing Scheduler* (Fig. 3): train only every ``rho`` ticks.

    With 0-based ticks, the module is trainable iff ``rho`` is finite and
    :math:`t \bmod \rho = 0`; so over ``T`` ticks it is frozen
    :math:`T - \lceil T / \rho \rceil` times. ``rho=1`` is full training and
    ``rho=math.inf`` a frozen module.

    Args:
        rho: The period, an ``int >= 1``, or ``math.inf`` for "always frozen".

    Raises:
        TypeError: ``rho`` is not a number.
        ValueError: ``rho`` is not an integer ``>= 1`` and not ``math.inf``.

    Examples:
        >>> s = Step(5)
        >>> [s(t) for t in range(6)]
        [False, True, True, True, True, False]
        >>> int(Step(10).timeline(150).sum()), int(Step(math.inf).timeline(150).sum())
        (135, 150)
    """

    rho: int | float

    def __post_init__(self) -> None:
        rho: object = self.rho
        rule = "rho must be an int >= 1 or math.inf"
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
            raise TypeError(f"{rule}, got {_describe(rho)}")
        if isinstance(rho, numbers.Integral):
            if rho < 1:
                raise ValueError(f"{rule}, got {rho!r}")
            object.__setattr__(self, "rho", int(rho))
        elif float(rho) == math.inf:
            object.__setattr__(self, "rho", math.inf)
        else:
            raise ValueError(f"{rule}, got {rho!r}")

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        if math.isinf(self.rho):
            return np.ones(ticks.shape, dtype=np.bool_)
        return np.asarray(ticks % int(self.rho) != 0)


@dataclass(frozen=True)
class WarmupThenFreeze(BinarySchedule):
    """Trainable for the first ``warmup`` ticks, then ``then`` on ticks counted from there.

    This is Table I's "(ρ=1 →) ρ=α": ``WarmupThenFreeze(50, then=Step(alpha))``.
    The child sees the tick relative to the end of the warm-up, ``t - warmup``.

    Args:
        warmup: Number of initial trainable ticks, an ``int >= 0``.
        then: The schedule after the warm-up (default: always frozen).

    Raises:
        TypeError: ``warmup`` is not an int or ``then`` is not a binary schedule.
        ValueError: ``warmup`` is negative.

    Examples:
        >>> s = WarmupThenFreeze(2, then=Step(3))
        >>> s.timeline(8).astype(int).tolist()
        [0, 0, 0, 1, 1, 0, 1, 1]
    """

    warmup: int
    then: BinarySchedule = Constant(True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup", check_int(self.warmup, "warmup"))
        if not isinstance(self.then, BinarySchedule):
            raise TypeError(f"then must be a BinarySchedule, got {_describe(self.then)}")

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        out = np.zeros(ticks.shape, dtype=np.bool_)
        after = ticks >= self.warmup
        if after.any():
            out[after] = self.then._frozen_at(ticks[after] - self.warmup)
        return out


def _check_duty(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {_describe(value)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Cosine(BinarySchedule):
    r"""Anneal the *duty* (fraction of trainable ticks) along a half cosine.

    The duty is ``initial_duty`` before tick ``begin``, ``final_duty`` from tick ``end``
    on, and in between

    .. math::
        d(t) = d_1 + (d_0 - d_1)\,\frac{1 + \cos\left(\pi\,\frac{t - b}{e - b}\right)}{2}.

    The duty is realized deterministically by error diffusion: with
    :math:`I(t) = \int_0^t d(s)\,ds` (in closed form), exactly
    :math:`\lceil I(t) \rceil` of the ticks in ``[0, t)`` are trainable, so every prefix
    count is within ``[I(t), I(t) + 1)``; tick ``t`` is trainable iff
    :math:`\lceil I(t+1) \rceil > \lceil I(t) \rceil`. A constant duty ``1/rho``
    reproduces ``Step(rho)`` exactly. Evaluating one tick is O(1).

    Args:
        begin: First tick of the anneal, an ``int >= 0``.
        end: Tick where the anneal ends, an ``int > begin``.
        initial_duty: Duty before ``begin``, in ``[0, 1]``.
        final_duty: Duty from ``end`` on, in ``[0, 1]``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``end <= begin`` or a duty is outside ``[0, 1]``.

    Examples:
        >>> s = Cosine(begin=0, end=20)
        >>> s.timeline(24).astype(int).tolist()
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        >>> int((~s.timeline(20)).sum())  # the integral of the duty over [0, 20) is 10
        10
    """

    begin: int
    end: int
    initial_duty: float = 1.0
    final_duty: float = 0.0

    def __post_init__(self) -> None:
        begin = check_int(self.begin, "begin")
        end = check_int(self.end, "end")
        if end <= begin:
            raise ValueError(f"end must be > begin, got begin={begin}, end={end}")
        object.__setattr__(self, "begin", begin)
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "initial_duty", _check_duty(self.initial_duty, "initial_duty"))
        object.__setattr__(self, "final_duty", _check_duty(self.final_duty, "final_duty"))

    def duty(self, t: NDArray[np.float64] | float) -> NDArray[np.float64]:
        """The duty :math:`d(t)` (fraction of trainable ticks) at real-valued ``t``.

        Examples:
            >>> Cosine(begin=0, end=10).duty(5.0).round(6).item()
            0.5
        """
        x = np.clip((np.asarray(t, dtype=np.float64) - self.begin) / (self.end - self.begin), 0, 1)
        d0, d1 = self.initial_duty, self.final_duty
        return np.asarray(d1 + (d0 - d1) * (1.0 + np.cos(np.pi * x)) / 2.0)

    def integral(self, t: NDArray[np.float64] | float) -> NDArray[np.float64]:
        r"""The closed-form :math:`I(t) = \int_0^t d(s)\,ds` for real ``t >= 0``.

        Examples:
            >>> Cosine(begin=0, end=10).integral(10.0).item()
            5.0
        """
        t = np.asarray(t, dtype=np.float64)
        b, e = float(self.begin), float(self.end)
        d0, d1 = self.initial_duty, self.final_duty
        span = e - b
        x = np.clip(t - b, 0.0, span)
        anneal = d1 * x + (d0 - d1) / 2.0 * (x + span / np.pi * np.sin(np.pi * x / span))
        return np.asarray(d0 * np.minimum(t, b) + anneal + d1 * np.maximum(t - e, 0.0))

    def _trainable_count(self, ticks: NDArray[np.int64]) -> NDArray[np.int64]:
        integral = self.integral(ticks.astype(np.float64))
        # Snap values within rounding error of an integer onto it, so that e.g. a constant
        # duty of 1/rho gives exactly ceil(t / rho) and hence Step(rho).
        nearest = np.round(integral)
        snapped = np.where(
            np.abs(integral - nearest) <= 1e-9 * np.maximum(1.0, nearest), nearest, integral
        )
        return np.ceil(snapped).astype(np.int64)

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return np.asarray(self._trainable_count(ticks + 1) == self._trainable_count(ticks))
