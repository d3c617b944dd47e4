"""Side networks on a frozen backbone (issue 16, point 2; EST-style side-tuning).

A small trainable side network reads intermediate features of the frozen backbone. Under
the guard the backbone builds no autograd graph (it keeps 0 bytes for backward) while the
side network trains, whether the features come from forward hooks registered by hand,
``torchvision.models.feature_extraction`` or timm's ``features_only=True`` wrappers. The
torchvision and timm cases run where those are installed.
"""

from __future__ import annotations

import pytest
import torch
from helpers import bitwise_equal, tensors
from torch import nn

from freezesched import Constant, FrozenStageGuard
from freezesched.profiling import SavedTensorMeter


class Side(nn.Module):
    """A ladder of 1x1 convolutions, one per feature level, fused top-down (EST-like)."""

    def __init__(self, channels: list[int], width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        h = None
        for feature, lateral in zip(features, self.lateral, strict=True):
            x = lateral(feature)
            if h is not None:
                x = x + nn.functional.interpolate(h, size=x.shape[-2:])
            h = torch.relu(self.mix(x))
        assert h is not None
        return self.head(h.mean(dim=(2, 3)))


def check_side_tuning(backbone: nn.Module, features, channels: list[int], x: torch.Tensor):
    """The claims, for one way of taking features; ``features(x)`` runs the backbone."""
    torch.manual_seed(0)
    side = Side(channels)
    opt = torch.optim.AdamW(side.parameters(), lr=1e-2)
    y = torch.tensor([0, 1])
    guard = FrozenStageGuard(Constant(True))
    before = tensors(backbone)
    backbone.train()
    for step in range(2):
        side_before = tensors(side)
        with guard(backbone, step):
            with SavedTensorMeter() as backbone_meter:
                feats = features(x)
            with SavedTensorMeter() as side_meter:
                loss = nn.functional.cross_entropy(side(feats), y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        assert backbone_meter.bytes == 0 and backbone_meter.tensors == 0  # no graph at all
        assert not any(f.requires_grad for f in feats)
        assert side_meter.bytes > 0
        assert all(p.grad is None for p in backbone.parameters())
        assert not bitwise_equal(side_before, tensors(side))  # the side network trains
    # The backbone is bitwise unchanged: weights and BatchNorm statistics.
    assert bitwise_equal(before, tensors(backbone))
    # The whole step keeps exactly what the side network alone keeps on fixed features.
    with guard(backbone, 0), SavedTensorMeter() as whole:
        side(features(x)).sum()
    fixed = [f.detach().clone() for f in features(x)]
    with SavedTensorMeter() as alone:
        side(fixed).sum()
    assert whole.bytes == alone.bytes


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
    )


def test_features_taken_by_forward_hooks_registered_by_hand():
    backbone = small_cnn()
    taken: list[torch.Tensor] = []
    for stage in backbone:
        stage.register_forward_hook(lambda module, args, out: taken.append(out))

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        taken.clear()
        backbone(x)
        return list(taken)

    check_side_tuning(backbone, features, [8, 16, 16], torch.randn(2, 3, 16, 16))


def test_features_from_torchvision_feature_extraction():
    pytest.importorskip("torchvision")
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    extractor = create_feature_extractor(
        resnet18(weights=None), return_nodes={"layer2": "c3", "layer3": "c4", "layer4": "c5"}
    )

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        return list(extractor(x).values())

    check_side_tuning(extractor, features, [128, 256, 512], torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize(
    ("name", "kwargs", "channels", "size"),
    [
        ("resnet18", {"out_indices": (2, 3, 4)}, [128, 256, 512], 64),
        ("resnet18", {"out_indices": (2, 3, 4), "feature_cls": "hook"}, [128, 256, 512], 64),
        (
            "vit_tiny_patch16_224",
            {"out_indices": (1, 2), "depth": 3, "img_size": 32, "patch_size": 8},
            [192, 192],
            32,
        ),
    ],
    ids=["resnet18-features_only", "resnet18-hooks", "vit-features_only"],
)
def test_features_from_timm_features_only(name, kwargs, channels, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model(name, features_only=True, drop_path_rate=0.1, **kwargs)
    check_side_tuning(
        backbone, lambda x: list(backbone(x)), channels, torch.randn(2, 3, size, size)
    )
