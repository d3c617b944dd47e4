"""Recompute every ΔTFLOPs cell of the DBF paper's Table II, and test every reading of it.

    python benchmarks/table2_flops.py [--json PATH] [--markdown PATH]

Needs torchvision (torch==2.14.1 torchvision==0.29.1 install together here). Backbones are
torchvision's ResNet-50 and Swin-S, randomly initialised (FLOPs do not depend on weights),
followed by an FPN-like neck (lateral 1x1 and output 3x3 convs, 256 channels, on the four
stages) standing in for the detectors' trainable part. Everything is counted on fake CPU
tensors (shapes only), so the full-resolution models cost seconds.

The paper does not say how it counted, so this prints, section by section, what each
statement in docs/table2.md rests on (the page quotes this output):

1. what the paper's own cells imply about its epochs (no model needed);
2. the backbones' forward FLOPs per sample;
3. the table: our cells beside the paper's under one reading (DOTA train patches, DIOR-R
   train+val, FLOPs), both conventions;
4. every reading (training split x FLOPs or MACs) and how far each is from every cell:
   which fit and which do not;
5. the measured saving of a frozen epoch against the 2x convention, with and without
   ResNet's ``frozen_stages=1`` (the paper's code);
6. coincidences between cells.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch
from torch import nn

from freezesched import Step, WarmupThenFreeze
from freezesched.profiling import measure_state_cost, project, render_table

try:
    import torchvision
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("this benchmark needs torchvision: pip install torch==2.14.1 torchvision==0.29.1")

# (dataset, backbone) -> (rho=1 warm-up epochs, total epochs), Table I read as in section 1.
TABLE1 = {
    ("DOTA", "ResNet-50"): (50, 400),
    ("DOTA", "Swin-S"): (400, 800),
    ("DIOR-R", "ResNet-50"): (50, 200),
    ("DIOR-R", "Swin-S"): (400, 1600),
}
SIZE = {"DOTA": 1024, "DIOR-R": 800}
#: Images per split. DOTA v1.0: 1024x1024 patches, gap 200 (MMRotate's split tool);
#: DIOR-R: the official split lists (train 5,862, val 5,863, test 11,738).
SPLITS = {
    "DOTA": {"train": 15_749, "train+val": 15_749 + 5_297},
    "DIOR-R": {"train": 5_862, "train+val": 11_725, "train+val+test": 23_463},
}
#: The reading of the main table (section 3): what earlier releases printed.
MAIN_SPLIT = {"DOTA": "train", "DIOR-R": "train+val"}
#: A reading fits a setting when every one of its five cells is within this of the paper's.
FIT = 0.03
# Table II's ΔTFLOPs, identical for the three detectors of a (dataset, backbone) pair.
PAPER = {
    ("DOTA", "ResNet-50"): [-3_077_501, -1_170_338, -1_872_541, -2_106_608, -2_340_676],
    ("DOTA", "Swin-S"): [-6_115_002, -1_538_750, -2_462_001, -2_769_751, -3_077_501],
    ("DIOR-R", "ResNet-50"): [-491_825, -184_434, -295_095, -331_982, -368_869],
    ("DIOR-R", "Swin-S"): [-4_588_368, -1_720_638, -2_753_021, -3_097_149, -3_441_276],
}
POLICIES = ["frozen (ρ=∞)", "DBF ρ=2", "DBF ρ=5", "DBF ρ=10", "DBF ρ=∞"]
RHOS = [2, 5, 10, math.inf]


class ResNetStages(nn.Module):
    """torchvision's ResNet-50 as four stages; ``frozen_stages=1`` as MMDetection's."""

    def __init__(self, frozen_stages: int = -1) -> None:
        super().__init__()
        r = torchvision.models.resnet50()
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.channels = [256, 512, 1024, 2048]
        never = [self.stem, self.layer1][: frozen_stages + 1] if frozen_stages >= 0 else []
        for module in never:  # never trained, under any policy
            module.requires_grad_(False)

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


def build(backbone: str, frozen_stages: int = -1) -> Detector:
    stages = ResNetStages(frozen_stages) if backbone == "ResNet-50" else SwinStages()
    return Detector(stages, stages.channels)


def schedules(first: int) -> list[Any]:
    return [Step(math.inf)] + [WarmupThenFreeze(first, then=Step(rho)) for rho in RHOS]


def pct(ours: float, paper: float) -> float:
    return round(100 * (ours - paper) / abs(paper), 2)


def epochs_from_the_paper() -> list[dict[str, Any]]:
    """Section 1: the paper's cells against the (warm-up, total) reading of Table I."""
    rows = []
    for (dataset, backbone), (first, total) in TABLE1.items():
        cells = PAPER[dataset, backbone]
        inf = cells[4]
        # DBF rho: the rho=inf cell x (1 - 1/rho), to the unit?
        worst = max(abs(c - inf * (1 - 1 / rho)) for c, rho in zip(cells[1:4], RHOS, strict=False))
        rows.append({
            "dataset": dataset, "backbone": backbone,
            "dbf_vs_rule": round(worst, 1),
            "frozen_over_inf": round(cells[0] / inf, 4),
            "total_over_tail": round(total / (total - first), 4),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="write every section as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write every section as Markdown")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    sections: list[tuple[str, str, list[dict[str, Any]], list[tuple[str, str]]]] = []
    header = f"torch {torch.__version__}, torchvision {torchvision.__version__}; fake tensors"
    print(f"# {header}")

    # 1. Epochs, from the paper's numbers alone.
    rows = epochs_from_the_paper()
    sections.append((
        "1. What the paper's cells imply about epochs",
        "Max |DBF cell - ρ=∞ cell x (1 - 1/ρ)| (TFLOPs): 0 means every DBF cell is the ρ=∞ "
        "cell times the fraction of post-warm-up epochs frozen, to the unit. The frozen/ρ=∞ "
        "ratio equals total/(total - warm-up) where Table I's numbers are (warm-up, total).",
        rows,
        [("dataset", "dataset"), ("backbone", "backbone"),
         ("dbf_vs_rule", "max |DBF - ρ=∞·(1-1/ρ)|"), ("frozen_over_inf", "frozen / ρ=∞ (paper)"),
         ("total_over_tail", "total / (total - warm-up)")],
    ))  # fmt: skip
    out["epochs"] = rows

    # 2-3. Costs per setting, the main table.
    costs, fwd = {}, {}
    for dataset, backbone in TABLE1:
        size = SIZE[dataset]
        for stages in (-1, 1) if backbone == "ResNet-50" else (-1,):
            model = build(backbone, stages)
            costs[dataset, backbone, stages] = {
                s: measure_state_cost(model, (1, 3, size, size), ["backbone"], s)
                for s in [(False,), (True,)]
            }
        fwd[dataset, backbone] = costs[dataset, backbone, -1][(True,)].frozen_forward
    rows = [{"dataset": d, "backbone": b, "size": f"{SIZE[d]}x{SIZE[d]}",
             "gflops": round(fwd[d, b] / 1e9, 2)} for d, b in TABLE1]  # fmt: skip
    sections.append((
        "2. Backbone forward FLOPs per sample",
        "FLOPs = 2 x multiply-accumulates (MACs), counted at dispatch level.",
        rows,
        [("dataset", "dataset"), ("backbone", "backbone"), ("size", "input"),
         ("gflops", "forward GFLOPs")],
    ))  # fmt: skip
    out["forward"] = rows

    table = []
    for (dataset, backbone), (first, total) in TABLE1.items():
        split = MAIN_SPLIT[dataset]
        samples = SPLITS[dataset][split]
        stages = 1 if backbone == "ResNet-50" else -1
        for policy, schedule, paper in zip(POLICIES, schedules(first), PAPER[dataset, backbone],
                                           strict=True):  # fmt: skip
            rows_ = {
                s: project(costs[dataset, backbone, s], schedule, epochs=total,
                           samples_per_epoch=samples, num_modules=1, policy=policy)
                for s in ((-1, 1) if backbone == "ResNet-50" else (-1,))
            }  # fmt: skip
            row = rows_[-1]
            ours = row.delta_flops_2x / 1e12
            table.append({
                "dataset": dataset, "backbone": backbone, "policy": policy,
                "samples": f"{samples:,} ({split})",
                "frozen_epochs": int(row.frozen_ticks or 0),
                "paper_delta_tflops": paper,
                "ours_delta_tflops_2x": round(ours),
                "deviation_pct": round(100 * (ours - paper) / abs(paper), 1),
                "ours_delta_tflops_measured": round((row.delta_flops_measured or 0) / 1e12),
                "ours_measured_frozen_stages_1": round(
                    (rows_[stages].delta_flops_measured or 0) / 1e12
                ) if stages == 1 else None,
                "implied_frozen_epochs": round(paper / (-2 * fwd[dataset, backbone]
                                                        * samples / 1e12), 1),
            })  # fmt: skip
    sections.append((
        "3. Table II: ours beside the paper's (one reading: DOTA train, DIOR-R train+val, FLOPs)",
        "2x = the paper's Eq. 1 convention (a frozen epoch saves 2 x the backbone's forward per "
        "sample); measured = what autograd runs, with nothing never-trained, and with "
        "ResNet's frozen_stages=1 as the paper's code; dev. = (ours 2x - paper) / |paper|.",
        table,
        [("dataset", "dataset"), ("backbone", "backbone"), ("policy", "policy"),
         ("samples", "samples/epoch"), ("frozen_epochs", "frozen epochs"),
         ("paper_delta_tflops", "paper ΔTFLOPs"), ("ours_delta_tflops_2x", "ours (2x)"),
         ("deviation_pct", "dev. %"), ("ours_delta_tflops_measured", "ours (measured)"),
         ("ours_measured_frozen_stages_1", "ours (measured, frozen_stages=1)"),
         ("implied_frozen_epochs", "epochs the paper's cell implies")],
    ))  # fmt: skip
    out["table"] = table

    # 4. Every reading: split x unit, deviation range over the five cells.
    readings = []
    for (dataset, backbone), (first, total) in TABLE1.items():
        for split, samples in SPLITS[dataset].items():
            for unit, per in (("FLOPs", 1), ("MACs", 2)):
                devs = []
                for schedule, paper in zip(schedules(first), PAPER[dataset, backbone],
                                           strict=True):  # fmt: skip
                    row = project(costs[dataset, backbone, -1], schedule, epochs=total,
                                  samples_per_epoch=samples, num_modules=1)  # fmt: skip
                    devs.append(pct(row.delta_flops_2x / per / 1e12, paper))
                readings.append({
                    "dataset": dataset, "backbone": backbone, "split": split,
                    "samples": samples, "unit": unit, "dev_min": min(devs), "dev_max": max(devs),
                    "fits": "yes" if max(abs(d) for d in devs) <= 100 * FIT else "no",
                })  # fmt: skip
    sections.append((
        "4. Every reading of samples and unit, against the five cells of each setting",
        f"A reading fits when all five cells are within {100 * FIT:g} % of the paper's. "
        "MACs: the paper's numbers would be multiply-accumulates labelled FLOPs.",
        readings,
        [("dataset", "dataset"), ("backbone", "backbone"), ("split", "split"),
         ("samples", "samples/epoch"), ("unit", "unit"), ("dev_min", "dev. min %"),
         ("dev_max", "dev. max %"), ("fits", "fits")],
    ))  # fmt: skip
    out["readings"] = readings

    # 5. Measured against 2x, per frozen sample.
    rows = []
    for (dataset, backbone, stages), state_costs in costs.items():
        full, frozen = state_costs[(False,)], state_costs[(True,)]
        measured = frozen.measured - full.measured
        two_x = -2 * fwd[dataset, backbone]
        rows.append({
            "dataset": dataset, "backbone": backbone,
            "never_trained": "stem + layer1 (frozen_stages=1)" if stages == 1 else "nothing",
            "measured_gflops": round(measured / 1e9, 2), "two_x_gflops": round(two_x / 1e9, 2),
            "ratio": round(measured / two_x, 3),
        })  # fmt: skip
    sections.append((
        "5. What a frozen epoch saves per sample: measured against the 2x convention",
        "ratio > 1: the neck also stops computing input gradients into the backbone; "
        "ratio < 1: part of the backbone never trained anyway, so freezing it saves nothing "
        "there, while the 2x convention still credits 2 x its forward.",
        rows,
        [("dataset", "dataset"), ("backbone", "backbone"), ("never_trained", "never trained"),
         ("measured_gflops", "measured ΔGFLOPs"), ("two_x_gflops", "2x ΔGFLOPs"),
         ("ratio", "measured / 2x")],
    ))  # fmt: skip
    out["measured_vs_2x"] = rows

    # 6. Coincidences between the paper's cells.
    rows = [
        {"check": "DOTA Swin-S ρ=∞ cell == DOTA ResNet-50 frozen cell",
         "value": str(PAPER["DOTA", "Swin-S"][4] == PAPER["DOTA", "ResNet-50"][0])},
        {"check": "DOTA Swin-S frozen / ρ=∞ (800 / 400 epochs would give 2)",
         "value": f"{PAPER['DOTA', 'Swin-S'][0] / PAPER['DOTA', 'Swin-S'][4]:.4f}"},
        {"check": "DIOR-R: (ResNet-50 train+val FLOPs fit) / (Swin-S train FLOPs fit) samples",
         "value": f"{SPLITS['DIOR-R']['train+val'] / SPLITS['DIOR-R']['train']:.4f}"},
    ]  # fmt: skip
    sections.append(("6. Coincidences", "", rows, [("check", "check"), ("value", "value")]))
    out["coincidences"] = rows

    for title, note, rows_, columns in sections:
        print(f"\n## {title}\n{note}\n" if note else f"\n## {title}\n")
        print(render_table(rows_, columns))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(f"<!-- python benchmarks/table2_flops.py; {header} -->\n")
            for title, note, rows_, columns in sections:
                f.write(f"\n### {title}\n\n" + (f"{note}\n\n" if note else ""))
                f.write(render_table(rows_, columns, "markdown") + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
