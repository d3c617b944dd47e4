"""Adaptive schedules: tables, an independent reference, torch's ReduceLROnPlateau, resume."""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import adaptive_frozen_at, gradient_frozen_count, plateau_switch_ticks
from strategies import binary_schedules

from freezesched.schedules import (
    MAX_TICK,
    And,
    Constant,
    GradientFreeze,
    Layerwise,
    Not,
    Or,
    Plateau,
    Sequential,
    Step,
    UndecidedTickError,
    WarmupThenFreeze,
    commit,
    evaluate,
    schedule_from_config,
    timeline,
)


def feed(schedule, values, *, start=0):
    """Apply (commit) each tick, then observe the value measured after it: a training loop."""
    for i, value in enumerate(values):
        tick = start + i
        commit(schedule, tick)
        schedule.observe(tick, value)


# --- Plateau: tables of expected values -------------------------------------------------


@pytest.mark.parametrize(
    ("plateau", "values", "expected"),
    [
        # The docstring's example: bad at ticks 4 and 5 (patience 1), frozen from 6.
        (Plateau(patience=1), [1.0, 0.8, 0.81, 0.79, 0.8, 0.8], [0, 0, 0, 0, 0, 0, 1]),
        # max, absolute threshold 0.05, no patience, cooldown 1, unlimited switches,
        # starting frozen: flips after the observations of ticks 2, 4 and 7.
        (
            Plateau(
                mode="max",
                patience=0,
                threshold=0.05,
                threshold_mode="abs",
                cooldown=1,
                max_switches=None,
                start_frozen=True,
            ),
            [0.5, 0.6, 0.62, 0.7, 0.7, 0.71, 0.8, 0.8],
            [1, 1, 1, 0, 0, 1, 1, 1, 0],
        ),
        # Negative values, relative threshold 10 %: -1.05 is only 5 % better than -1.0, so
        # it does not count (torch's best * (1 - threshold) would call it an improvement).
        (Plateau(patience=0, threshold=0.1), [-1.0, -1.05, -1.2], [0, 0, 1, 1]),
        # max_switches=1 (default): after the freeze, nothing changes any more.
        (Plateau(patience=0), [1.0, 1.0, 0.5, 0.5, 0.5], [0, 0, 1, 1, 1, 1]),
        # max_switches=2 toggles back once.
        (Plateau(patience=0, max_switches=2), [1.0, 1.0, 0.5, 0.5, 0.5], [0, 0, 1, 1, 0, 0]),
        # A cooldown of 2 keeps the second flip from coming right away.
        (
            Plateau(patience=0, cooldown=2, max_switches=2),
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [0, 0, 1, 1, 1, 0, 0],
        ),
    ],
)
def test_plateau_tables(plateau, values, expected):
    feed(plateau, values)
    assert plateau.timeline(len(values) + 1).astype(int).tolist() == expected
    assert [plateau(t) for t in range(len(values) + 1)] == [bool(x) for x in expected]


def test_plateau_with_no_observation_keeps_its_start():
    s = Plateau(start_frozen=True)
    assert s(0) is True and s.horizon == 1
    commit(s, 9)
    assert s.timeline(10).all() and s.horizon == 10


@settings(max_examples=120, deadline=None)
@given(
    values=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 1e-4, 0.01, 0.5]),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
)
def test_plateau_switches_where_torch_reduce_lr_on_plateau_reduces(
    values, mode, threshold_mode, threshold, patience, cooldown
):
    # torch's ReduceLROnPlateau is an independent implementation of the same rule for
    # positive values: every reduction after the observation of tick k is a switch at k+1.
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    torch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=0.5, patience=patience, threshold=threshold,
        threshold_mode=threshold_mode, cooldown=cooldown, min_lr=0.0, eps=0.0,
    )  # fmt: skip
    reductions = []
    for k, v in enumerate(values):
        before = opt.param_groups[0]["lr"]
        torch_sched.step(v)
        if opt.param_groups[0]["lr"] != before:
            reductions.append(k + 1)
    ours = Plateau(mode=mode, patience=patience, threshold=threshold,
                   threshold_mode=threshold_mode, cooldown=cooldown, max_switches=None)  # fmt: skip
    feed(ours, values)
    assert [tick for tick, _ in ours.changes[1:]] == reductions


# --- composition: children see relative ticks, observations follow them ----------------


def test_warmup_then_plateau_sees_ticks_counted_from_the_warmup():
    p = Plateau(patience=0)
    s = WarmupThenFreeze(3, then=p)
    feed(s, [5.0, 1.0, 1.0, 2.0, 1.0, 1.5])  # ticks 0-2 are the warm-up: p never sees them
    assert p.last_observed == 2  # ticks 3, 4, 5 are p's 0, 1, 2
    assert p.changes == ((0, False), (3, True))  # 1.5 at p's tick 2: frozen from its tick 3
    assert s.timeline(7).astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_sequential_routes_observations_to_the_child_that_owns_the_tick():
    first, second = Plateau(patience=0), Plateau(patience=0, start_frozen=True)
    s = Sequential([first, Step(2), second], boundaries=[3, 5])
    feed(s, [1.0, 2.0, 0.0, 9.0, 9.0, 4.0, 5.0, 6.0])
    assert first.last_observed == 2 and second.last_observed == 2
    assert first.changes == ((0, False), (2, True))
    assert second.changes == ((0, True), (2, False))
    assert s.timeline(9).astype(int).tolist() == [0, 0, 1, 0, 1, 1, 1, 0, 0]


def test_logical_combinators_and_layerwise_route_to_every_child():
    a, b, c = Plateau(patience=0), Plateau(patience=1), Plateau(patience=0)
    s_and, s_or = And(a, Step(2)), Or(~b, Constant(False))
    lw = Layerwise([c, Step(3)])
    values = [3.0, 3.0, 3.0, 3.0]
    for s in (s_and, s_or, lw):
        feed(s, values)
    assert a.changes == ((0, False), (2, True)) and c.changes == a.changes
    assert b.changes == ((0, False), (3, True))
    assert s_and.timeline(5).astype(int).tolist() == [0, 0, 0, 1, 0]
    assert s_or.timeline(5).astype(int).tolist() == [1, 1, 1, 0, 0]
    assert lw(3) == (True, False) and lw(2) == (True, True)


def test_one_element_wrappers_change_nothing_for_adaptive_schedules():
    values = [1.0, 0.5, 0.6, 0.7, 0.8]
    plain = Plateau(patience=1)
    feed(plain, values)
    for wrap in (lambda p: Sequential([p]), lambda p: And(p), lambda p: Or(p), lambda p: ~~p):
        wrapped = wrap(Plateau(patience=1))
        feed(wrapped, values)
        assert wrapped.timeline(6).tolist() == plain.timeline(6).tolist()


@st.composite
def adaptive_schedules(draw):
    """A random composite with one Plateau somewhere inside."""
    plateau = Plateau(
        mode=draw(st.sampled_from(["min", "max"])),
        patience=draw(st.integers(0, 3)),
        threshold=draw(st.sampled_from([0.0, 0.05])),
        threshold_mode=draw(st.sampled_from(["rel", "abs"])),
        cooldown=draw(st.integers(0, 2)),
        max_switches=draw(st.sampled_from([1, 2, None])),
        start_frozen=draw(st.booleans()),
    )
    other = draw(binary_schedules)
    shape = draw(st.integers(0, 6))
    b = draw(st.integers(1, 12))
    if shape == 0:
        return plateau
    if shape == 1:
        return WarmupThenFreeze(draw(st.integers(0, 10)), then=plateau)
    if shape == 2:
        return Sequential([other, plateau], boundaries=[b])
    if shape == 3:
        return Sequential([plateau, other], boundaries=[b])
    if shape == 4:
        return And(other, Not(plateau))
    if shape == 5:
        return Or(WarmupThenFreeze(draw(st.integers(0, 5)), then=plateau), other)
    return Layerwise([other, plateau])


@settings(max_examples=150, deadline=None)
@given(
    s=adaptive_schedules(),
    values=st.lists(st.floats(-10, 10).map(lambda v: round(v, 1)), min_size=1, max_size=30),
    skips=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_random_composites_match_the_reference_for_any_order_of_applying(s, values, skips):
    # Applying is optional between observations: decisions depend on the observations only.
    for tick, value in enumerate(values):
        if skips[tick]:
            commit(s, tick)
        s.observe(tick, value)
    stop = len(values) + 1
    observations = dict(enumerate(values))
    got = timeline(s, stop)
    expected = [adaptive_frozen_at(s, t, observations) for t in range(stop)]
    expected = np.array(expected, dtype=bool).reshape(stop, -1)
    assert got.tolist() == expected.tolist()


# --- determinism, records and resume ----------------------------------------------------


def _roundtrip(schedule):
    """A fresh schedule from the config, with the state loaded, both through JSON."""
    fresh = schedule_from_config(json.loads(json.dumps(schedule.to_config())))
    fresh.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    return fresh


@settings(max_examples=100, deadline=None)
@given(
    s=adaptive_schedules(),
    values=st.lists(st.floats(-10, 10).map(lambda v: round(v, 2)), min_size=2, max_size=30),
    cut=st.integers(0, 29),
)
def test_a_resumed_schedule_decides_bitwise_like_an_uninterrupted_one(s, values, cut):
    cut = min(cut, len(values) - 1)
    uninterrupted = copy.deepcopy(s)
    feed(uninterrupted, values)
    commit(uninterrupted, len(values))

    feed(s, values[:cut])
    resumed = _roundtrip(s)  # saved, then loaded into a freshly built schedule
    assert resumed == s and resumed.state_dict() == s.state_dict()
    feed(resumed, values[cut:], start=cut)
    commit(resumed, len(values))
    stop = len(values) + 1
    assert timeline(resumed, stop).tolist() == timeline(uninterrupted, stop).tolist()
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_past_ticks_return_what_was_decided_then():
    s = Plateau(patience=0)
    feed(s, [1.0, 2.0])  # the second is worse: frozen from tick 2
    assert s.timeline(3).tolist() == [False, False, True]
    commit(s, 10)
    s.observe(10, 0.1)  # a later improvement changes nothing decided
    assert s.timeline(11).tolist() == [False, False] + [True] * 9
    assert [tick for tick, _ in s.changes] == [0, 2]


def test_a_future_tick_is_refused_not_invented():
    s = WarmupThenFreeze(2, then=Plateau(patience=0))
    assert s.horizon == 3  # the warm-up and the Plateau's own tick 0 are known
    assert s.timeline(3).tolist() == [False, False, False]
    with pytest.raises(
        UndecidedTickError, match=r"tick 5 of WarmupThenFreeze\(2, then=Plat"
    ) as info:
        s(5)
    assert info.value.tick == 5 and info.value.horizon == 3 and isinstance(info.value, ValueError)
    assert "first undecided tick is 3" in str(info.value)
    with pytest.raises(UndecidedTickError):
        s.timeline(10)
    with pytest.raises(UndecidedTickError):
        evaluate(s, 4)
    s.observe(2, 1.0)  # measured after tick 2: tick 3 is now known
    assert s.horizon == 4 and s(3) is False
    commit(s, 7)
    assert s.horizon == 8 and s.timeline(8).sum() == 0
    # A range past an undecided part is fine where it does not touch it.
    seq = Sequential([Plateau(), Step(2)], boundaries=[10])
    assert seq.timeline(14, start=10).tolist() == [False, True, False, True]
    with pytest.raises(UndecidedTickError, match="tick 1 of"):
        seq.timeline(14, start=0)


def test_observations_must_come_in_order_and_in_time():
    s = Plateau()
    s.observe(3, 1.0)
    with pytest.raises(ValueError, match=r"after the last observed tick \(3\)"):
        s.observe(3, 1.0)
    with pytest.raises(ValueError, match=r"after the last observed tick \(3\)"):
        s.observe(1, 1.0)
    commit(s, 6)
    with pytest.raises(
        ValueError, match=r"tick 4 .* observed too late: tick 6 was already decided"
    ):
        s.observe(4, 1.0)
    s.observe(6, 1.0)  # tick 7 is not decided yet: fine
    assert s.last_observed == 6


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        (math.nan, ValueError, "must be a finite real number, got nan"),
        (math.inf, ValueError, "must be a finite real number, got inf"),
        (True, TypeError, "must be a finite real number, got True (bool)"),
        ("0.5", TypeError, "got '0.5' (str)"),
        (torch.tensor(0.5), TypeError, "(Tensor)"),
    ],
)
def test_bad_observations_are_refused_and_change_nothing(value, error, fragment):
    a, b = Plateau(), Plateau()
    s = a & b
    s.observe(0, 1.0)
    before = s.state_dict()
    with pytest.raises(error) as info:
        s.observe(1, value)
    assert fragment in str(info.value)
    assert s.state_dict() == before


def test_observing_a_schedule_without_adaptive_parts_is_an_error():
    with pytest.raises(ValueError, match="has no adaptive part to observe"):
        Step(2).observe(0, 1.0)
    assert Step(2).horizon == MAX_TICK + 1 and Step(2).state_dict()["adaptive"] == []
    commit(Step(2), 5)  # a no-op
    # An observation during a warm-up reaches no part: nothing to check, nothing changes.
    s = WarmupThenFreeze(5, then=Plateau())
    s.observe(1, 1.0)
    assert s.adaptive_parts[0].last_observed is None


def test_one_adaptive_object_cannot_be_used_twice_in_a_schedule():
    p = Plateau()
    for build in (
        lambda: And(p, Not(p)),
        lambda: Or(p, WarmupThenFreeze(2, then=p)),
        lambda: Sequential([p, p], boundaries=[3]),
        lambda: Layerwise([p, Step(2), ~p]),
    ):
        with pytest.raises(ValueError, match="must not hold the same adaptive schedule object"):
            build()
    Layerwise([Plateau(), Plateau()])  # two objects, even if equal, are fine


@pytest.mark.parametrize(
    ("build", "error", "fragment"),
    [
        (lambda: Plateau(mode="mean"), ValueError, "mode must be one of ['max', 'min']"),
        (lambda: Plateau(patience=-1), ValueError, "patience must be an int in [0"),
        (lambda: Plateau(patience=1.5), TypeError, "patience must be an int"),
        (
            lambda: Plateau(threshold=-0.1),
            ValueError,
            "threshold must be a finite real number >= 0",
        ),
        (lambda: Plateau(threshold_mode="pct"), ValueError, "threshold_mode must be one of"),
        (lambda: Plateau(cooldown=True), TypeError, "cooldown must be an int"),
        (lambda: Plateau(max_switches=0), ValueError, "max_switches (or None for no limit)"),
        (lambda: Plateau(start_frozen=1), TypeError, "start_frozen must be a bool, got 1"),
        (lambda: GradientFreeze(0, threshold=0.1), ValueError, "stages must be an int in [1"),
        (lambda: GradientFreeze(3), ValueError, "give exactly one of threshold and percentile"),
        (
            lambda: GradientFreeze(3, threshold=0.1, percentile=20),
            ValueError,
            "give exactly one of threshold and percentile",
        ),
        (
            lambda: GradientFreeze(3, percentile=0),
            ValueError,
            "percentile must be a real in (0, 100]",
        ),
        (
            lambda: GradientFreeze(3, percentile=101),
            ValueError,
            "percentile must be a real in (0, 100]",
        ),
        (
            lambda: GradientFreeze(3, threshold=0.1, max_frozen=4),
            ValueError,
            "max_frozen must be an int in [1, 3]",
        ),
    ],
)
def test_bad_parameters_raise_a_clear_error(build, error, fragment):
    with pytest.raises(error) as info:
        build()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "s",
    [
        Plateau(),
        Plateau(
            mode="max",
            patience=2,
            threshold=0.01,
            threshold_mode="abs",
            cooldown=1,
            max_switches=None,
            start_frozen=True,
        ),
        WarmupThenFreeze(5, then=Plateau(patience=1)),
        GradientFreeze(4, percentile=25, max_frozen=3),
        GradientFreeze(2, threshold=0.05),
    ],
    ids=repr,
)
def test_parameters_round_trip_through_configs_and_repr(s):
    config = json.loads(json.dumps(s.to_config()))
    rebuilt = schedule_from_config(config)
    assert rebuilt == s and rebuilt.to_config() == s.to_config()
    assert eval(repr(s), {**vars(__import__("freezesched.schedules", fromlist=["*"]))}) == s
    # Configs carry parameters, not state: a rebuilt schedule starts with no observations.
    assert all(part.last_observed is None for part in rebuilt.adaptive_parts)


def test_copies_and_pickles_carry_the_record():
    s = WarmupThenFreeze(1, then=Plateau(patience=0))
    feed(s, [1.0, 1.0, 2.0])
    for other in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert other.state_dict() == s.state_dict()
        assert other.timeline(4).tolist() == s.timeline(4).tolist()
        other.observe(3, 0.0)  # independent records
    assert s.adaptive_parts[0].last_observed == 1


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda st: st.update(version=2), "state['version'] must be 1"),
        (lambda st: st.update(adaptive=[]), "one entry per adaptive part"),
        (lambda st: st["adaptive"][0]["config"].update(patience=7), "a state only loads into"),
        (lambda st: st["adaptive"][0].update(changes=[[1, 0]]), "must start at tick 0"),
        (lambda st: st["adaptive"][0].update(changes=[[0, 0], [2, 0]]), "strictly increasing"),
        (lambda st: st["adaptive"][0].update(horizon=1), "must be past every change"),
        (lambda st: st["adaptive"][0].update(last_observed=None), "must only change after"),
        (lambda st: st["adaptive"][0]["counters"].update(best="x"), "['best'] must be a number"),
        (
            lambda st: st["adaptive"][0]["counters"].update(switches=5),
            "['switches'] must be an int",
        ),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(mutate, fragment):
    s = Plateau(patience=0)
    feed(s, [1.0, 2.0, 3.0])
    state = json.loads(json.dumps(s.state_dict()))
    mutate(state)
    target = Plateau(patience=0)
    target.observe(0, 5.0)
    before = target.state_dict()
    with pytest.raises(ValueError) as info:
        target.load_state_dict(state)
    assert fragment in str(info.value)
    assert target.state_dict() == before


# --- GradientFreeze ------------------------------------------------------------------------


def test_gradient_freeze_table():
    s = GradientFreeze(3, threshold=0.1)
    feed(s, [
        [1.0, 2.0, 4.0],      # reference
        [1.05, 2.5, 4.1],     # rates 0.05, 0.25, 0.025: stage 0 only (stage 1 blocks 2)
        [None, 2.6, 4.15],    # rates -, 0.04, 0.0122: stages 1 and 2
        [None, None, None],   # all frozen: nothing to check
    ])  # fmt: skip
    assert s.timeline(5).astype(int).tolist() == [
        [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1],
    ]  # fmt: skip
    assert s.changes == ((0, 0), (2, 1), (3, 3))
    assert s.rates == (None, None, None)


def test_gradient_freeze_percentile_and_max_frozen():
    s = GradientFreeze(4, percentile=50, max_frozen=2)
    # rates 0.1, 0.2, 0.3, 0.4: the median is 0.25, so stages 0 and 1 freeze.
    feed(s, [[1.0, 1.0, 1.0, 1.0], [1.1, 1.2, 1.3, 1.4], [None, None, 1.3, 1.4]])
    assert s(2) == (True, True, False, False)
    assert s(3) == (True, True, False, False)  # max_frozen=2: stage 2 never freezes
    assert s.rates == (None, None, None, None)  # nothing can freeze: not measured


@settings(max_examples=100, deadline=None)
@given(
    stages=st.integers(1, 5),
    rule=st.one_of(
        st.floats(0.0, 0.5).map(lambda x: {"threshold": round(x, 3)}),
        st.floats(1.0, 100.0).map(lambda x: {"percentile": round(x, 1)}),
    ),
    max_frozen=st.one_of(st.none(), st.integers(1, 5)),
    data=st.data(),
)
def test_gradient_freeze_matches_the_reference_and_freezes_front_to_back(
    stages, rule, max_frozen, data
):
    if max_frozen is not None:
        max_frozen = min(max_frozen, stages)
    s = GradientFreeze(stages, max_frozen=max_frozen, **rule)
    norms = st.lists(st.floats(0.0, 4.0).map(lambda x: round(x, 2)), min_size=stages,
                     max_size=stages)  # fmt: skip
    observations = {}
    for tick in range(data.draw(st.integers(1, 12))):
        values = data.draw(norms)
        frozen = sum(commit(s, tick))
        given_values = [None] * frozen + values[frozen:]
        s.observe(tick, given_values)
        observations[tick] = values
    stop = len(observations) + 1
    line = timeline(s, stop)
    counts = [gradient_frozen_count(s, t, observations) for t in range(stop)]
    assert line.sum(axis=1).tolist() == counts
    for row in line:  # a prefix of the stages, front first
        k = int(row.sum())
        assert row.tolist() == [True] * k + [False] * (stages - k)
    assert counts == sorted(counts)  # a frozen stage stays frozen


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        ([1.0, 2.0], ValueError, "sequence of 3 gradient norms, one per stage; got 2"),
        ("abc", TypeError, "sequence of 3 gradient norms"),
        ([1.0, math.nan, 1.0], ValueError, "gradient norm of trainable stage 1 must be a finite"),
        ([1.0, -1.0, 1.0], ValueError, "trainable stage 1 must be a finite real number >= 0"),
        (2.0, TypeError, "sequence of 3 gradient norms"),
    ],
)
def test_gradient_freeze_refuses_bad_norms(value, error, fragment):
    s = GradientFreeze(3, threshold=0.1)
    with pytest.raises(error) as info:
        s.observe(0, value)
    assert fragment in str(info.value)


def test_gradient_freeze_resumes_through_json_exactly():
    values = [[1.0, 2.0, 3.0], [1.0, 2.5, 3.0], [None, 2.5, 3.1], [None, None, 3.1]]
    full = GradientFreeze(3, percentile=40)
    feed(full, values)
    part = GradientFreeze(3, percentile=40)
    feed(part, values[:2])
    resumed = _roundtrip(part)
    feed(resumed, values[2:], start=2)
    assert resumed.state_dict() == full.state_dict()
    assert timeline(resumed, 5).tolist() == timeline(full, 5).tolist()


def test_plateau_reference_agrees_with_the_docstring_example():
    # The reference itself, against the hand-computed example (so it is not vacuous).
    assert plateau_switch_ticks(
        Plateau(patience=1), dict(enumerate([1.0, 0.8, 0.81, 0.79, 0.8, 0.8]))
    ) == [6]
