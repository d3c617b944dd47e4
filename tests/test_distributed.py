"""DDP settings that freezing would break are refused up front, by every face.

One process with a gloo group of one is enough: DDP's reducer and its settings are the
same; the 2-process runs are in test_ddp.py and test_integration_mmengine.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from helpers import batch, make_net, tensors
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from freezesched import (
    Constant,
    FreezeController,
    FrozenStageGuard,
    Step,
    UnfreezeAt,
    freeze,
    is_frozen,
)


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _step(model: nn.Module, step: int) -> None:
    x, y = batch(step)
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("setting", [{"find_unused_parameters": False}, {"static_graph": True}])
def test_the_guard_refuses_ddp_that_manages_a_frozen_parameter_before_its_forward(group, setting):
    model = make_net()
    ddp = DDP(model, **setting)
    guard = FrozenStageGuard(Constant(True))
    before = tensors(model)
    region = guard(ddp.module.backbone, 0)
    with pytest.raises(ValueError, match="find_unused_parameters=True") as info, region:
        _step(ddp, 0)
    assert "Expected to have finished reduction" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in tensors(model).items())
    assert not any(is_frozen(p) for p in model.parameters())


def test_the_controller_refuses_it_when_built(group):
    ddp = DDP(make_net())
    with pytest.raises(ValueError, match="static_graph=False"):
        FreezeController(ddp, {"backbone": Step(2)})


def test_find_unused_parameters_true_works_with_toggling(group):
    model = make_net()
    ddp = DDP(model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    guard = FrozenStageGuard(Step(2))
    for tick in range(4):
        before = tensors(model.backbone)
        with guard(ddp.module.backbone, tick):
            _step(ddp, tick)
        opt.step()
        opt.zero_grad()
        still = all(torch.equal(v, before[k]) for k, v in tensors(model.backbone).items())
        assert still == Step(2)(tick)


def test_a_part_frozen_before_wrapping_needs_no_unused_parameter_search(group):
    model = make_net()
    with freeze(model.backbone):
        ddp = DDP(model)  # find_unused_parameters=False: the backbone is left out
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        before = tensors(model.backbone)
        for step in range(3):
            _step(ddp, step)
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(v, before[k]) for k, v in tensors(model.backbone).items())


# --- point 4 of issue 14: which schedules each DDP setup can follow -------------------------


def test_a_schedule_that_never_freezes_a_managed_part_is_allowed_and_one_that_may_is_not(group):
    ddp = DDP(make_net())  # find_unused_parameters=False
    FreezeController(ddp, {"backbone": Constant(False)}).release()
    FreezeController(ddp, {"backbone": Step(1)}).release()  # Step(1): never frozen
    for schedule in (Step(2), Constant(True), UnfreezeAt(3), lambda tick: tick > 5):
        with pytest.raises(ValueError, match="scheduled to freeze at some tick"):
            FreezeController(ddp, {"backbone": schedule})


def test_a_part_frozen_before_wrapping_trains_without_unused_parameter_search(group):
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Constant(True)})
    ctrl.apply(0)
    ddp = DDP(model)  # find_unused_parameters=False: the frozen backbone is left out
    # Given the wrapper, a controller accepts a part DDP left out only if it stays frozen.
    FreezeController(ddp, {"backbone": Step(math.inf)}).release()
    with pytest.raises(ValueError, match="never synchronizes them") as info:
        FreezeController(ddp, {"backbone": UnfreezeAt(4)})
    assert "silently diverge" in str(info.value)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = tensors(model.backbone)
    for step in range(3):
        ctrl.apply(step)
        _step(ddp, step)
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in tensors(model.backbone).items())
    ctrl.release()


def test_unfreezing_what_ddp_never_synchronizes_is_refused_before_the_epoch(group):
    model = make_net()
    ctrl = FreezeController(model, {"backbone": UnfreezeAt(2)})
    ctrl.apply(0)
    ddp = DDP(model, find_unused_parameters=True)  # built while the backbone is frozen
    for tick in range(2):
        ctrl.apply(tick)
        _step(ddp, tick)  # the forward hook sees ddp being called
    with pytest.raises(ValueError, match="silently diverge"):
        ctrl.apply(2)
    assert all(is_frozen(p) for p in model.backbone.parameters())  # nothing changed
    ctrl.release()


def test_the_guard_refuses_a_call_while_a_part_ddp_never_synchronizes_trains(group):
    model = make_net()
    with freeze(model.backbone):
        ddp = DDP(model, find_unused_parameters=True)
    # The backbone trains again, but DDP never averages its gradients.
    with pytest.raises(ValueError, match="they require grad now"), freeze(model.neck):
        _step(ddp, 0)


def test_a_part_frozen_by_hand_before_wrapping_may_sit_inside_a_toggling_schedule(group):
    # mmdet's frozen_stages (and peft) set requires_grad=False before DDP is built:
    # freezesched never re-enables them, so DDP leaving them out cannot diverge.
    model = make_net()
    stem = next(iter(model.backbone.children()))
    stem.requires_grad_(False)
    ddp = DDP(model, find_unused_parameters=True)
    ctrl = FreezeController(ddp, {"backbone": UnfreezeAt(1)})
    before = [p.detach().clone() for p in stem.parameters()]
    for tick in range(3):
        ctrl.apply(tick)  # frozen at 0, trainable from 1 on: the stem stays frozen
        _step(ddp, tick)
        assert not any(p.requires_grad for p in stem.parameters())
        assert all(p.grad is None for p in stem.parameters())
    assert all(torch.equal(p, b) for p, b in zip(stem.parameters(), before, strict=True))
    ctrl.release()
    assert not any(p.requires_grad for p in stem.parameters())
