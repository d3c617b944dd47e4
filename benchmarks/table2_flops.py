"""Recompute every ΔTFLOPs cell of the DBF paper's Table II with freezesched's profiler.

    python benchmarks/table2_flops.py [--json PATH] [--markdown PATH]

Needs torchvision (torch==2.14.1 torchvision==0.29.1 install together here). Backbones are
torchvision's ResNet-50 and Swin-S, randomly initialised (FLOPs do not depend on weights),
followed by an FPN-like neck (lateral 1x1 and output 3x3 convs, 256 channels, on the four
stages) standing in for the detectors' trainable part. Everything is counted on the meta
device: shapes only, so the full-resolution models cost seconds on a CPU.

Assumptions, worked out from the paper (see docs/profiling.md for the reasoning):

* Table I's two epoch counts are (epochs of the rho=1 phase, total epochs): DBF trains
  rho=1 for the first, then rho=alpha for the rest; the frozen baseline is frozen for all.
* DOTA v1.0: train split cut into 1024x1024 patches (MMRotate's split, gap 200): 15,749
  samples per epoch. DIOR-R: 800x800, train+val: 11,725 samples per epoch (the only
  count consistent with the paper's own DIOR-R cells; the train split alone is 5,862).
* Paper convention: a frozen epoch saves 2 x the backbone's forward FLOPs per sample
  (FLOPs = 2 x MACs). Measured convention: what autograd runs, incl. the neck's input
  gradients that a frozen backbone no longer needs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torch import nn

from freezesched import Step, WarmupThenFreeze
from freezesched.profiling import measure_state_cost, project, render_table

try:
    import torchvision
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("this benchmark needs torchvision: pip install torch==2.14.1 torchvision==0.29.1")

# (dataset, backbone) -> (first-phase epochs, total epochs); samples and resolution per dataset
TABLE1 = {
    ("DOTA", "ResNet-50"): (50, 400),
    ("DOTA", "Swin-S"): (400, 800),
    ("DIOR-R", "ResNet-50"): (50, 200),
    ("DIOR-R", "Swin-S"): (400, 1600),
}
DATA = {"DOTA": {"size": 1024, "samples": 15_749}, "DIOR-R": {"size": 800, "samples": 11_725}}
# Table II's ΔTFLOPs, identical for the three detectors of a (dataset, backbone) pair.
PAPER = {
    ("DOTA", "ResNet-50"): [-3_077_501, -1_170_338, -1_872_541, -2_106_608, -2_340_676],
    ("DOTA", "Swin-S"): [-6_115_002, -1_538_750, -2_462_001, -2_769_751, -3_077_501],
    ("DIOR-R", "ResNet-50"): [-491_825, -184_434, -295_095, -331_982, -368_869],
    ("DIOR-R", "Swin-S"): [-4_588_368, -1_720_638, -2_753_021, -3_097_149, -3_441_276],
}
POLICIES = ["frozen (ρ=∞)", "DBF ρ=2", "DBF ρ=5", "DBF ρ=10", "DBF ρ=∞"]


class ResNetStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        r = torchvision.models.resnet50()
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.channels = [256, 512, 1024, 2048]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class SwinStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.swin_s().features
        self.channels = [96, 192, 384, 768]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i % 2 == 1:  # after each stage (blocks 1, 3, 5, 7); torchvision is NHWC
                outs.append(x.permute(0, 3, 1, 2))
        return outs


class Detector(nn.Module):
    """Backbone + FPN-like neck (the trainable part whose cost the measured convention sees)."""

    def __init__(self, backbone: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.lateral = nn.ModuleList(nn.Conv2d(c, 256, 1) for c in channels)
        self.output = nn.ModuleList(nn.Conv2d(256, 256, 3, padding=1) for _ in channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(x)
        return [out(lat(f)) for f, lat, out in zip(feats, self.lateral, self.output, strict=True)]


def build(backbone: str) -> Detector:
    stages = ResNetStages() if backbone == "ResNet-50" else SwinStages()
    return Detector(stages, stages.channels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="write one record per cell")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}; meta device")
    records = []
    for (dataset, backbone), (first, total) in TABLE1.items():
        size, samples = DATA[dataset]["size"], DATA[dataset]["samples"]
        model = build(backbone)
        costs = {
            s: measure_state_cost(model, (1, 3, size, size), ["backbone"], s)
            for s in [(False,), (True,)]
        }
        fwd = costs[(True,)].frozen_forward
        print(
            f"{dataset} {backbone}: {size}x{size}, backbone forward {fwd / 1e9:.2f} GFLOPs "
            f"per sample, {samples:,} samples/epoch, rho=1 for {first} of {total} epochs"
        )
        schedules = [Step(math.inf)] + [
            WarmupThenFreeze(first, then=Step(rho)) for rho in (2, 5, 10, math.inf)
        ]
        for policy, schedule, paper in zip(POLICIES, schedules, PAPER[(dataset, backbone)],
                                           strict=True):  # fmt: skip
            row = project(costs, schedule, epochs=total, samples_per_epoch=samples,
                          num_modules=1, policy=policy)  # fmt: skip
            ours = row.delta_flops_2x / 1e12
            records.append(
                {
                    "dataset": dataset,
                    "backbone": backbone,
                    "policy": policy,
                    "frozen_epochs": int(row.frozen_ticks or 0),
                    "paper_delta_tflops": paper,
                    "ours_delta_tflops_2x": round(ours),
                    "ours_delta_tflops_measured": round((row.delta_flops_measured or 0) / 1e12),
                    "deviation_pct": round(100 * (ours - paper) / abs(paper), 1),
                    "implied_frozen_epochs": round(paper / (-2 * fwd * samples / 1e12), 1),
                }
            )
    columns = [
        ("dataset", "dataset"), ("backbone", "backbone"), ("policy", "policy"),
        ("frozen_epochs", "frozen epochs"), ("paper_delta_tflops", "paper ΔTFLOPs"),
        ("ours_delta_tflops_2x", "ours (2x)"),
        ("ours_delta_tflops_measured", "ours (measured)"), ("deviation_pct", "dev. %"),
        ("implied_frozen_epochs", "epochs the paper's cell implies"),
    ]  # fmt: skip
    print(render_table(records, columns))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(render_table(records, columns, "markdown") + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
