"""Elementary binary schedules: constant, the paper's step rule, warm-up, unfreeze, cosine."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import MAX_TICK, check_int, describe
from freezesched.schedules._base import END, BinarySchedule, Schedule

__all__ = ["Constant", "Cosine", "Step", "UnfreezeAt", "WarmupThenFreeze"]


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
            raise TypeError(f"frozen must be a bool, got {describe(self.frozen)}")
        object.__setattr__(self, "frozen", bool(self.frozen))

    def _summary(self) -> str:
        return "always frozen" if self.frozen else "never frozen"

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
        rho: The period, an int in ``[1, 2**53 - 1]``, or ``math.inf`` for "always frozen".

    Raises:
        TypeError: ``rho`` is not a number.
        ValueError: ``rho`` is not such an integer and not ``math.inf``.

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
        rule = "rho must be an int in [1, 2**53 - 1] or math.inf"
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
            raise TypeError(f"{rule}, got {describe(rho)}")
        if isinstance(rho, numbers.Integral):
            if not 1 <= int(rho) <= MAX_TICK:
                raise ValueError(f"{rule}, got {rho!r}")
            object.__setattr__(self, "rho", int(rho))
        elif float(rho) == math.inf:
            object.__setattr__(self, "rho", math.inf)
        else:
            raise ValueError(f"{rule}, got {rho!r}")

    def _summary(self) -> str:
        return f"Step({self.rho})"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        if math.isinf(self.rho):
            return np.ones(ticks.shape, dtype=np.bool_)
        return np.asarray(ticks % int(self.rho) != 0)


@dataclass(frozen=True)
class WarmupThenFreeze(BinarySchedule):
    """Trainable for the first ``warmup`` ticks, then ``then`` on ticks counted from there.

    This is Table I's "(ρ=1 →) ρ=α": ``WarmupThenFreeze(50, then=Step(alpha))``. The
    child sees the tick relative to the end of the warm-up, ``t - warmup``. Note what
    that means with a step rule: ``Step(ρ)`` trains at *its* tick 0, so the module
    trains ``warmup + 1`` ticks in a row before its first frozen tick. That is the
    paper's recipe (the ρ=α phase starts with a training epoch); the timeline shows it:

    .. code-block:: text

        WarmupThenFreeze(2, then=Step(3))   ticks 0..8:  . . . # # . # # .
                                            (. = trains, # = frozen; 3 trains in a row)

    For "train ``k`` ticks, then freeze for good", keep the default ``then``.

    Args:
        warmup: Number of initial trainable ticks, an int in ``[0, 2**53 - 1]``.
        then: The schedule after the warm-up (default: always frozen).

    Raises:
        TypeError: ``warmup`` is not an int or ``then`` is not a binary schedule.
        ValueError: ``warmup`` is out of range.

    Examples:
        >>> s = WarmupThenFreeze(2, then=Step(3))
        >>> s.timeline(9).astype(int).tolist()
        [0, 0, 0, 1, 1, 0, 1, 1, 0]
    """

    warmup: int
    then: BinarySchedule = Constant(True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup", check_int(self.warmup, "warmup"))
        if not isinstance(self.then, BinarySchedule):
            raise TypeError(f"then must be a BinarySchedule, got {describe(self.then)}")

    def _parts(self) -> tuple[tuple[Schedule, int, int], ...]:
        return ((self.then, self.warmup, END),)

    def _summary(self) -> str:
        if self.then == Constant(True):
            return f"WarmupThenFreeze({self.warmup})"
        return f"WarmupThenFreeze({self.warmup}, then={self.then._summary()})"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        out = np.zeros(ticks.shape, dtype=np.bool_)
        after = ticks >= self.warmup
        if after.any():
            out[after] = self.then._frozen_at(ticks[after] - self.warmup)
        return out


@dataclass(frozen=True)
class UnfreezeAt(BinarySchedule):
    """Frozen for the first ``tick`` ticks, trainable from ``tick`` on.

    The classic "train the head first, then fine-tune everything" recipe (Lightning's
    ``BackboneFinetuning(unfreeze_backbone_at_epoch=...)``); the same decisions as
    ``~WarmupThenFreeze(tick)``, which reads backwards.

    Args:
        tick: The first trainable tick, an int in ``[0, 2**53 - 1]``.

    Examples:
        >>> UnfreezeAt(3).timeline(5).astype(int).tolist()
        [1, 1, 1, 0, 0]
    """

    tick: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tick", check_int(self.tick, "tick"))

    def _summary(self) -> str:
        return f"UnfreezeAt({self.tick})"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return np.asarray(ticks < self.tick)


# --- Cosine -----------------------------------------------------------------------------

#: Duties are realised as fractions with at most this denominator (|error| < 2**-40).
DUTY_DENOMINATOR = 2**20


def _check_duty(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {describe(value)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    return float(value)


def _times_fraction(
    ticks: NDArray[np.int64], frac: Fraction
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``frac * ticks`` exactly, as ``(whole, rem)`` with ``rem / frac.denominator`` in [0, 1).

    Integer arithmetic only; every intermediate stays below ``2**62`` for ticks up to
    ``2**53`` and denominators up to ``2**21``.
    """
    p, q = frac.numerator, frac.denominator
    quo, rem = np.divmod(ticks, q)
    scaled = rem * p
    return quo * p + scaled // q, scaled % q


@dataclass(frozen=True)
class Cosine(BinarySchedule):
    r"""Anneal the *duty* (fraction of trainable ticks) along a half cosine.

    The duty is ``initial_duty`` before tick ``begin``, ``final_duty`` from tick ``end``
    on, and in between

    .. math::
        d(t) = d_1 + (d_0 - d_1)\,\frac{1 + \cos\left(\pi\,\frac{t - b}{e - b}\right)}{2}.

    The duty is realized deterministically by error diffusion: with
    :math:`I(t) = \int_0^t d(s)\,ds`, exactly :math:`C(t) = \lceil I(t) \rceil` of the
    ticks in ``[0, t)`` are trainable, and tick ``t`` is trainable iff
    :math:`C(t+1) > C(t)`. A constant duty ``1/rho`` reproduces ``Step(rho)`` exactly.

    Exactness: duties are taken as the nearest fraction with a denominator of at most
    ``2**20`` (``0.2`` is ``1/5``; any other duty moves by less than ``2**-40``).
    Outside the anneal :math:`C(t)` is computed in exact integer arithmetic for every
    tick up to ``2**53 - 1``. Inside it the cosine's contribution is a float64, so
    :math:`I(t) - \varepsilon \le C(t) < I(t) + 1` with
    :math:`\varepsilon = (4 + |d_0 - d_1|\,(e - b)) \cdot 2^{-48}` (``3.6e-6`` for an
    anneal of ``10**9`` ticks). Evaluating one tick is O(1).

    Args:
        begin: First tick of the anneal, an int in ``[0, 2**53 - 1]``.
        end: Tick where the anneal ends, an int in ``(begin, 2**53 - 1]``.
        initial_duty: Duty before ``begin``, in ``[0, 1]``.
        final_duty: Duty from ``end`` on, in ``[0, 1]``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``end <= begin`` or a value is out of range.

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
    _d0: Fraction = field(init=False, repr=False, compare=False)
    _d1: Fraction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        begin = check_int(self.begin, "begin")
        end = check_int(self.end, "end")
        if end <= begin:
            raise ValueError(f"end must be > begin, got begin={begin}, end={end}")
        object.__setattr__(self, "begin", begin)
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "initial_duty", _check_duty(self.initial_duty, "initial_duty"))
        object.__setattr__(self, "final_duty", _check_duty(self.final_duty, "final_duty"))
        object.__setattr__(
            self, "_d0", Fraction(self.initial_duty).limit_denominator(DUTY_DENOMINATOR)
        )
        object.__setattr__(
            self, "_d1", Fraction(self.final_duty).limit_denominator(DUTY_DENOMINATOR)
        )

    def _summary(self) -> str:
        return f"Cosine({self.begin}->{self.end}, duty {self.initial_duty:g}->{self.final_duty:g})"

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
        r"""The closed-form :math:`I(t) = \int_0^t d(s)\,ds` for real ``t >= 0`` (float64).

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
        r""":math:`C(t) = \lceil I(t) \rceil` (see the class docstring for exactness)."""
        d0, d1, b, e = self._d0, self._d1, self.begin, self.end
        out = np.empty(ticks.shape, dtype=np.int64)
        before, after = ticks <= b, ticks >= e
        inside = ~(before | after)
        if before.any():  # I = d0 * t
            whole, rem = _times_fraction(ticks[before], d0)
            out[before] = whole + (rem > 0)
        if after.any():  # I = K + d1 * (t - e), K = d0 b + (d0 + d1) (e - b) / 2
            k = d0 * b + (d0 + d1) * (e - b) / 2
            k_whole, k_frac = divmod(k, 1)
            whole, rem = _times_fraction(ticks[after] - e, d1)
            # ceil(k_frac + rem / q1), both fractions exact: one integer division.
            a, den_k, q1 = k_frac.numerator, k_frac.denominator, d1.denominator
            num, den = a * q1 + rem * den_k, den_k * q1
            out[after] = int(k_whole) + whole + (num + den - 1) // den
        if inside.any():  # I = d0 b + d0 x / 2 + d1 x / 2 + T(x), T transcendental
            x = ticks[inside] - b
            k_whole, k_frac = divmod(d0 * b, 1)
            w0, r0 = _times_fraction(x, d0 / 2)
            w1, r1 = _times_fraction(x, d1 / 2)
            span = float(e - b)
            cosine = float(d0 - d1) * span / (2 * math.pi) * np.sin(np.pi * x / span)
            rest = (
                float(k_frac)
                + r0 / float((d0 / 2).denominator)
                + r1 / float((d1 / 2).denominator)
                + cosine
            )
            eps = (4.0 + abs(float(d0 - d1)) * span) * 2.0**-48
            nearest = np.round(rest)
            frac = np.where(np.abs(rest - nearest) <= eps, nearest, np.ceil(rest))
            out[inside] = int(k_whole) + w0 + w1 + frac.astype(np.int64)
        return out

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return np.asarray(self._trainable_count(ticks + 1) == self._trainable_count(ticks))
