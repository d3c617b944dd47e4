"""Trainable exceptions decided by code (TrainableRule), and the controller's refusal to
call a module "trainable" when everything in it was frozen outside freezesched."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import bitwise_equal, loss_fn, make_net, tensors
from torch import nn

from freezesched import Constant, FreezeController, FreezePolicy, FrozenStageGuard, Step, freeze
from freezesched.freezing import TrainableRule


class Wrapped(nn.Module):
    """A layer that wraps its base layer and owns a low-rank adapter: what peft builds."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.down = nn.Linear(base.in_features, 2, bias=False)
        self.up = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.up(self.down(x))


@dataclass(frozen=True)
class AdaptersOfWrapped(TrainableRule):
    """The adapter children of every ``Wrapped`` (neither a name nor a type says it)."""

    def matches(self, name: str, module: nn.Module, parent: nn.Module) -> bool:
        return isinstance(parent, Wrapped) and module is not parent.base_layer


def wrapped_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Wrapped(nn.Linear(4, 4)), nn.ReLU(), Wrapped(nn.Linear(4, 3)))


def test_a_rule_exempts_the_adapters_and_freezes_the_base_layer_they_wrap():
    model = wrapped_model()
    with freeze(model, trainable=[AdaptersOfWrapped()]):
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        model(torch.randn(5, 4)).sum().backward()
    assert trainable == ["0.down.weight", "0.up.weight", "2.down.weight", "2.up.weight"]
    assert model[0].base_layer.weight.grad is None
    assert model[0].down.weight.grad is not None
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_a_rule_gets_the_name_module_and_parent_and_is_never_asked_about_the_root():
    calls: list[tuple[str, str, str]] = []

    @dataclass(frozen=True)
    class Spy(TrainableRule):
        def matches(self, name: str, module: nn.Module, parent: nn.Module) -> bool:
            calls.append((name, type(module).__name__, type(parent).__name__))
            return name == "0.down"

    model = wrapped_model()
    with freeze(model, trainable=[Spy()]):
        pass
    assert calls[0] == ("0", "Wrapped", "Sequential")
    assert ("0.down", "Linear", "Wrapped") in calls
    assert all(name for name, _, _ in calls)  # the frozen module itself has no parent


def test_a_rule_that_matches_nothing_is_an_error_before_anything_changes():
    model = nn.Sequential(nn.Linear(2, 2))
    guard = FrozenStageGuard(Constant(True), trainable=[AdaptersOfWrapped()])
    with pytest.raises(ValueError, match=r"matched nothing: \[AdaptersOfWrapped\(\)\]"):
        guard(model, 0).__enter__()
    assert model[0].weight.requires_grad


def test_policy_validation_of_rules():
    policy = FreezePolicy(trainable=(AdaptersOfWrapped(), "head*", nn.LayerNorm))
    assert policy == FreezePolicy(trainable=(AdaptersOfWrapped(), "head*", nn.LayerNorm))
    with pytest.raises(TypeError, match=r"trainable\[0\].*pass an instance"):
        FreezePolicy(trainable=(AdaptersOfWrapped,))
    with pytest.raises(TypeError, match=r"trainable\[1\] must be a name pattern"):
        FreezePolicy(trainable=("a*", lambda name: True))


def test_rules_and_patterns_combine():
    model = wrapped_model()
    with freeze(model, trainable=[AdaptersOfWrapped(), "2.base_layer.bias"]):
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["2.base_layer.bias"] and not flags["2.base_layer.weight"]
    assert flags["0.up.weight"] and not flags["0.base_layer.bias"]


# --- the controller never calls "trainable" what nothing would make train --------------


def test_controller_refuses_to_schedule_a_module_frozen_outside_freezesched_as_trainable():
    model = make_net()
    model.backbone.requires_grad_(False)  # what peft does to a base model
    before = tensors(model)
    ctrl = FreezeController(model, {"backbone": Step(2)})  # building touches nothing
    with pytest.raises(ValueError, match=r"makes 'backbone' trainable at tick 0.*never re-enables"):
        ctrl.apply(0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert ctrl.frozen == {"backbone": False} and ctrl.tick is None
    assert bitwise_equal(before, tensors(model))


def test_the_refusal_comes_when_the_module_becomes_trainable_not_before():
    model = make_net()
    model.backbone.requires_grad_(False)
    ctrl = FreezeController(model, {"backbone": ~Step(3)})  # frozen at 0, trainable at 1
    assert ctrl.apply(0) == {"backbone": True}
    with pytest.raises(ValueError, match="tick 1"):
        ctrl.apply(1)
    assert ctrl.frozen == {"backbone": True}  # nothing changed
    ctrl.release()
    assert not any(p.requires_grad for p in model.backbone.parameters())  # peft's flags back


def test_a_module_frozen_outside_freezesched_may_be_held_frozen_to_pin_batchnorm():
    model = make_net()
    model.backbone.requires_grad_(False)
    stats = model.backbone[0][1].running_mean.clone()
    with FreezeController(model, {"backbone": Constant(True)}) as ctrl:
        ctrl.apply(0)
        model.train()
        loss_fn(model, 0).backward()
        assert torch.equal(model.backbone[0][1].running_mean, stats)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_trainable_exceptions_do_not_count_as_something_to_train():
    model = make_net(adapter=True)
    model.backbone.requires_grad_(False)
    model.backbone[1].adapter.requires_grad_(True)  # only the adapter trains
    ctrl = FreezeController(model, {"backbone": Step(2)}, trainable=["*adapter*"])
    with pytest.raises(ValueError, match="trainable exceptions aside"):
        ctrl.apply(0)
    # Without the exception, the adapter is what the schedule trains: accepted.
    with FreezeController(model, {"backbone": Step(2)}) as ctrl:
        assert ctrl.apply(0) == {"backbone": False}
        assert ctrl.apply(1) == {"backbone": True}
        assert not model.backbone[1].adapter.up.weight.requires_grad
        assert ctrl.apply(2) == {"backbone": False}
        assert model.backbone[1].adapter.up.weight.requires_grad


def test_a_partly_trainable_module_and_a_module_without_parameters_are_accepted():
    model = make_net()
    model.backbone[0].requires_grad_(False)  # a frozen stem, by hand, inside the backbone
    model.add_module("pool", nn.Identity())
    with FreezeController(model, {"backbone": Step(2), "pool": Step(2)}) as ctrl:
        for tick in range(3):
            ctrl.apply(tick)
        assert model.backbone[1][0].weight.requires_grad
        assert not model.backbone[0][0].weight.requires_grad


def test_a_module_made_trainable_after_a_refusal_is_accepted():
    model = make_net()
    model.backbone.requires_grad_(False)
    ctrl = FreezeController(model, {"backbone": Step(2)})
    with pytest.raises(ValueError, match="never re-enables"):
        ctrl.apply(0)
    model.backbone.requires_grad_(True)
    assert ctrl.apply(0) == {"backbone": False}
    assert ctrl.apply(1) == {"backbone": True}
    ctrl.release()
