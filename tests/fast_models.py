"""Random conv/BatchNorm/linear networks for the fast-mode tests, each built from blocks
whose foldability is known by construction (not asked of the code under test)."""

from __future__ import annotations

import random

import torch
from torch import nn


def randomize_norm(bn: nn.Module, rng: torch.Generator) -> None:
    """Non-trivial statistics and affine parameters, so that folding changes weights."""
    with torch.no_grad():
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.uniform_(-1.0, 1.0, generator=rng)
            bn.running_var.uniform_(0.5, 2.0, generator=rng)
        if getattr(bn, "weight", None) is not None:
            bn.weight.uniform_(0.5, 1.5, generator=rng)
            bn.bias.uniform_(-0.5, 0.5, generator=rng)


class ConvBN(nn.Module):
    """conv -> BN -> ReLU: foldable."""

    foldable = 1

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, bias: bool,
                 affine: bool) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Branch(nn.Module):
    """The conv output is used twice (before and after BN): not foldable."""

    foldable = 0

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + 0.5 * y


class Residual(nn.Module):
    """BN after a residual add (its input is no conv's output): not foldable; plus a
    foldable conv -> BN inside."""

    foldable = 1

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(torch.relu(self.bn1(self.conv(x))) + x)


class BatchStats(nn.Module):
    """BN with track_running_stats=False normalises with batch statistics even in eval
    mode: not foldable."""

    foldable = 0

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class PreAct(nn.Module):
    """BN -> ReLU -> conv (pre-activation): the BN precedes the conv: not foldable."""

    foldable = 0

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(x)))


class Gate(nn.Module):
    """Python control flow on a tensor value: untraceable, run as it is; its conv -> BN
    is therefore not folded."""

    foldable = 0

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.mean() > 0:  # data-dependent: torch.fx cannot trace this
            return y
        return -y


class Head(nn.Module):
    """pool -> flatten -> linear -> BN1d -> ReLU -> linear: the linear -> BN1d is foldable."""

    foldable = 1

    def __init__(self, c: int, out: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(c, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.out(torch.relu(self.bn(self.fc(x))))


def random_net(seed: int, blocks: int = 4) -> tuple[nn.Sequential, int]:
    """A random network and the number of norm layers fast mode must fold in it."""
    rnd = random.Random(seed)
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = rnd.choice([4, 8])
    layers.append(ConvBN(3, c, 3, 1, 1, rnd.random() < 0.5, True))
    for _ in range(blocks):
        kind = rnd.choice(["convbn", "convbn", "branch", "residual", "stats", "preact", "gate"])
        if kind == "convbn":
            cout = rnd.choice([4, 8])
            groups = 2 if c % 2 == 0 and cout % 2 == 0 and rnd.random() < 0.3 else 1
            layers.append(ConvBN(c, cout, rnd.choice([1, 3]), rnd.choice([1, 2]), groups,
                                 rnd.random() < 0.5, rnd.random() < 0.8))  # fmt: skip
            c = cout
        elif kind == "branch":
            layers.append(Branch(c))
        elif kind == "residual":
            layers.append(Residual(c))
        elif kind == "stats":
            layers.append(BatchStats(c))
        elif kind == "preact":
            layers.append(PreAct(c))
        else:
            layers.append(Gate(c))
    layers.append(Head(c))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_norm(m, rng)
    return net, sum(type(b).foldable for b in layers)
