"""DDP settings that freezing would break are refused up front, by every face.

One process with a gloo group of one is enough: DDP's reducer and its settings are the
same; the 2-process runs are in test_ddp.py and test_integration_mmengine.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import batch, make_net, tensors
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from freezesched import Constant, FreezeController, FrozenStageGuard, Step, freeze, is_frozen


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
