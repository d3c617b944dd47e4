"""A newcomer's first hour: models without ``.backbone``, the savings trap, schedule
ergonomics, the learning rate on unfreeze, defaults. One test per trap that bit."""

from __future__ import annotations

import copy
import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tensors
from torch import nn

from freezesched import (
    FreezeController,
    FreezePolicy,
    FrozenStageGuard,
    Layerwise,
    LRRamp,
    Step,
    UnfreezeAt,
    WarmupThenFreeze,
    freeze,
    is_frozen,
)
from freezesched.profiling import (
    FlopAccountant,
    FrozenMiddleWarning,
    project_policies,
)
from freezesched.schedules import schedule_from_config

ROOT = Path(__file__).resolve().parents[1]


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)
            )
            if stride != 1 or cin != width * 4
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetLike(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..4, fc), small: no .backbone."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            layers.append(nn.Sequential(Bottleneck(cin, width * 2**i, stride)))
            cin = width * 2**i * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_or_stand_in() -> nn.Module:
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        return torchvision.models.resnet50(weights=None)
    return ResNetLike()


# --- 1. models without .backbone ------------------------------------------------------------


def test_the_readme_quickstart_runs_on_a_resnet_50():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = "### Any model: freeze everything but the classifier"
    block = re.search(re.escape(heading) + r"\n.*?```python\n(.*?)```", readme, re.S)
    assert block, "the README's torchvision/timm quickstart is missing"
    torch.manual_seed(0)
    loader = [(torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)))] * 2
    namespace = {"resnet50": lambda weights=None: resnet50_or_stand_in(), "E": 2, "loader": loader}
    code = block.group(1).replace("from torchvision.models import resnet50\n", "")
    exec(compile(code, "README quickstart", "exec"), namespace)
    model = namespace["model"]
    assert all(p.requires_grad for p in model.parameters())  # restored after the loop
    assert namespace["history"] == [Step(2)(e) for e in range(2)]


def test_the_guard_takes_names_and_groups_of_a_model_without_backbone():
    model = ResNetLike()
    stages = [["conv1", "bn1", "layer1"], "layer2", "layer3", "layer4"]
    guard = FrozenStageGuard(Layerwise.progressive(4, first=1, last=4), modules=stages)
    with guard(model, 2) as region:  # stage 0 frozen from 1, stage 1 from 2
        assert region.frozen == (True, True, False, False)
        assert is_frozen(model.conv1) and is_frozen(model.bn1) and is_frozen(model.layer1)
        assert is_frozen(model.layer2) and not is_frozen(model.layer3)
    assert not any(is_frozen(p) for p in model.parameters())


def test_everything_but_the_classifier_with_one_pattern():
    model = ResNetLike()
    with FrozenStageGuard(Step(2), trainable=["fc*"])(model, 1):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]


def test_a_nested_list_is_a_group_not_an_error_with_a_module_printout():
    model = ResNetLike()
    with freeze([[model.conv1, model.bn1], model.layer1]) as region:
        assert region.stages == ((model.conv1, model.bn1), (model.layer1,))
    with pytest.raises(TypeError) as info, freeze([[model.conv1, 3]]):
        pass
    assert "target[0][1] must be an nn.Module or a dotted module name, got 3 (int)" in str(
        info.value
    )
    assert "Conv2d(" not in str(info.value)  # no module printout


def test_controller_groups_in_a_key():
    model = ResNetLike()
    key = (("conv1", "bn1", "layer1"), "layer2")
    ctrl = FreezeController(model, {key: Layerwise.gradual_unfreeze(2, begin=1)})
    assert ctrl.apply(0) == {"conv1": True, "bn1": True, "layer1": True, "layer2": True}
    assert ctrl.apply(1) == {"conv1": True, "bn1": True, "layer1": True, "layer2": False}
    ctrl.release()


# --- 2. the savings trap ----------------------------------------------------------------------


def test_freezing_the_stages_but_not_the_stem_warns_once_and_names_the_stem():
    model = ResNetLike()
    stages = ["layer1", "layer2", "layer3", "layer4"]
    with pytest.warns(FrozenMiddleWarning, match=r"because conv1, bn1 train\(s\) upstream") as w:
        runs = project_policies(model, (2, 3, 64, 64), stages, {"frozen": Step(10**6)},
                                epochs=3, samples_per_epoch=10)  # fmt: skip
    assert len([x for x in w if x.category is FrozenMiddleWarning]) == 1
    assert "GFLOPs/sample of input gradients" in runs[0].notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenMiddleWarning)  # with the stem: no warning
        with_stem = ["conv1", "bn1", *stages]
        runs = project_policies(model, (2, 3, 64, 64), with_stem, {"frozen": Step(10**6)},
                                epochs=3, samples_per_epoch=10)  # fmt: skip
    assert runs[0].notes == ()


def test_the_accountant_says_it_once_per_configuration():
    model = ResNetLike()
    acct = FlopAccountant(model, samples_per_state=2)
    guard = FrozenStageGuard(Step(10**6), modules=[["layer1", "layer2", "layer3", "layer4"]])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            with guard(model, 1) as region, acct.step(region, batch_size=2):
                model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert len([x for x in w if x.category is FrozenMiddleWarning]) == 1
    assert len(acct.totals().notes) == 1 and "conv1" in acct.totals().notes[0]


# --- 3. schedule ergonomics -------------------------------------------------------------------


def test_unfreeze_at_and_the_compact_progressive_config():
    assert UnfreezeAt(2).timeline(4).tolist() == [True, True, False, False]
    compact = {"type": "Layerwise.progressive", "num_stages": 4, "first": 0, "last": 27,
               "spacing": "cubic"}  # fmt: skip
    assert schedule_from_config(compact) == Layerwise.progressive(4, 0, 27, "cubic")
    assert Layerwise.progressive(4, 0, 27, "cubic").summary() == "Layerwise(freeze at 0, 1, 8, 27)"
    assert WarmupThenFreeze(50, then=Step(5)).summary() == "WarmupThenFreeze(50, then=Step(5))"


# --- 4. the learning rate on unfreeze ---------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.2, 0.1], total_steps=40
    ),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100),
}


def _groups(model: _Net) -> list[dict]:
    return [{"params": model.backbone.parameters(), "lr": 0.1},
            {"params": model.head.parameters(), "lr": 0.2}]  # fmt: skip


def _train(scheduler_name, epochs, *, ramp=None, state=None, steps=2, seen=None):
    model = _Net()
    opt = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9)
    sched = SCHEDULERS[scheduler_name](opt)
    ctrl = FreezeController(model, {"backbone": UnfreezeAt(2)}, optimizers=opt, unfreeze_lr=ramp)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ctrl.load_state_dict(state["ctrl"])
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 4, generator=g) for _ in range(epochs.stop * steps)]
    for epoch in epochs:
        ctrl.apply(epoch)
        for i in range(steps):
            model(data[epoch * steps + i]).square().mean().backward()
            if seen is not None:
                lrs: list[list[float]] = []
                hook = opt.register_step_pre_hook(
                    lambda o, a, k, lrs=lrs: lrs.append([g["lr"] for g in o.param_groups])
                )
                opt.step()
                hook.remove()
                seen.append((epoch, lrs[-1], [g["lr"] for g in opt.param_groups]))
            else:
                opt.step()
            opt.zero_grad()
            sched.step()
    checkpoint = {
        "model": copy.deepcopy(model.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "sched": copy.deepcopy(sched.state_dict()),
        "ctrl": ctrl.state_dict(),
    }
    ctrl.release()
    return model, checkpoint


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_the_ramp_scales_the_schedulers_rate_around_each_step_only(scheduler_name):
    ramp = LRRamp(start=0.25, ticks=2)
    plain_seen, ramp_seen = [], []
    _train(scheduler_name, range(6), seen=plain_seen)
    _train(scheduler_name, range(6), ramp=ramp, seen=ramp_seen)
    for (epoch, _, plain_after), (_, during, after) in zip(plain_seen, ramp_seen, strict=True):
        # Around the step: the backbone's group gets factor x the scheduler's rate; the
        # head's is untouched; after the step the scheduler's own values are back.
        factor = ramp.factor(epoch - 2) if epoch >= 2 else 1.0
        assert after == plain_after
        assert during[1] == plain_after[1]
        assert during[0] == pytest.approx(plain_after[0] * factor, rel=0, abs=0)
    pairs = zip(plain_seen, ramp_seen, strict=True)
    factors = sorted({round(during[0] / plain[0], 6) for (_, _, plain), (_, during, _) in pairs})
    assert factors == [0.25, 0.625, 1.0]


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_the_ramp_resumes_bitwise(scheduler_name):
    ramp = LRRamp(start=0.1, ticks=3)
    uninterrupted, _ = _train(scheduler_name, range(7), ramp=ramp)
    _, state = _train(scheduler_name, range(3), ramp=ramp)  # stop one tick into the ramp
    resumed, _ = _train(scheduler_name, range(3, 7), ramp=ramp, state=state)
    a, b = tensors(uninterrupted), tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    control, _ = _train(scheduler_name, range(7))  # without the ramp: different weights
    assert not all(torch.equal(a[k], v) for k, v in tensors(control).items())


def test_the_ramp_needs_the_unfrozen_module_in_groups_of_its_own():
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # one group for everything
    with pytest.raises(ValueError, match=r"param_groups\[0\] mixes .*not scheduled.*backbone"):
        FreezeController(model, {"backbone": UnfreezeAt(2)}, optimizers=opt,
                         unfreeze_lr=LRRamp())  # fmt: skip


# --- 5. defaults ------------------------------------------------------------------------------


def test_the_default_drops_stale_optimizer_state_on_unfreeze():
    assert FreezePolicy().on_unfreeze == "reset"
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctrl = FreezeController(model, {"backbone": Step(2)}, optimizers=opt)
    weight = model.backbone[0].weight
    for epoch in range(3):
        ctrl.apply(epoch)
        if epoch == 2:  # just unfrozen: the momentum from epoch 0 is gone
            assert weight not in opt.state
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        if epoch == 1:  # frozen: its state from epoch 0 waits, untouched
            assert "momentum_buffer" in opt.state[weight]
    ctrl.release()
