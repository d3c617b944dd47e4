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


# --- adaptive schedules: decisions from the observations, written from the docstrings ----


def plateau_switch_ticks(s, observations: dict[int, float]) -> list[int]:
    """Ticks where a Plateau's decision flips, given its observations (its own ticks).

    Written from the class docstring: an observation improves if it beats the best by
    the threshold (relative to |best| or absolute); a run of more than ``patience``
    observations without improvement (not counting those within ``cooldown`` after a
    switch) flips the decision from the next tick, at most ``max_switches`` times.
    """
    best = None
    run = 0
    quiet = 0
    flips: list[int] = []
    for tick in sorted(observations):
        v = observations[tick]
        if best is None:
            better = True
        else:
            margin = s.threshold * abs(best) if s.threshold_mode == "rel" else s.threshold
            better = v < best - margin if s.mode == "min" else v > best + margin
        if better:
            best = v
            run = 0
        else:
            run = run + 1
        if quiet:
            quiet -= 1
            run = 0
        can_flip = s.max_switches is None or len(flips) < s.max_switches
        if run > s.patience and can_flip:
            flips.append(tick + 1)
            run = 0
            quiet = s.cooldown
    return flips


def plateau_frozen_at(s, t: int, observations: dict[int, float]) -> bool:
    earlier = {k: v for k, v in observations.items() if k < t}
    flips = sum(1 for f in plateau_switch_ticks(s, earlier) if f <= t)
    return bool(s.start_frozen) ^ (flips % 2 == 1)


def gradient_frozen_count(s, t: int, observations: dict[int, list]) -> int:
    """How many front stages a GradientFreeze has frozen at tick ``t`` (numpy percentile)."""
    import numpy as np

    frozen = 0
    previous = None
    limit = s.stages if s.max_frozen is None else s.max_frozen
    for tick in sorted(k for k in observations if k < t):
        norms = observations[tick]
        now = frozen
        if previous is not None and frozen < limit:
            rates = {}
            for i in range(frozen, s.stages):
                a, b = previous[i], norms[i]
                rates[i] = (0.0 if b == 0 else float("inf")) if a == 0 else abs(b - a) / a
            finite = [r for r in rates.values() if r != float("inf")]
            if s.threshold is not None:
                cutoff = s.threshold
            else:
                cutoff = float(np.percentile(finite, s.percentile)) if finite else -1.0
            while now < limit and rates[now] != float("inf") and rates[now] <= cutoff:
                now += 1
        frozen = now
        previous = norms
    return frozen


def adaptive_frozen_at(s: object, t: int, observations: dict[int, object]):
    """The decision of ``s`` at ``t`` given the observations routed to it at its root."""
    from freezesched.schedules import GradientFreeze, Plateau

    if isinstance(s, Plateau):
        return plateau_frozen_at(s, t, observations)
    if isinstance(s, GradientFreeze):
        k = gradient_frozen_count(s, t, observations)
        return tuple(i < k for i in range(s.stages))
    if isinstance(s, WarmupThenFreeze):
        if t < s.warmup:
            return False
        shifted = {k - s.warmup: v for k, v in observations.items() if k >= s.warmup}
        return bool(adaptive_frozen_at(s.then, t - s.warmup, shifted))
    if isinstance(s, Sequential):
        starts = (0, *s.boundaries)
        ends = (*s.boundaries, float("inf"))
        i = max(k for k, start in enumerate(starts) if start <= t)
        mine = {k - starts[i]: v for k, v in observations.items() if starts[i] <= k < ends[i]}
        return bool(adaptive_frozen_at(s.schedules[i], t - starts[i], mine))
    if isinstance(s, And):
        return all(adaptive_frozen_at(c, t, observations) for c in s.schedules)
    if isinstance(s, Or):
        return any(adaptive_frozen_at(c, t, observations) for c in s.schedules)
    if isinstance(s, Not):
        return not adaptive_frozen_at(s.schedule, t, observations)
    if isinstance(s, Layerwise):
        return tuple(bool(adaptive_frozen_at(c, t, observations)) for c in s.stages)
    return frozen_at(s, t)
