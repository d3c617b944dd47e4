"""DBF in a plain PyTorch loop: train the backbone for a warm-up, then every 5th epoch.

    python examples/plain_loop.py

Uses only freezesched's public API, the way the README shows it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from freezesched import FrozenStageGuard, Step, WarmupThenFreeze


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def main(epochs: int = 12, steps: int = 8, warmup: int = 2, rho: int = 5) -> list[bool]:
    torch.manual_seed(0)
    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    guard = FrozenStageGuard(WarmupThenFreeze(warmup, then=Step(rho)))  # (ρ=1 →) ρ=5
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(steps)]
    history = []
    for epoch in range(epochs):
        model.train()
        for x, y in data:
            with guard(model.backbone, epoch) as region:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=35)
            opt.step()
            opt.zero_grad()
        history.append(region.frozen[0])
        print(f"epoch {epoch:2d}  backbone {'frozen   ' if region.frozen[0] else 'trainable'}"
              f"  loss {loss.item():.3f}")  # fmt: skip
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    main(epochs=args.epochs)
