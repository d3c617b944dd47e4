"""An independent reference for every schedule: tick by tick, from the definitions.

Plain Python integers and fractions, no NumPy and no code shared with
``freezesched.schedules``: tests compare the library's vectorized evaluation to this.
"""

from __future__ import annotations

import math
from fractions import Fraction

from freezesched.schedules import (
    And,
    Constant,
    Cosine,
    Layerwise,
    Not,
    Or,
    Sequential,
    Step,
    UnfreezeAt,
    WarmupThenFreeze,
)


def _duty(x: float) -> Fraction:
    return Fraction(x).limit_denominator(2**20)


def _trainable_count(s: Cosine, t: int) -> int:
    """ceil of the integral of the duty over [0, t), as the Cosine docstring defines it."""
    b, e = s.begin, s.end
    d0, d1 = _duty(s.initial_duty), _duty(s.final_duty)
    x = min(max(t - b, 0), e - b)
    exact = d0 * min(t, b) + (d0 + d1) / 2 * x + d1 * max(t - e, 0)
    transcendental = 0.0
    if 0 < x < e - b:
        transcendental = float(d0 - d1) * (e - b) / (2 * math.pi) * math.sin(math.pi * x / (e - b))
    whole = math.floor(exact)
    rest = float(exact - whole) + transcendental
    nearest = round(rest)
    if abs(rest - nearest) <= 1e-9 * max(1, e - b):
        return whole + nearest
    return whole + math.ceil(rest)


def frozen_at(s: object, t: int) -> bool | tuple[bool, ...]:
    """The decision of schedule ``s`` at tick ``t``."""
    if isinstance(s, Constant):
        return s.frozen
    if isinstance(s, Step):
        return math.isinf(s.rho) or t % int(s.rho) != 0
    if isinstance(s, WarmupThenFreeze):
        return False if t < s.warmup else bool(frozen_at(s.then, t - s.warmup))
    if isinstance(s, UnfreezeAt):
        return t < s.tick
    if isinstance(s, Sequential):
        starts = (0, *s.boundaries)
        i = max(k for k, start in enumerate(starts) if start <= t)
        return bool(frozen_at(s.schedules[i], t - starts[i]))
    if isinstance(s, And):
        return all(frozen_at(c, t) for c in s.schedules)
    if isinstance(s, Or):
        return any(frozen_at(c, t) for c in s.schedules)
    if isinstance(s, Not):
        return not frozen_at(s.schedule, t)
    if isinstance(s, Cosine):
        return _trainable_count(s, t + 1) == _trainable_count(s, t)
    if isinstance(s, Layerwise):
        return tuple(bool(frozen_at(stage, t)) for stage in s.stages)
    raise TypeError(f"no reference for {type(s).__name__}")
