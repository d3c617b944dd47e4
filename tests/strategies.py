"""Hypothesis strategies: random (nested) freeze schedules."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from freezesched.schedules import (
    And,
    Constant,
    Cosine,
    Not,
    Or,
    Sequential,
    Step,
    UnfreezeAt,
    WarmupThenFreeze,
)

ticks = st.integers(0, 10**9)

_cosines = st.tuples(st.integers(0, 50), st.integers(1, 80), st.floats(0, 1), st.floats(0, 1)).map(
    lambda a: Cosine(begin=a[0], end=a[0] + a[1], initial_duty=a[2], final_duty=a[3])
)
_leaves = st.one_of(
    st.builds(Constant, st.booleans()),
    st.builds(Step, st.one_of(st.integers(1, 20), st.just(math.inf))),
    st.builds(UnfreezeAt, st.integers(0, 60)),
    _cosines,
)


def _sequential(children: list) -> st.SearchStrategy:
    bounds = st.lists(st.integers(1, 200), min_size=len(children) - 1,
                      max_size=len(children) - 1, unique=True)  # fmt: skip
    return bounds.map(lambda b: Sequential(children, sorted(b)))


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    groups = st.lists(children, min_size=1, max_size=3)
    return st.one_of(
        st.builds(WarmupThenFreeze, st.integers(0, 60), children),
        st.builds(Not, children),
        groups.map(lambda xs: And(*xs)),
        groups.map(lambda xs: Or(*xs)),
        groups.flatmap(_sequential),
    )


binary_schedules = st.recursive(_leaves, _extend, max_leaves=6)
