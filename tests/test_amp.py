"""GradScaler with an optimizer whose parameters are all frozen for a step."""

from __future__ import annotations

import pytest
import torch
from helpers import make_net, tensors
from torch import nn

from freezesched import FreezeAwareGradScaler, FrozenStageGuard, Step


def run(scaler_cls, steps=6, skip_by_hand=False, inf_at=None):
    torch.manual_seed(0)
    model = make_net()
    backbone_opt = torch.optim.SGD(model.backbone.parameters(), lr=0.05, momentum=0.9)
    head_opt = torch.optim.Adam(model.head.parameters(), lr=0.01)
    scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2)
    guard = FrozenStageGuard(Step(2))  # backbone frozen at odd steps
    scales, backbone_moved = [], []
    for step in range(steps):
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
        before = tensors(model.backbone)
        with guard(model.backbone, step):
            loss = nn.functional.cross_entropy(model(x), y)
            if step == inf_at:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        for opt in (backbone_opt, head_opt):
            if skip_by_hand and not any(p.grad is not None for p in opt.param_groups[0]["params"]):
                continue
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(
                [p for g in opt.param_groups for p in g["params"]], max_norm=35
            )
            scaler.step(opt)
        scaler.update()
        backbone_opt.zero_grad()
        head_opt.zero_grad()
        scales.append(scaler.get_scale())
        backbone_moved.append(
            any(not torch.equal(before[k], v) for k, v in tensors(model.backbone).items())
        )
    return model, scales, backbone_moved


def test_plain_grad_scaler_fails_on_a_fully_frozen_optimizer():
    # The failure this class exists for (negative control).
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        run(torch.amp.GradScaler, steps=2)


def test_skips_frozen_optimizers_and_otherwise_equals_grad_scaler():
    model, scales, moved = run(FreezeAwareGradScaler)
    ref_model, ref_scales, _ = run(torch.amp.GradScaler, skip_by_hand=True)
    assert moved == [True, False] * 3  # frozen steps leave the backbone bitwise unchanged
    assert scales == ref_scales
    ref = ref_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_inf_gradients_still_skip_the_step_and_back_off_the_scale():
    model, scales, _ = run(FreezeAwareGradScaler, inf_at=2)
    ref_model, ref_scales, _ = run(torch.amp.GradScaler, skip_by_hand=True, inf_at=2)
    assert scales == ref_scales
    assert scales[2] == scales[1] / 2
    ref = ref_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_update_keeps_the_scale_when_no_optimizer_had_gradients():
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = FreezeAwareGradScaler("cpu", init_scale=8.0, growth_interval=1)
    scaler.scale(torch.ones(()))  # the loss of a step in which everything was frozen
    assert scaler.step(opt) is None
    scaler.update()
    assert scaler.get_scale() == 8.0
    w.grad = torch.ones(2)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 16.0  # a checked step counts toward growth again
