"""Adaptive schedules applied to a model: the controller, the guard, gradient signals, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import batch, make_net, run_ranks, tensors
from torch import nn

from freezesched import FreezeController, FrozenStageGuard, Step, WarmupThenFreeze, is_frozen
from freezesched.freezing import GradientSignal
from freezesched.schedules import GradientFreeze, Plateau, UndecidedTickError

STAGES = ("backbone.0", "backbone.1", "backbone.2")


def test_observe_routes_the_metric_and_apply_decides():
    model = make_net()
    plateau = Plateau(patience=0)
    ctrl = FreezeController(model, {"backbone": WarmupThenFreeze(1, then=plateau), "neck": Step(2)})
    assert ctrl.signals == {"metric"}
    frozen = []
    for epoch, val_loss in enumerate([3.0, 2.0, 1.0, 1.5, 0.5]):
        frozen.append(ctrl.apply(epoch)["backbone"])
        ctrl.observe(epoch, val_loss)
    # The plateau sees epochs 1.. as its 0..: 2.0, 1.0, 1.5 (bad): frozen from epoch 4.
    assert frozen == [False, False, False, False, True]
    assert plateau.changes == ((0, False), (3, True))
    assert ctrl.apply(5)["backbone"] is True
    ctrl.release()


def test_observed_values_may_be_one_element_tensors():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Plateau(patience=0, mode="max")})
    ctrl.apply(0)
    ctrl.observe(0, torch.tensor(0.5))
    ctrl.apply(1)
    ctrl.observe(1, torch.tensor([0.4]))
    assert ctrl.apply(2) == {"backbone": True}
    ctrl.release()


@pytest.mark.parametrize(
    ("schedules", "call", "error", "fragment"),
    [
        ({"backbone": Step(2)}, lambda c: c.observe(0, 1.0), ValueError, "none of this controller"),
        ({"backbone": Step(2)}, lambda c: c.record_gradients(), ValueError, "none of this"),
        ({"backbone": Plateau()}, lambda c: c.observe(0, "1.0"), TypeError, "got '1.0' (str)"),
        ({"backbone": Plateau()}, lambda c: c.observe(0, math.nan), ValueError, "got nan"),
        ({"backbone": Plateau()}, lambda c: c.observe(0, True), TypeError, "not a bool"),
    ],
)
def test_bad_observations_are_refused(schedules, call, error, fragment):
    ctrl = FreezeController(make_net(), schedules)
    ctrl.apply(0)
    with pytest.raises(error) as info:
        call(ctrl)
    assert fragment in str(info.value)
    ctrl.release()


def test_a_late_observation_is_refused_and_changes_nothing():
    ctrl = FreezeController(make_net(), {"backbone": Plateau(), "neck": Plateau()})
    ctrl.apply(3)
    with pytest.raises(ValueError, match=r"before the last applied tick \(3\)"):
        ctrl.observe(2, 1.0)
    ctrl.observe(3, 1.0)
    with pytest.raises(ValueError, match="after the last observed tick"):
        ctrl.observe(3, 1.0)
    states = ctrl.state_dict()["adaptive"]
    assert [s["adaptive"][0]["last_observed"] for s in states] == [3, 3]
    ctrl.release()


def test_adaptive_objects_cannot_be_shared_or_hidden_from_the_gradient_signal():
    p = Plateau()
    with pytest.raises(ValueError, match="must not share an adaptive schedule object"):
        FreezeController(make_net(), {"backbone": p, "neck": ~p})
    g = GradientFreeze(1, threshold=0.1)
    with pytest.raises(TypeError, match="must be a BinarySchedule"):
        FreezeController(make_net(), {"backbone": WarmupThenFreeze(2, then=g)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has 3 stages and needs one entry"):
        FreezeController(make_net(), {"backbone": GradientFreeze(3, threshold=0.1)})


def test_the_guard_decides_each_tick_it_applies():
    model = make_net()
    plateau = Plateau(patience=0)
    guard = FrozenStageGuard(plateau)
    with pytest.raises(UndecidedTickError):
        guard.decide(1)  # reading only: not decided yet
    seen = []
    for epoch, metric in enumerate([1.0, 2.0, 0.0]):
        with guard(model.backbone, epoch):
            seen.append(is_frozen(model.backbone))
        plateau.observe(epoch, metric)
    assert seen == [False, False, True]
    assert guard.decide(3) == (True,)


# --- the gradient signal -------------------------------------------------------------------


def test_gradient_signal_is_the_mean_norm_of_each_stage():
    model = make_net()
    signal = GradientSignal([model.backbone[0], [model.backbone[1], model.backbone[2]]])
    expected = [[], []]
    for step in range(3):
        nn.functional.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        signal.record()
        groups = [model.backbone[0], nn.ModuleList([model.backbone[1], model.backbone[2]])]
        for i, group in enumerate(groups):  # by hand: one long vector per stage
            flat = torch.cat([p.grad.reshape(-1) for p in group.parameters()])
            expected[i].append(float(torch.linalg.vector_norm(flat.double())))
        model.zero_grad()
    assert signal.steps == 3
    got = signal.take()
    want = [sum(v) / 3 for v in expected]
    assert got == pytest.approx(want, rel=1e-6)
    assert signal.take() is None and signal.steps == 0


def test_gradient_signal_leaves_out_steps_without_a_gradient_and_saves_exactly():
    model = make_net()
    signal = GradientSignal([model.backbone, model.neck])
    with FrozenStageGuard(Step(math.inf))(model.backbone, 0):
        nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    signal.record()  # the backbone has no gradient in this step
    state = json.loads(json.dumps(signal.state_dict()))
    assert state["counts"] == [0, 1] and state["steps"] == 1
    other = GradientSignal([model.backbone, model.neck])
    other.load_state_dict(state)
    a, b = signal.take(), other.take()
    assert math.isnan(a[0]) and math.isnan(b[0]) and a[1] == b[1] > 0
    with pytest.raises(ValueError, match="GradientSignal state for 2 stages"):
        other.load_state_dict({"sums": [1.0], "counts": [1], "steps": 1})


def test_gradient_signal_measures_one_call_in_every():
    model = make_net()
    signal = GradientSignal([model.neck], every=10)
    by_hand = []
    for step in range(25):
        nn.functional.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        signal.record()
        if step % 10 == 0:  # calls 0, 10 and 20 measure
            by_hand.append(
                float(
                    torch.linalg.vector_norm(
                        torch.cat([p.grad.reshape(-1) for p in model.neck.parameters()]).double()
                    )
                )
            )
        model.zero_grad()
    assert signal.steps == 3 and signal.state_dict()["calls"] == 25
    assert signal.take() == pytest.approx((sum(by_hand) / 3,), rel=1e-6)
    with pytest.raises(ValueError, match=r"every must be an int in \[1"):
        GradientSignal([model.neck], every=0)


def test_gradient_freeze_through_the_controller_freezes_front_to_back():
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = GradientFreeze(3, percentile=100, every=1)  # every finite rate: all freeze
    ctrl = FreezeController(model, {STAGES: schedule}, optimizers=opt)
    assert ctrl.signals == {"gradient_norm"}
    frozen = []
    for epoch in range(3):
        frozen.append(tuple(ctrl.apply(epoch).values()))
        for i in range(2):
            nn.functional.cross_entropy(model(batch(i)[0]), batch(i)[1]).backward()
            ctrl.record_gradients()
            opt.step()
            opt.zero_grad()
    # epoch 0 sets the reference; epoch 1's rates freeze all three from epoch 2.
    assert frozen == [(False,) * 3, (False,) * 3, (True,) * 3]
    assert schedule.changes == ((0, 0), (2, 3))
    ctrl.release()


# --- resume: bitwise the same decisions and weights ------------------------------------------


def _metric(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        x, y = batch(999, n=16)
        value = float(nn.functional.cross_entropy(model(x), y))
    model.train()
    return value


def _run(epochs, *, start=0, state=None, strip=False):
    """Train; the backbone follows a Plateau, its stages a GradientFreeze. Return the end."""
    model = make_net(seed=1, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    schedules = {
        "neck": WarmupThenFreeze(1, then=Plateau(patience=1, threshold=0.02)),
        STAGES: GradientFreeze(3, threshold=0.2, every=2),
    }
    ctrl = FreezeController(model, schedules, optimizers=opt, on_unfreeze="reset")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        saved = json.loads(json.dumps(state["ctrl"]))
        if strip:  # a checkpoint without the adaptive records
            saved = {k: v for k, v in saved.items() if k not in ("adaptive", "gradient_signals")}
        ctrl.load_state_dict(saved, strict=not strip)
    decisions = []
    for epoch in range(start, epochs):
        decisions.append(tuple(ctrl.apply(epoch).values()))
        for i in range(3):
            x, y = batch(10 * epoch + i)
            nn.functional.cross_entropy(model(x), y).backward()
            ctrl.record_gradients()
            opt.step()
            opt.zero_grad()
        ctrl.observe(epoch, _metric(model))
    saved = {"model": tensors(model), "opt": opt.state_dict(), "ctrl": ctrl.state_dict()}
    saved["model"] = {k[2:]: v for k, v in saved["model"].items()}
    ctrl.release()
    return decisions, saved


def test_a_resumed_run_decides_and_trains_bitwise_like_an_uninterrupted_one():
    full, end = _run(6)
    # The run exercises both schedules, and both decide after the cut at 3: the neck
    # freezes at epoch 4; stage 0 at epoch 4 (stage 2 settled too, but stage 1, in front
    # of it, had not), stages 1 and 2 at epoch 5.
    assert [d[0] for d in full] == [False] * 4 + [True] * 2
    assert [sum(d[1:]) for d in full] == [0, 0, 0, 0, 1, 3]
    first, middle = _run(3)
    # The tick's norms are not observed yet, and every=2 over 3 steps per epoch makes
    # which steps are measured depend on the calls before: both are in the state.
    signal = middle["ctrl"]["gradient_signals"]["1"]
    assert signal["calls"] == 9 and signal["steps"] == 2  # calls 6 and 8 of epoch 2
    rest, resumed = _run(6, start=3, state=middle)
    assert first + rest == full
    assert all(torch.equal(resumed["model"][k], end["model"][k]) for k in end["model"])
    assert resumed["ctrl"]["adaptive"] == end["ctrl"]["adaptive"]

    # Control: the same checkpoint without the adaptive records decides differently.
    rest, _ = _run(6, start=3, state=middle, strip=True)
    assert first + rest != full


def test_a_state_with_a_record_that_does_not_fit_changes_nothing():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Plateau(patience=0), "neck": Plateau()})
    ctrl.apply(0)
    ctrl.observe(0, 1.0)
    state = json.loads(json.dumps(ctrl.state_dict()))
    state["adaptive"][1]["adaptive"][0]["horizon"] = 0  # corrupt the second record
    other = FreezeController(model, {"backbone": Plateau(patience=0), "neck": Plateau()})
    other.apply(0)
    before = other.state_dict()
    with pytest.raises(ValueError, match="horizon"):
        other.load_state_dict(state)
    assert other.state_dict() == before
    ctrl.release()
    other.release()


# --- distributed: every rank takes the same decision ---------------------------------------


def test_two_ranks_with_different_metrics_take_the_same_decisions(tmp_path):
    import adaptive_ddp_worker

    outcomes = run_ranks(adaptive_ddp_worker.run, 2, 150, str(tmp_path / "rendezvous"))
    decisions = [payload["decisions"] for payload in outcomes.values()]
    assert decisions[0] == decisions[1]
    # The ranks' values differ (adaptive_ddp_worker.LOCAL); their means, 1.5, 1.0, 0.75,
    # 0.76, 0.77, first fail to improve after epoch 3, so with patience 0 the backbone
    # freezes from epoch 4 on both ranks.
    assert [d["backbone"] for d in decisions[0]] == [False, False, False, False, True, True]
    # Alone, rank 1's values would have frozen it from epoch 3 (its own plateau).
    assert outcomes[1]["alone"] == [False, False, False, True, True, True]
    for payload in outcomes.values():
        assert payload["observed"] == pytest.approx([1.5, 1.0, 0.75, 0.76, 0.77])
        assert payload["gradient_decisions_agree"] is True
        # percentile=100, max_frozen=1: the neck freezes once two observations give rates.
        assert payload["neck"] == [False, False, True, True, True, True]
        assert payload["params_out_of_sync"] == 0
        assert "every rank must observe the same tick" in payload["disagree"]
