"""Schedules: tables of expected values, shared behaviour across every schedule, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import frozen_at
from strategies import binary_schedules, ticks

import freezesched.schedules
from freezesched.schedules import (
    MAX_TICK,
    And,
    BinarySchedule,
    Constant,
    Cosine,
    Layerwise,
    Not,
    Or,
    Schedule,
    Sequential,
    Step,
    UnfreezeAt,
    WarmupThenFreeze,
    register_schedule,
    schedule_from_config,
)

# One instance of every kind, nested ones included; shared behaviour is tested on all.
ALL_SCHEDULES: list[Schedule] = [
    Constant(True),
    Constant(False),
    Step(1),
    Step(3),
    Step(math.inf),
    WarmupThenFreeze(5),
    WarmupThenFreeze(4, then=Step(3)),
    UnfreezeAt(6),
    Sequential([Step(2)]),
    Sequential([Constant(False), Step(2), Constant(True)], boundaries=[3, 9]),
    And(Step(2), Step(3)),
    Or(Step(2), ~Step(5)),
    Not(Cosine(begin=2, end=30)),
    Cosine(begin=0, end=40),
    Cosine(begin=5, end=17, initial_duty=0.25, final_duty=0.75),
    Layerwise.progressive(5, first=3, last=40, spacing="cubic"),
    Layerwise.gradual_unfreeze(4, begin=2, every=3),
    Layerwise([Step(2), WarmupThenFreeze(3, then=Step(4)), Constant(False)]),
]
IDS = [repr(s)[:60] for s in ALL_SCHEDULES]


# --- the paper's step rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("rho", "frozen_ticks"), [(1, 0), (2, 75), (5, 120), (10, 135), (math.inf, 150)]
)
def test_step_frozen_counts_over_150_ticks_match_table2_proportions(rho, frozen_ticks):
    assert int(Step(rho).timeline(150).sum()) == frozen_ticks
    assert sum(Step(rho)(t) for t in range(150)) == frozen_ticks


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (1, [0, 0, 0, 0, 0, 0, 0]),
        (2, [0, 1, 0, 1, 0, 1, 0]),
        (3, [0, 1, 1, 0, 1, 1, 0]),
        (math.inf, [1, 1, 1, 1, 1, 1, 1]),
    ],
)
def test_step_table_matches_paper_fig3(rho, expected):
    # Fig. 3: unfrozen iff rho != inf and epoch % rho == 0 (0-based epochs).
    assert [int(Step(rho)(t)) for t in range(7)] == expected


@given(rho=st.integers(1, 1000), horizon=st.integers(0, 5000))
def test_step_counts_match_closed_form(rho, horizon):
    trainable = int((~Step(rho).timeline(horizon)).sum())
    assert trainable == -(-horizon // rho)  # ceil(horizon / rho)


def test_table1_policy_warmup_then_step():
    # Table I, DOTA: rho=1 for ~50 epochs, then rho=5 for ~400 more.
    s = WarmupThenFreeze(50, then=Step(5))
    line = s.timeline(450)
    assert not line[:50].any()
    assert line[50:].sum() == 400 - 80  # 80 of the 400 DBF epochs train the backbone
    assert [s(t) for t in (49, 50, 51, 54, 55)] == [False, False, True, True, False]


# --- warm-up, sequences and logic --------------------------------------------------------


def test_warmup_then_freeze_default_is_frozen_after_warmup():
    assert WarmupThenFreeze(3).timeline(6).tolist() == [False] * 3 + [True] * 3
    assert WarmupThenFreeze(0) == WarmupThenFreeze(0, then=Constant(True))


def test_sequential_children_see_relative_ticks():
    s = Sequential([Step(2), Step(3), Step(2)], boundaries=[3, 5])
    # ticks 0..2 -> Step(2) at 0..2; 3..4 -> Step(3) at 0..1; 5.. -> Step(2) at 0..
    assert s.timeline(9).astype(int).tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 1]


def test_logical_combinators_tables():
    a, b = Step(2), Step(3)
    assert (a & b).timeline(7).astype(int).tolist() == [0, 1, 0, 0, 0, 1, 0]
    assert (a | b).timeline(7).astype(int).tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert (~a).timeline(4).astype(int).tolist() == [1, 0, 1, 0]
    assert And(a, b) == a & b and Or(a, b) == a | b


@pytest.mark.parametrize("child", [s for s in ALL_SCHEDULES if s.num_stages == 1], ids=str)
def test_one_element_combinators_equal_their_child(child):
    for wrapped in (Sequential([child]), And(child), Or(child), Not(Not(child))):
        assert np.array_equal(wrapped.timeline(300), child.timeline(300))
        assert all(wrapped(t) == child(t) for t in (0, 7, 10**12))


def test_unfreeze_at_is_the_negated_warmup():
    assert UnfreezeAt(3).timeline(6).astype(int).tolist() == [1, 1, 1, 0, 0, 0]
    assert np.array_equal(UnfreezeAt(7).timeline(50), (~WarmupThenFreeze(7)).timeline(50))
    assert UnfreezeAt(0)(0) is False


def test_warmup_then_step_trains_warmup_plus_one_ticks_in_a_row():
    # As the docstring says: Step's tick 0 trains, so the first frozen tick is warmup + 1.
    line = WarmupThenFreeze(2, then=Step(3)).timeline(9)
    assert "".join("#" if f else "." for f in line) == "...##.##."


# --- cosine duty ----------------------------------------------------------------------


def _numeric_integral(s: Cosine, t: int) -> float:
    grid = np.linspace(0.0, t, 20 * t + 1)
    d = s.duty(grid)
    return float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(grid)))


@settings(max_examples=60, deadline=None)
@given(
    begin=st.integers(0, 60),
    length=st.integers(1, 200),
    d0=st.floats(0, 1),
    d1=st.floats(0, 1),
    horizon=st.integers(1, 400),
)
def test_cosine_prefix_counts_within_one_of_the_duty_integral(begin, length, d0, d1, horizon):
    s = Cosine(begin=begin, end=begin + length, initial_duty=d0, final_duty=d1)
    prefix = np.concatenate([[0], np.cumsum(~s.timeline(horizon))])
    for t in range(0, horizon + 1, max(1, horizon // 25)):
        integral = _numeric_integral(s, t) if t else 0.0
        assert abs(prefix[t] - integral) <= 1.0 + 1e-6, (t, prefix[t], integral)


@pytest.mark.parametrize("rho", [1, 2, 3, 5, 7, 10])
def test_cosine_with_constant_duty_is_step(rho):
    s = Cosine(begin=0, end=1, initial_duty=1 / rho, final_duty=1 / rho)
    assert np.array_equal(s.timeline(10_000), Step(rho).timeline(10_000))


def test_cosine_anneals_from_all_trainable_to_all_frozen():
    s = Cosine(begin=10, end=50)
    line = s.timeline(80)
    assert not line[:10].any() and line[50:].all()
    first_half = int((~line[10:30]).sum())
    second_half = int((~line[30:50]).sum())
    assert first_half > second_half  # the duty decreases along the cosine
    assert first_half + second_half == 20  # integral of the half cosine from 1 to 0 is 40/2


# --- layerwise ----------------------------------------------------------------------------


def test_progressive_linear_freezes_front_stages_first():
    s = Layerwise.progressive(5, first=10, last=50)
    assert [stage.warmup for stage in s.stages] == [10, 20, 30, 40, 50]
    assert s(9) == (False,) * 5
    assert s(10) == (True, False, False, False, False)
    assert s(35) == (True, True, True, False, False)
    assert s(50) == (True,) * 5
    line = s.timeline(60)
    # Once frozen, a stage stays frozen, and a stage never freezes before the one in front.
    assert (np.diff(line.astype(int), axis=0) >= 0).all()
    assert (line[:, :-1] >= line[:, 1:]).all()


def test_progressive_cubic_spacing():
    s = Layerwise.progressive(4, first=2, last=56, spacing="cubic")
    # 2 + 54 * (i / 3) ** 3 -> 2, 4, 18, 56
    assert [stage.warmup for stage in s.stages] == [2, 4, 18, 56]
    assert Layerwise.progressive(1, first=7, last=9).stages == (WarmupThenFreeze(7),)


def test_gradual_unfreeze_deepest_stage_first():
    s = Layerwise.gradual_unfreeze(4, begin=2, every=3)
    assert s(0) == s(1) == (True, True, True, True)
    assert s(2) == (True, True, True, False)
    assert s(5) == (True, True, False, False)
    assert s(8) == (True, False, False, False)
    assert s(11) == s(10**9) == (False, False, False, False)


def test_layerwise_accepts_per_stage_binary_schedules():
    s = Layerwise([Step(2), Constant(True)])
    assert s.num_stages == 2
    assert s.timeline(3).astype(int).tolist() == [[0, 1], [1, 1], [0, 1]]


# --- shared behaviour of every schedule --------------------------------------------------------


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=IDS)
def test_every_schedule_matches_an_independent_reference(s):
    # tests/reference.py evaluates each schedule tick by tick from its definition, in plain
    # Python integers and fractions: it shares no code with the vectorized evaluation.
    line = s.timeline(200)
    for t in range(200):
        expected = frozen_at(s, t)
        assert s(t) == expected
        assert (bool(line[t]) if s.num_stages == 1 else tuple(map(bool, line[t]))) == expected
    for t in (10**12, 10**12 + 3, MAX_TICK - 1, MAX_TICK):
        assert s(t) == frozen_at(s, t)


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=IDS)
def test_timeline_shape_and_offset(s):
    line = s.timeline(1000)
    assert line.dtype == np.bool_
    expected_shape = (1000,) if s.num_stages == 1 else (1000, s.num_stages)
    assert line.shape == expected_shape
    assert np.array_equal(s.timeline(1000, start=400), line[400:])
    assert s.timeline(5, start=5).shape[0] == 0


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=IDS)
def test_config_round_trip_through_json(s):
    config = s.to_config()
    assert schedule_from_config(config) == s
    assert schedule_from_config(json.loads(json.dumps(config))) == s
    assert schedule_from_config(s) is s


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=IDS)
def test_repr_evaluates_back_to_an_equal_schedule(s):
    namespace = {
        name: getattr(freezesched.schedules, name) for name in freezesched.schedules.__all__
    }
    namespace["inf"] = math.inf
    rebuilt = eval(repr(s), namespace)
    assert rebuilt == s and hash(rebuilt) == hash(s)


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=IDS)
def test_evaluation_is_pure(s):
    first = s.timeline(300)
    s(250), s(3), s.timeline(10)  # other evaluations in between change nothing
    assert np.array_equal(first, s.timeline(300))


def test_structural_equality():
    assert Step(5) == Step(5) and Step(5) != Step(6)
    assert Step(math.inf) == Step(float("inf"))
    assert Sequential([Step(2), Step(3)], [4]) == Sequential((Step(2), Step(3)), (4,))
    assert {Step(2), Step(2), Step(3)} == {Step(2), Step(3)}


def test_config_accepts_inf_as_a_string():
    assert schedule_from_config({"type": "Step", "rho": "inf"}) == Step(math.inf)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "fragment"),
    [
        (lambda: Step(0), ValueError, "rho must be an int in [1, 2**53 - 1] or math.inf, got 0"),
        (lambda: Step(2**70), ValueError, f"or math.inf, got {2**70}"),
        (lambda: Step(-1), ValueError, "got -1"),
        (lambda: Step(2.5), ValueError, "got 2.5"),
        (lambda: Step(math.nan), ValueError, "got nan"),
        (lambda: Step(-math.inf), ValueError, "got -inf"),
        (lambda: Step("5"), TypeError, "or math.inf, got '5' (str)"),
        (lambda: Step(True), TypeError, "got True (bool)"),
        (lambda: Constant(1), TypeError, "frozen must be a bool, got 1 (int)"),
        (
            lambda: WarmupThenFreeze(-2),
            ValueError,
            "warmup must be an int in [0, 2**53 - 1], got -2",
        ),
        (lambda: WarmupThenFreeze(2**53), ValueError, f"got {2**53}"),
        (lambda: UnfreezeAt(-1), ValueError, "tick must be an int in [0, 2**53 - 1]"),
        (lambda: Cosine(0, 2**60), ValueError, "end must be an int in [0, 2**53 - 1]"),
        (lambda: WarmupThenFreeze(2, then=5), TypeError, "then must be a BinarySchedule"),
        (lambda: WarmupThenFreeze(2, then=Layerwise([Step(2)])), TypeError, "BinarySchedule"),
        (
            lambda: Sequential([Step(2), Step(3)], boundaries=[]),
            ValueError,
            "len(boundaries) must be len(schedules) - 1, got 0 boundaries for 2 schedules",
        ),
        (
            lambda: Sequential([Step(2), Step(3), Step(4)], boundaries=[5, 5]),
            ValueError,
            "boundaries must be strictly increasing, got [5, 5]",
        ),
        (lambda: Sequential([Step(2), Step(3)], boundaries=[0]), ValueError, "boundaries[0]"),
        (lambda: Sequential([], boundaries=[]), ValueError, "at least one schedule"),
        (lambda: Sequential([Step(2), "x"], [3]), TypeError, "schedules[1] must be a Binary"),
        (lambda: And(), ValueError, "at least one schedule"),
        (lambda: Cosine(begin=5, end=5), ValueError, "end must be > begin, got begin=5, end=5"),
        (lambda: Cosine(0, 10, initial_duty=1.5), ValueError, "initial_duty must be"),
        (lambda: Cosine(0, 10, final_duty=math.nan), ValueError, "final_duty must be"),
        (lambda: Layerwise([]), ValueError, "at least one schedule"),
        (lambda: Layerwise.progressive(3, first=9, last=2), ValueError, "last must be >= first"),
        (lambda: Layerwise.progressive(3, 0, 9, spacing="log"), ValueError, "spacing must be"),
        (lambda: Layerwise.gradual_unfreeze(0), ValueError, "num_stages must be an int in [1,"),
        (lambda: Layerwise.gradual_unfreeze(3, every=0), ValueError, "every must be an int in [1,"),
    ],
)
def test_bad_construction_raises_a_clear_error(build, error, fragment):
    with pytest.raises(error) as info:
        build()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("tick", "error", "fragment"),
    [
        (-1, ValueError, "t must be an int in [0, 2**53 - 1], got -1"),
        (2**53, ValueError, f"t must be an int in [0, 2**53 - 1], got {2**53}"),
        (2**63, ValueError, f"got {2**63}"),
        (2.0, TypeError, "t must be an int in [0, 2**53 - 1], got 2.0 (float)"),
        (True, TypeError, "got True (bool)"),
        ("3", TypeError, "got '3' (str)"),
    ],
)
@pytest.mark.parametrize("s", [Step(2), Layerwise.gradual_unfreeze(2)], ids=repr)
def test_bad_ticks_raise(s, tick, error, fragment):
    with pytest.raises(error, match=None) as info:
        s(tick)
    assert fragment in str(info.value)


def test_numpy_integer_ticks_are_accepted():
    assert Step(2)(np.int64(3)) is True


def test_bad_timeline_bounds():
    with pytest.raises(ValueError, match="stop must be >= start, got start=5, stop=3"):
        Step(2).timeline(3, start=5)


@pytest.mark.parametrize(
    ("config", "error", "fragment"),
    [
        ({"rho": 2}, ValueError, "must have a 'type' key"),
        ({"type": "Nope"}, ValueError, "config['type'] must be one of"),
        ({"type": "Step", "rho": 2, "period": 3}, ValueError, "unknown keys ['period']"),
        ([("type", "Step")], TypeError, "config must be a mapping"),
        ({"type": "Step", "rho": 0}, ValueError, "rho must be"),
    ],
)
def test_bad_configs_raise(config, error, fragment):
    with pytest.raises(error) as info:
        schedule_from_config(config)
    assert fragment in str(info.value)


# --- properties over random nested schedules ------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(s=binary_schedules)
def test_property_one_element_combinators_are_identity(s):
    line = s.timeline(400)
    assert np.array_equal(Sequential([s]).timeline(400), line)
    assert np.array_equal(And(s).timeline(400), line)
    assert np.array_equal(Or(s).timeline(400), line)


@settings(max_examples=200, deadline=None)
@given(s=binary_schedules, t=ticks)
def test_property_random_schedules_match_the_reference(s, t):
    assert s(t) == frozen_at(s, t)
    assert bool(s.timeline(t + 1, start=t)[0]) == frozen_at(s, t)
    assert (~s)(t) is (not frozen_at(s, t))


@settings(max_examples=150, deadline=None)
@given(s=binary_schedules)
def test_property_config_and_repr_round_trip(s):
    assert schedule_from_config(json.loads(json.dumps(s.to_config()))) == s
    namespace = {
        name: getattr(freezesched.schedules, name) for name in freezesched.schedules.__all__
    }
    assert eval(repr(s), {**namespace, "inf": math.inf}) == s


# --- edge cases at the limits ------------------------------------------------------------


def test_cosine_over_a_very_long_anneal_keeps_its_duty_bound():
    # A relative snapping epsilon let counts drift by one once the integral was ~1e9.
    s = Cosine(begin=0, end=10**12)
    for start in (0, 10**9, 5 * 10**11 - 500, 10**12 - 1000):
        line = ~s.timeline(start + 1000, start=start)
        before = _exact_trainable_count(s, start)
        counts = before + np.concatenate([[0], np.cumsum(line)])
        for k in range(0, 1001, 50):
            t = start + k
            integral = _integral_high_precision(s, t)
            eps = (4 + 10**12) * 2.0**-48
            assert integral - eps <= counts[k] < integral + 1, (t, counts[k], integral)


def _integral_high_precision(s: Cosine, t: int) -> float:
    from fractions import Fraction

    b, e, d0, d1 = s.begin, s.end, Fraction(s.initial_duty), Fraction(s.final_duty)
    x = min(max(t - b, 0), e - b)
    exact = d0 * min(t, b) + (d0 + d1) / 2 * x + d1 * max(t - e, 0)
    return float(exact) + float(d0 - d1) * (e - b) / (2 * math.pi) * math.sin(math.pi * x / (e - b))


def _exact_trainable_count(s: Cosine, t: int) -> int:
    return t - int(s.timeline(t).sum()) if t < 10**6 else s._trainable_count(np.array([t]))[0]


def test_cosine_at_the_largest_tick_after_its_anneal():
    # A float integral could not tell 2**53 from 2**53 + 1 and reported frozen.
    assert Cosine(0, 10, 0.3, 1.0)(MAX_TICK) is False
    assert Cosine(0, 10, 0.0, 0.0)(MAX_TICK) is True
    s = Cosine(0, 10, 0.5, 0.5)
    assert [s(t) for t in range(MAX_TICK - 3, MAX_TICK + 1)] == [
        frozen_at(s, t) for t in range(MAX_TICK - 3, MAX_TICK + 1)
    ]


def test_a_user_class_named_like_a_builtin_cannot_take_over_configs():
    class Step(BinarySchedule):
        def _frozen_at(self, ticks):
            return np.zeros(ticks.shape, dtype=bool)

    assert type(schedule_from_config({"type": "Step", "rho": 2})).__module__.startswith(
        "freezesched"
    )
    with pytest.raises(ValueError, match="freezesched's own"):
        register_schedule(Step)


def test_register_schedule_and_init_false_fields():
    from dataclasses import dataclass, field

    @register_schedule
    @dataclass(frozen=True)
    class EveryOther(BinarySchedule):
        offset: int = 0
        cache: int = field(init=False, default=0, repr=False, compare=False)

        def _frozen_at(self, ticks):
            return (ticks + self.offset) % 2 == 1

    s = EveryOther(1)
    assert s.to_config() == {"type": "EveryOther", "offset": 1}
    assert schedule_from_config({"type": "EveryOther", "offset": 1}) == s

    @dataclass(frozen=True)
    class Unset(BinarySchedule):  # an init=False field nobody sets
        rate: int = field(init=False, repr=False, compare=False)

        def _frozen_at(self, ticks):
            return ticks < 0

    assert Unset().to_config() == {"type": "Unset"}
    with pytest.raises(ValueError, match="already registered"):
        register_schedule(Unset, name="EveryOther")
