"""Small stand-ins for well-known architectures, built here (no torchvision needed)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


class ResNet18Detector(nn.Module):
    """ResNet-18 backbone + a light detection-like head (conv tower, class/box outputs)."""

    def __init__(self, classes: int = 15) -> None:
        super().__init__()
        stages, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1)),
            *stages,
        )  # fmt: skip
        self.head = nn.Sequential(nn.Conv2d(512, 128, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(128, classes + 5, 1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


class ResNet50FPN(nn.Module):
    """ResNet-50 backbone (torchvision's layout: 3-4-6-3 bottlenecks) + FPN + a light head."""

    def __init__(self, classes: int = 15) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.MaxPool2d(3, 2, 1))  # fmt: skip
        stages, cin = [], 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            layers = [Bottleneck(cin, width, stride)]
            layers += [Bottleneck(4 * width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = 4 * width
        self.backbone = nn.ModuleDict(
            {"stem": stem, **{f"layer{i + 1}": s for i, s in enumerate(stages)}}
        )
        channels = [256, 512, 1024, 2048]
        self.lateral = nn.ModuleList(nn.Conv2d(c, 256, 1) for c in channels)
        self.output = nn.ModuleList(nn.Conv2d(256, 256, 3, padding=1) for _ in channels)
        self.head = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(256, classes + 5, 1))  # fmt: skip

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.backbone["stem"](x)
        feats = []
        for i in range(1, 5):
            x = self.backbone[f"layer{i}"](x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.features(x)
        laterals = [lat(f) for lat, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + nn.functional.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        return [self.head(out(p)) for out, p in zip(self.output, laterals, strict=True)]


class Block(nn.Module):
    """A pre-norm transformer block with global attention (ViT / ViTDet's plain backbone)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ViTBackbone(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.grid = image // patch
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)


class ViTDetector(nn.Module):
    """A plain ViT backbone (ViTDet-style, global attention) and a light dense head."""

    def __init__(
        self, image: int = 1024, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
        classes: int = 15,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = ViTBackbone(image, patch, dim, depth, heads)
        self.head = nn.Sequential(
            nn.Conv2d(dim, 256, 1), nn.GELU(), nn.Conv2d(256, 256, 3, padding=1), nn.GELU(),
            nn.Conv2d(256, classes + 5, 1),
        )  # fmt: skip


class ResNet50Detector(nn.Module):
    """ResNet-50 backbone (bottlenecks 3-4-6-3) + the same light detection-like head."""

    def __init__(self, classes: int = 15) -> None:
        super().__init__()
        stages, cin = [], 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
            stages.append(nn.Sequential(*layers))
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1)),
            *stages,
        )  # fmt: skip
        self.head = nn.Sequential(nn.Conv2d(cin, 128, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(128, classes + 5, 1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


#: ViT sizes (width, depth, heads): ViT-B/L/H as in ViT and ViTDet, and a ~1.1 B one
#: (ViT-g-like width 1536, depth 40), all with patch 16.
VIT_SIZES = {
    "ViT-B": (768, 12, 12),
    "ViT-L": (1024, 24, 16),
    "ViT-H": (1280, 32, 16),
    "ViT-1B": (1536, 40, 16),
}


def vit_detector(size: str = "ViT-B", image: int = 1024) -> ViTDetector:
    dim, depth, heads = VIT_SIZES[size]
    return ViTDetector(image=image, dim=dim, depth=depth, heads=heads)


def calibrate(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every BatchNorm the statistics of the activations it sees on ``x`` and random
    affine parameters, as a trained model has (fresh BatchNorms are the identity in eval
    mode, which would hide folding errors and let activations grow with depth)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.uniform_(-0.2, 0.2, generator=gen)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        for i in range(2):
            model(x[i::2])
        for m in norms:
            m.momentum = 0.1
    return model
