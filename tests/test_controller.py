"""FreezeController: idempotent apply, optimizer-state policy, state dicts and resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import bitwise_equal, changed, flags, loss_fn, make_net, runs_in_eval, tensors
from torch import nn

from freezesched import (
    Constant,
    FreezeController,
    FreezePolicy,
    FrozenStageGuard,
    Layerwise,
    Step,
    UnfreezeAt,
    WarmupThenFreeze,
    is_frozen,
)


def test_apply_is_idempotent_and_reports_state():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Step(2), "neck": Constant(False)})
    assert ctrl.tick is None and ctrl.frozen == {"backbone": False, "neck": False}
    state_after_first = None
    for _ in range(3):
        assert ctrl.apply(1) == {"backbone": True, "neck": False}
        if state_after_first is None:
            state_after_first = flags(model)
        assert flags(model) == state_after_first
    assert ctrl.apply(2) == {"backbone": False, "neck": False}
    ctrl.release()


def test_frozen_epochs_survive_model_train_and_many_steps():
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    ctrl = FreezeController(model, {"backbone": Step(3)}, optimizers=opt)
    before = None
    for epoch in range(3):
        ctrl.apply(epoch)
        if epoch == 1:
            before = tensors(model.backbone)
        for step in range(3):
            model.train()  # trainers call this at the start of every epoch
            loss_fn(model, 10 * epoch + step).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        if epoch == 0:
            assert all(p.grad is not None for p in model.backbone.parameters())
    assert bitwise_equal(tensors(model.backbone), before)
    ctrl.apply(3)
    assert all(p.requires_grad for p in model.parameters())
    ctrl.release()


@pytest.mark.parametrize(
    ("policy", "opt_factory", "key"),
    [
        ("keep", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum_buffer"),
        ("reset", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum_buffer"),
        ("keep", lambda p: torch.optim.Adam(p, lr=0.01), "exp_avg"),
        ("reset", lambda p: torch.optim.Adam(p, lr=0.01), "exp_avg"),
    ],
)
def test_optimizer_state_policy_on_unfreeze(policy, opt_factory, key):
    model = make_net()
    opt = opt_factory(list(model.parameters()))
    ctrl = FreezeController(model, {"backbone": Step(2)}, optimizers=opt, on_unfreeze=policy)
    ctrl.apply(0)
    loss_fn(model, 0).backward()
    opt.step()
    opt.zero_grad()
    w = model.backbone[0][0].weight
    stale = opt.state[w][key].clone()
    ctrl.apply(1)  # frozen: state untouched while frozen
    assert torch.equal(opt.state[w][key], stale)
    ctrl.apply(2)  # unfrozen again
    if policy == "reset":
        assert w not in opt.state
        assert model.head.weight in opt.state  # only what was frozen is reset
    else:
        assert torch.equal(opt.state[w][key], stale)
    ctrl.release()


def test_reset_does_not_touch_parameters_still_frozen_elsewhere():
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn(model, 0).backward()
    opt.step()
    ctrl = FreezeController(
        model, {"backbone": Step(2), "backbone.0": Constant(True)}, optimizers=opt,
        on_unfreeze="reset",
    )  # fmt: skip
    ctrl.apply(1)
    ctrl.apply(2)
    assert model.backbone[0][0].weight in opt.state and is_frozen(model.backbone[0][0].weight)
    assert model.backbone[1][0].weight not in opt.state
    ctrl.release()


def test_layerwise_targets_and_release_restores_exactly():
    model = make_net()
    before = flags(model)
    names = ("backbone.0", "backbone.1", "backbone.2")
    ctrl = FreezeController(model, {names: Layerwise.gradual_unfreeze(3, begin=1)})
    assert ctrl.apply(0) == dict.fromkeys(names, True)
    assert ctrl.apply(2) == {"backbone.0": True, "backbone.1": False, "backbone.2": False}
    assert not model.backbone[0][0].weight.requires_grad
    assert model.backbone[1][0].weight.requires_grad
    ctrl.release()
    assert flags(model) == before and ctrl.tick is None


def test_overlapping_targets_unfreezing_in_any_order_restore_exactly():
    model = make_net()
    before = flags(model)
    ctrl = FreezeController(model, {"backbone": Step(2), "backbone.0": WarmupThenFreeze(0)})
    ctrl.apply(1)  # both frozen
    ctrl.apply(2)  # the outer one unfreezes first, the inner stays frozen
    assert not model.backbone[0][0].weight.requires_grad
    assert runs_in_eval(model.backbone[0][1])
    assert model.backbone[1][0].weight.requires_grad
    ctrl.release()
    assert flags(model) == before


def test_context_manager_releases_even_on_error():
    model = make_net()
    before = flags(model)
    with pytest.raises(KeyError), FreezeController(model, {"backbone": Step(2)}) as ctrl:
        ctrl.apply(1)
        raise KeyError("training crashed")
    assert flags(model) == before


def test_schedules_may_be_config_dicts_and_plain_functions():
    model = make_net()
    ctrl = FreezeController(
        model,
        {"backbone": {"type": "WarmupThenFreeze", "warmup": 2, "then": {"type": "Step", "rho": 3}},
         "neck": lambda epoch: epoch >= 1},
    )  # fmt: skip
    assert [ctrl.apply(t)["backbone"] for t in range(6)] == [False, False, False, True, True, False]
    assert ctrl.frozen["neck"] is True
    assert ctrl.state_dict()["targets"][1]["schedule"] is None
    ctrl.release()


# --- state dicts and resume -----------------------------------------------------------------


def test_state_dict_is_versioned_plain_data():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Step(math.inf)}, on_unfreeze="reset")
    ctrl.apply(4)
    state = ctrl.state_dict()
    assert state == {
        "version": 2,
        "tick": 4,
        "on_unfreeze": "reset",
        "targets": [{"modules": ["backbone"], "schedule": {"type": "Step", "rho": math.inf}}],
        "adaptive": [None],
        "gradient_signals": {},
        "last_observed": None,
    }
    ctrl.release()


def test_a_state_saved_by_version_1_still_loads():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Step(3)})
    ctrl.load_state_dict({
        "version": 1, "tick": 4, "on_unfreeze": "reset",
        "targets": [{"modules": ["backbone"], "schedule": {"type": "Step", "rho": 3}}],
    })  # fmt: skip
    assert ctrl.tick == 4 and ctrl.frozen == {"backbone": True}
    ctrl.release()


def test_load_state_dict_rederives_the_freeze_state():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Step(3)})
    ctrl.apply(4)
    saved = ctrl.state_dict()
    ctrl.release()
    other = FreezeController(model, {"backbone": Step(3)})
    other.load_state_dict(saved)
    assert other.tick == 4 and other.frozen == {"backbone": True}
    assert not model.backbone[0][0].weight.requires_grad
    other.release()


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ({"version": 99, "tick": 1}, "state['version'] must be 1 or 2, got 99"),
        ([1, 2], "state['version'] must be 1 or 2, got [1, 2]"),
        (
            {"version": 1, "tick": 1, "targets": [{"modules": ["backbone"], "schedule": None}]},
            "state['targets'] must equal this controller's modules and schedules",
        ),
    ],
)
def test_load_state_dict_rejects_mismatches(state, fragment):
    model = make_net()
    before = flags(model)
    ctrl = FreezeController(model, {"backbone": Step(3)})
    with pytest.raises(ValueError) as info:
        ctrl.load_state_dict(state)
    assert fragment in str(info.value)
    assert flags(model) == before


def _run(model, opt, ctrl, guard, epochs, steps):
    for epoch in epochs:
        ctrl.apply(epoch)
        for step in range(steps):
            with guard(model.neck, epoch * steps + step):
                loss_fn(model, epoch * steps + step).backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_resume_mid_run_is_bitwise_identical_to_an_uninterrupted_run(opt_name):
    def build():
        model = make_net(seed=3)
        if opt_name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ctrl = FreezeController(
            model, {"backbone": WarmupThenFreeze(1, then=Step(2))}, optimizers=opt,
            on_unfreeze="reset",
        )  # fmt: skip
        guard = FrozenStageGuard(Step(3))  # the neck, per iteration
        return model, opt, ctrl, guard

    epochs, steps, stop = 6, 2, 3
    torch.manual_seed(0)
    model, opt, ctrl, guard = build()
    _run(model, opt, ctrl, guard, range(epochs), steps)
    uninterrupted = tensors(model)
    ctrl.release()

    torch.manual_seed(0)
    model, opt, ctrl, guard = build()
    _run(model, opt, ctrl, guard, range(stop), steps)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "freeze": ctrl.state_dict(),
         "rng": torch.get_rng_state()},
        buffer,
    )  # fmt: skip
    ctrl.release()
    del model, opt, ctrl, guard

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, opt, ctrl, guard = build()
    model.load_state_dict(checkpoint["model"])
    ctrl.load_state_dict(checkpoint["freeze"])  # freeze first: it never touches optimizer state
    opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    _run(model, opt, ctrl, guard, range(stop, epochs), steps)
    resumed = tensors(model)
    ctrl.release()
    assert bitwise_equal(resumed, uninterrupted), changed(resumed, uninterrupted)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"schedules": {"backbone.9": Step(2)}}, ValueError,
         "schedules key 'backbone.9' must name a submodule of the Net; it has none called"),
        ({"schedules": {}}, TypeError, "schedules must be a non-empty mapping"),
        ({"schedules": {3: Step(2)}}, TypeError, "schedules keys must be a submodule name"),
        ({"schedules": {"backbone": 5}}, TypeError, "schedules['backbone'] must be a freezesched"),
        ({"schedules": {("backbone.0", "backbone.1"): Layerwise.gradual_unfreeze(3)}},
         ValueError, "needs one entry (a name or a group of names) per stage, got 2"),
        ({"schedules": {"backbone": {"type": "Step", "rho": 0}}}, ValueError, "rho must be"),
        ({"schedules": {"backbone": Step(2)}, "on_unfreeze": "zero"}, ValueError,
         "on_unfreeze must be one of ['keep', 'reset'], got 'zero' (str)"),
        ({"schedules": {"backbone": Step(2)}, "optimizers": ["sgd"]}, TypeError,
         "optimizers[0] must be a torch Optimizer"),
        ({"schedules": {"backbone": Step(2)}, "bn": "off"}, ValueError, "bn must be"),
        ({"schedules": {"backbone": Step(2)}, "trainable": ["*lora*"]}, ValueError,
         "matched nothing: ['*lora*']"),
    ],
)  # fmt: skip
def test_bad_input_raises_clearly_and_touches_nothing(kwargs, error, fragment):
    model = make_net()
    before_flags, before_tensors = flags(model), tensors(model)
    with pytest.raises(error) as info:
        FreezeController(model, **kwargs)
    assert fragment in str(info.value)
    assert flags(model) == before_flags and bitwise_equal(tensors(model), before_tensors)


def test_bad_model_and_tick():
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got 'net' \(str\)"):
        FreezeController("net", {"backbone": Step(2)})
    model = make_net()
    before = flags(model)
    ctrl = FreezeController(model, {"backbone": Step(2)})
    with pytest.raises(ValueError, match=r"tick must be an int in \[0, 2\*\*53 - 1\], got -3"):
        ctrl.apply(-3)
    assert flags(model) == before and ctrl.tick is None


def test_names_resolve_inside_a_data_parallel_wrapper():
    model = make_net()
    wrapped = torch.nn.DataParallel(model)  # on CPU it simply wraps
    ctrl = FreezeController(wrapped, {"backbone": Step(2)})
    assert ctrl.apply(1) == {"backbone": True}
    assert not model.backbone[0][0].weight.requires_grad
    loss_fn(wrapped, 0).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    ctrl.release()


def test_a_tree_changed_inside_a_module_that_stays_frozen_is_frozen_again():
    # Between ticks the user grows, re-assigns or swaps parts of a frozen module: the next
    # apply() freezes what the module holds now, and release restores every flag.
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Linear(2, 1))
    ctrl = FreezeController(model, {"0": Constant(True)})
    ctrl.apply(0)
    backbone = model[0]
    backbone.append(nn.Linear(2, 2))  # a layer added
    backbone[0].weight = nn.Parameter(torch.ones(2, 2))  # a weight re-assigned
    old = backbone[1]
    new = nn.BatchNorm1d(2)  # a norm layer replaced around the same statistics
    new.running_mean, new.running_var = old.running_mean, old.running_var
    backbone[1] = new
    ctrl.apply(1)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model[1].parameters())
    model.train()
    before = new.running_mean.clone()
    model(torch.randn(8, 2) + 5)
    assert torch.equal(before, new.running_mean)  # pinned in eval: no drift
    ctrl.release()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.changes_flags  # the loaded parameters are new: their flag is the replaced ones'
def test_load_state_dict_assign_inside_a_frozen_phase_restores_the_flags():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    ctrl = FreezeController(model, {"0": Constant(True)})
    ctrl.apply(0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    ctrl.apply(1)
    assert not model[0].weight.requires_grad and ctrl.frozen == {"0": True}
    ctrl.release()
    assert all(p.requires_grad for p in model.parameters())


def test_a_module_that_stays_frozen_stays_frozen_when_planning_it_again_fails():
    from freezesched.freezing import FastFrozen

    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(2, 2)), "b": nn.Linear(2, 2)})
    policy = FreezePolicy(fast=FastFrozen())
    ctrl = FreezeController(model, {"a": Constant(True), "b": Constant(False)}, policy=policy)
    ctrl.apply(0)
    model["a"].append(torch.jit.script(nn.Linear(2, 2)))  # fast mode cannot copy this
    with pytest.raises(ValueError, match="TorchScript"):
        ctrl.apply(1)
    assert ctrl.frozen == {"a": True, "b": False}  # the old hold was kept
    assert not model["a"][0].weight.requires_grad
    ctrl.release()
    assert all(p.requires_grad for p in model.parameters())


def test_a_scripted_frozen_module_is_not_disturbed_between_ticks():
    # A TorchScript tree cannot be checked cheaply, so it is planned every tick; an
    # unchanged plan keeps its hold (a released one would report the loaded buffers).
    model = nn.Sequential(
        nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.BatchNorm1d(2))), nn.Linear(2, 2)
    )
    ctrl = FreezeController(model, {"0": Constant(True)})
    ctrl.apply(0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    ctrl.apply(1)
    model.train()
    norm = model[0][1]
    before = norm.running_mean.clone()
    model(torch.randn(4, 2))
    assert torch.equal(before, norm.running_mean)
    # Loading wrote the scripted buffers while frozen, which the check at the end reports.
    with pytest.raises(RuntimeError, match="load_state_dict"):
        ctrl.release()


def test_a_parameter_a_new_plan_unfreezes_loses_its_stale_optimizer_state():
    shared = nn.Linear(2, 2)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctrl = FreezeController(
        model,
        {"a": WarmupThenFreeze(1, then=Constant(True)), "b": Constant(False)},
        optimizers=opt,
    )
    ctrl.apply(0)
    model["b"](torch.randn(3, 2)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert opt.state[shared.weight]
    ctrl.apply(1)  # "a" frozen: so is the shared layer
    assert not shared.weight.requires_grad
    model["a"][0] = nn.Linear(2, 2)  # untied: the shared layer is only in trainable "b" now
    ctrl.apply(2)
    assert shared.weight.requires_grad
    assert not opt.state.get(shared.weight)  # "reset": no momentum from before the freeze
    ctrl.release()


@pytest.mark.changes_flags  # the loaded parameters are new: their flag is the replaced ones'
def test_loading_with_assign_while_frozen_then_unfreezing_is_not_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    ctrl = FreezeController(model, {"0": UnfreezeAt(1)})
    ctrl.apply(0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert ctrl.apply(1) == {"0": False}
    assert all(p.requires_grad for p in model.parameters())
    ctrl.release()
