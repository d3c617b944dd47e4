"""freezesched's frozen step against the hand-written ``no_grad`` step, paired step by step.

    python benchmarks/paired_ratio.py [--steps 30] [--model resnet50]

``step_savings.py`` times ten variants in shuffled blocks, so on a noisy machine its
freezesched / ideal ratio moves by ±15 % between runs. This runs only those two
variants (the same step functions), alternating their order every step, and prints the
ratio of the medians and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _models import ResNet18Detector, ResNet50Detector, calibrate
from step_savings import make_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet50")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ResNet18Detector() if args.model == "resnet18" else ResNet50Detector()
    x = torch.randn(8, 3, 128, 128)
    calibrate(model, x)
    variants = make_variants(model, x, peers=False)
    names = ["freezesched", "ideal"]
    for name in names:  # warm-up
        variants[name]()
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.steps):
        for name in names if i % 2 else names[::-1]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    pairs = [a / b for a, b in zip(times["freezesched"], times["ideal"], strict=True)]
    print(f"{args.model}, batch 8 at 128x128, {args.steps} alternating steps each, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"median ms/step: freezesched {1e3 * median['freezesched']:.1f}, "
          f"ideal {1e3 * median['ideal']:.1f}")  # fmt: skip
    print(f"ratio of medians {median['freezesched'] / median['ideal']:.3f}, "
          f"median of paired ratios {statistics.median(pairs):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
