"""Run the DBF paper's Table II grid (or any subset) and write Table II / III-style results.

    python examples/mmrotate_dota/run_table2.py --dry-run          # commands + projected ΔTFLOPs
    python examples/mmrotate_dota/run_table2.py --datasets dior-r --backbones r50 \
        --detectors retinanet                                       # 6 runs, one GPU
    python examples/mmrotate_dota/run_table2.py --gpus 4 --continue-from-full

Every run is one `train.py` invocation with its own work_dir
(`work_dirs/table2/<detector>_<backbone>_<dataset>/<policy>`). A run whose work_dir holds
`done.json` is skipped, so the grid resumes where it stopped. After each run the tables
are rewritten: `<out>/table2.md`, `table2.csv` (mAP@50 and ΔTFLOPs, ours beside the
paper's) and `table3.md` (training time and peak memory per policy).

Epochs follow Table I (the second number is the total, the first the ρ=1 warm-up of DBF):
DOTA ResNet-50 50/400, DOTA Swin-S 400/800, DIOR-R ResNet-50 50/200, DIOR-R Swin-S
400/1600. `--continue-from-full` starts each DBF run from the full-training run's
checkpoint at the end of the warm-up, as the paper does (the warm-up is then trained once);
its ΔTFLOPs and ΔT are then over the whole protocol (warm-up from the full run, the rest
its own) against the full run's same epochs, and the tables say which epochs.

`--gpus N` keeps the paper's total batch: 8/N images per GPU, learning rate 0.005.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
DETECTORS = ("faster-rcnn", "retinanet", "fcos")
BACKBONES = ("r50", "swin-s")
DATASETS = ("dota", "dior-r")
POLICIES = ("full", "frozen", "dbf_rho2", "dbf_rho5", "dbf_rho10", "dbf_rhoinf")
#: (ρ=1 warm-up epochs of DBF, total epochs), Table I.
EPOCHS = {("dota", "r50"): (50, 400), ("dota", "swin-s"): (400, 800),
          ("dior-r", "r50"): (50, 200), ("dior-r", "swin-s"): (400, 1600)}  # fmt: skip
#: Training samples per epoch, what this example trains on (as the paper's code): DOTA v1.0
#: train split in 1024x1024 patches (gap 200); DIOR-R train split (``train.txt``).
SAMPLES = {"dota": 15749, "dior-r": 5862}
#: Where the paper's cells imply another number of samples per epoch (docs/table2.md).
SAMPLES_NOTE = {
    "dior-r": "the paper does not say which DIOR-R samples it counted: its ResNet-50 cells "
    "fit 11,725 per epoch (train+val) in FLOPs or 23,463 (all of DIOR) in MACs, its Swin-S "
    "cells 5,862 (train) in FLOPs or 11,725 in MACs (docs/table2.md); this example trains "
    "on the 5,862 images of the train split, as the paper's code does",
}
RESOLUTION = {"dota": 1024, "dior-r": 800}
#: The paper's batch: 8 images per step (on one GPU); split evenly over GPUs (train.py).
TOTAL_BATCH = 8
#: Table II of the paper: mAP per policy, in POLICIES order.
PAPER_MAP = {
    ("dota", "faster-rcnn", "r50"): (69.00, 61.31, 69.03, 69.22, 69.27, 69.28),
    ("dota", "faster-rcnn", "swin-s"): (71.23, 68.14, 71.80, 71.73, 71.74, 71.73),
    ("dota", "retinanet", "r50"): (64.19, 57.29, 64.48, 64.89, 64.77, 64.98),
    ("dota", "retinanet", "swin-s"): (64.89, 61.61, 64.92, 65.02, 65.01, 64.97),
    ("dota", "fcos", "r50"): (68.41, 59.82, 68.41, 68.80, 68.98, 69.18),
    ("dota", "fcos", "swin-s"): (71.47, 67.45, 71.46, 71.44, 71.62, 71.51),
    ("dior-r", "faster-rcnn", "r50"): (63.82, 54.17, 64.13, 63.85, 63.86, 63.96),
    ("dior-r", "faster-rcnn", "swin-s"): (67.68, 62.64, 67.97, 67.99, 68.06, 68.03),
    ("dior-r", "retinanet", "r50"): (59.09, 53.88, 59.26, 59.25, 58.94, 58.97),
    ("dior-r", "retinanet", "swin-s"): (65.11, 60.81, 65.15, 65.14, 64.86, 64.75),
    ("dior-r", "fcos", "r50"): (61.23, 55.84, 61.39, 61.63, 61.66, 61.85),
    ("dior-r", "fcos", "swin-s"): (67.58, 67.48, 67.69, 68.08, 68.05, 68.05),
}
#: Table II of the paper: ΔTFLOPs per policy (the same for the three detectors).
PAPER_DELTA = {
    ("dota", "r50"): (0, -3077501, -1170338, -1872541, -2106608, -2340676),
    ("dota", "swin-s"): (0, -6115002, -1538750, -2462001, -2769751, -3077501),
    ("dior-r", "r50"): (0, -491825, -184434, -295095, -331982, -368869),
    ("dior-r", "swin-s"): (0, -4588368, -1720638, -2753021, -3097149, -3441276),
}


@dataclass(frozen=True)
class Run:
    detector: str
    backbone: str
    dataset: str
    policy: str

    @property
    def setting(self) -> str:
        return f"{self.detector}_{self.backbone}_{self.dataset}"

    @property
    def warmup(self) -> int:
        return EPOCHS[self.dataset, self.backbone][0]

    @property
    def epochs(self) -> int:
        return EPOCHS[self.dataset, self.backbone][1]

    @property
    def rho(self) -> str | None:
        return self.policy.removeprefix("dbf_rho") if self.policy.startswith("dbf") else None

    def frozen_epochs(self) -> int:
        if self.policy == "full":
            return 0
        if self.policy == "frozen":
            return self.epochs
        rho = math.inf if self.rho == "inf" else int(self.rho or 1)
        tail = range(self.epochs - self.warmup)  # Step(rho) after the warm-up
        return sum(1 for t in tail if math.isinf(rho) or t % rho != 0)

    def work_dir(self, root: str) -> str:
        return os.path.join(root, self.setting, self.policy)

    def command(self, root: str, gpus: int, resume_from: str | None = None) -> list[str]:
        policy = "dbf" if self.rho else self.policy
        args = [os.path.join(HERE, "configs", f"{self.setting}.py"),
                "--policy", os.path.join(HERE, "configs", "policies", f"{policy}.py"),
                "--epochs", str(self.epochs), "--work-dir", self.work_dir(root),
                "--cfg-options", f"default_hooks.checkpoint.interval={self.warmup}"]  # fmt: skip
        if self.rho:
            args[5:5] = ["--warmup", str(self.warmup), "--rho", self.rho]
        if resume_from:
            args += ["--resume-from", resume_from]
        train = os.path.join(HERE, "train.py")
        if gpus > 1:
            return ["torchrun", f"--nproc_per_node={gpus}", train, *args, "--launcher", "pytorch"]
        return [sys.executable, train, *args]


def grid(detectors: Sequence[str], backbones: Sequence[str], datasets: Sequence[str],
         policies: Sequence[str]) -> list[Run]:  # fmt: skip
    return [
        Run(d, b, s, p) for s in datasets for d in detectors for b in backbones for p in policies
    ]


def backbone_forward_flops(run: Run) -> int:
    """Forward FLOPs of one image through the run's backbone, counted on the meta device."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmrotate.registry import MODELS

    from freezesched.profiling import count_flops

    init_default_scope("mmrotate")
    cfg = Config.fromfile(os.path.join(HERE, "configs", f"{run.setting}.py"))
    cfg.model.backbone.init_cfg = None
    backbone = MODELS.build(cfg.model.backbone).to("meta")  # built on CPU (Swin calls .item())
    size = RESOLUTION[run.dataset]
    x = torch.empty(1, 3, size, size, device="meta")
    return count_flops(lambda: backbone(x), backbone).total.forward


def projected_delta_tflops(run: Run, forward: Callable[[Run], int]) -> float:
    """Eq. 1, paper convention: a frozen epoch saves 2 x backbone forward per sample."""
    return -2 * forward(run) * SAMPLES[run.dataset] * run.frozen_epochs() / 1e12


def collect(run: Run, root: str) -> dict | None:
    """What a finished run produced (done.json and its accounting), or None if unfinished."""
    done = os.path.join(run.work_dir(root), "done.json")
    if not os.path.exists(done):
        return None
    with open(done) as f:
        record = json.load(f)
    accounting = os.path.join(run.work_dir(root), "freezesched_accounting.json")
    if os.path.exists(accounting):
        with open(accounting) as f:
            record["accounting"] = json.load(f)
    return record


def compare(acc: dict, full: dict | None, full_dir: str | None = None) -> dict:
    """A run against full training over the same epochs.

    A DBF run continued from the full run's warm-up checkpoint trains only epochs
    ``first_epoch`` to the end itself; the warm-up epochs are the full run's own, so
    ΔF and ΔT over the whole protocol are this run's against the full run's same epochs
    (and the warm-up's time is counted in the run's time).

    The measured deltas are left out (``None``), with the reason in ``"problem"``, when
    they would compare unlike things: the full run's record lacks some of those epochs
    or of the warm-up (it is unfinished, or was itself resumed), an epoch trained a
    different number of samples in the two runs (another world size with a padding
    sampler, another data list), or the run was resumed from a checkpoint that is not
    the full run's (``full_dir``; e.g. its own, after a crash), so its own earlier
    epochs are missing from its record.
    """
    totals = acc["run"]["totals"]
    first, end = acc["first_epoch"], acc["end_epoch"]
    out = {
        "epochs": f"{first}-{end}",
        "delta_2x": totals["delta_flops_2x"],
        "delta_measured": None,
        "seconds": sum(e["seconds"] for e in acc["epochs"]),
        "delta_seconds": None,
        "problem": None,
    }
    if full is None:
        return out
    resumed = acc.get("resumed_from")
    own = resumed and os.path.normpath(os.path.dirname(resumed)) != os.path.normpath(full_dir or "")
    if first > 0 and full_dir is not None and own:
        out["problem"] = (
            f"resumed from {resumed}, not from the full run's checkpoint in {full_dir}: "
            f"epochs 0-{first} are not in this run's record"
        )
        return out
    same = {e["epoch"]: e for e in full["epochs"] if first <= e["epoch"] < end}
    if len(same) != end - first:
        out["problem"] = f"the full run's record lacks some of epochs {first}-{end}"
        return out  # the full run did not train those epochs (not finished)
    warmup = [e for e in full["epochs"] if e["epoch"] < first]
    if len({e["epoch"] for e in warmup}) != first:
        out["problem"] = f"the full run's record lacks some of the warm-up epochs 0-{first}"
        return out

    def samples(epoch: dict) -> int:  # (keyed by freeze state, which the runs differ in)
        return int(sum(epoch["samples"].values()))

    differ = [e["epoch"] for e in acc["epochs"] if samples(e) != samples(same[e["epoch"]])]
    if differ:
        out["problem"] = (
            f"epochs {differ[:3]}{'...' if len(differ) > 3 else ''} trained other numbers of "
            "samples than the full run's"
        )
        return out
    out["delta_measured"] = totals["flops_measured"] - sum(
        e["flops_measured"] for e in same.values()
    )
    out["delta_seconds"] = out["seconds"] - sum(e["seconds"] for e in same.values())
    if first > 0:  # the warm-up: trained once, by the full run
        out["epochs"] = f"0-{first} (full run) + {first}-{end}"
        out["seconds"] += sum(e["seconds"] for e in warmup)
    return out


def write_tables(runs: Sequence[Run], root: str, out: str) -> None:
    """Table II (mAP, ΔTFLOPs) and Table III (time, memory) for every finished run."""
    os.makedirs(out, exist_ok=True)
    results = {run: collect(run, root) for run in runs}
    rows, notes = [], []
    for run, record in results.items():
        if record is None or "accounting" not in record:
            continue
        i = POLICIES.index(run.policy)
        acc = record["accounting"]
        full_run = Run(run.detector, run.backbone, run.dataset, "full")
        full = results.get(full_run) or {}
        cmp = compare(acc, full.get("accounting"), full_run.work_dir(root))
        if cmp["problem"]:
            notes.append(f"{run.setting} {run.policy}: no measured ΔF/ΔT: {cmp['problem']}.")
        maps = acc["map"]
        peak = max((p["peak_cuda_bytes"] or 0 for p in acc["run"]["phases"]), default=0)
        ratio = (
            cmp["delta_measured"] / cmp["delta_2x"]
            if cmp["delta_measured"] is not None and cmp["delta_2x"]
            else None
        )
        rows.append({
            "dataset": run.dataset, "detector": run.detector, "backbone": run.backbone,
            "policy": run.policy,
            "mAP last": None if maps["last"] is None else round(maps["last"]["value"], 2),
            "mAP best (epoch)": None if maps["best"] is None
            else f"{maps['best']['value']:.2f} ({maps['best']['epoch']})",
            "mAP (paper)": PAPER_MAP[run.dataset, run.detector, run.backbone][i],
            "epochs": cmp["epochs"],
            "ΔTFLOPs 2x conv.": round(cmp["delta_2x"] / 1e12),
            "ΔTFLOPs measured": None if cmp["delta_measured"] is None
            else round(cmp["delta_measured"] / 1e12),
            "measured / 2x": None if ratio is None else round(ratio, 3),
            "ΔTFLOPs (paper)": PAPER_DELTA[run.dataset, run.backbone][i],
            "samples/epoch": round(acc["run"]["totals"]["samples"] / max(len(acc["epochs"]), 1)),
            "batch": f"{acc['world_size']}x{acc['batch_per_gpu']}",
            "time (min)": round(cmp["seconds"] / 60, 1),
            "ΔT (min)": None if cmp["delta_seconds"] is None
            else round(cmp["delta_seconds"] / 60, 1),
            "peak GiB": round(peak / 2**30, 2) if peak else None,
        })  # fmt: skip
        if acc.get("never_trained"):
            notes.append(
                f"{run.setting}: never trained under any policy (frozen_stages=1, as the "
                f"paper's code): {', '.join(acc['never_trained'])}; a frozen epoch saves "
                "their forward once, not three times, hence measured / 2x < 1"
            )
    for dataset in sorted({r["dataset"] for r in rows}):
        if dataset in SAMPLES_NOTE:
            notes.append(f"{dataset}: {SAMPLES_NOTE[dataset]}")
    columns = ["dataset", "detector", "backbone", "policy", "mAP last", "mAP best (epoch)",
               "mAP (paper)", "epochs", "ΔTFLOPs 2x conv.", "ΔTFLOPs measured",
               "measured / 2x", "ΔTFLOPs (paper)", "samples/epoch", "batch"]  # fmt: skip
    timing = ["dataset", "detector", "backbone", "policy", "mAP last", "epochs", "time (min)",
              "ΔT (min)", "peak GiB"]  # fmt: skip
    legend = [
        "mAP: VOC07 11-point AP@50 on the val split; last = after the final epoch, best = "
        "the best epoch's (the paper's code kept the best checkpoint).",
        "ΔTFLOPs against full training over the same epochs; 2x conv. = the paper's Eq. 1 "
        "(backward = 2 x forward of what trains), measured = what autograd ran; time is "
        "training only (no validation), the warm-up's included for continued runs.",
    ]
    for name, cols in (("table2.md", columns), ("table3.md", timing)):
        with open(os.path.join(out, name), "w") as f:
            f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for row in rows:
                f.write("| " + " | ".join("-" if row[c] is None else str(row[c]) for c in cols)
                        + " |\n")  # fmt: skip
            f.write("\n" + "".join(f"- {line}\n" for line in legend + notes))
    with open(os.path.join(out, "table2.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else columns)
        writer.writeheader()
        writer.writerows(rows)


def execute(command: list[str]) -> int:
    return subprocess.call(command)


def main(argv: Sequence[str] | None = None, runner: Callable[[list[str]], int] = execute) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs per run; each takes 8/N images (the paper's total batch "
                        "of 8), lr stays 0.005")  # fmt: skip
    parser.add_argument("--work-root", default="work_dirs/table2")
    parser.add_argument("--out", default="work_dirs/table2/results")
    parser.add_argument("--continue-from-full", action="store_true",
                        help="start DBF runs from the full run's warm-up checkpoint")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print commands and projections")
    args = parser.parse_args(argv)
    if args.gpus < 1 or TOTAL_BATCH % args.gpus:
        parser.error(
            f"--gpus must divide the paper's total batch of {TOTAL_BATCH}, got {args.gpus}"
        )
    print(
        f"# batch: {args.gpus} GPU(s) x {TOTAL_BATCH // args.gpus} images = {TOTAL_BATCH} per "
        "step, lr 0.005 (the paper's: 8 images on one GPU; lr not rescaled)",
        flush=True,
    )
    for dataset in args.datasets:
        print(
            f"# {dataset}: {SAMPLES[dataset]:,} training samples per epoch"
            + (f"; {SAMPLES_NOTE[dataset]}" if dataset in SAMPLES_NOTE else ""),
            flush=True,
        )
    runs = grid(args.detectors, args.backbones, args.datasets, args.policies)
    if args.continue_from_full:  # full runs first: DBF runs start from their checkpoints
        runs.sort(key=lambda r: r.policy != "full")
    if args.dry_run:
        cache: dict[tuple[str, str], int] = {}

        def forward(run: Run) -> int:
            key = (run.backbone, run.dataset)
            if key not in cache:
                cache[key] = backbone_forward_flops(run)
            return cache[key]

        for run in runs:
            i = POLICIES.index(run.policy)
            print(f"# {run.setting} {run.policy}: {run.frozen_epochs()}/{run.epochs} frozen epochs,"
                  f" projected ΔTFLOPs {projected_delta_tflops(run, forward):,.0f} (paper "
                  f"convention), paper {PAPER_DELTA[run.dataset, run.backbone][i]:,}")  # fmt: skip
            print(shlex.join(run.command(args.work_root, args.gpus)))
        return 0
    status = 0
    for k, run in enumerate(runs, 1):
        if collect(run, args.work_root) is not None:
            print(f"[{k}/{len(runs)}] {run.setting} {run.policy}: done, skipped", flush=True)
            continue
        resume = None
        if args.continue_from_full and run.rho:
            ckpt = os.path.join(Run(run.detector, run.backbone, run.dataset, "full")
                                .work_dir(args.work_root), f"epoch_{run.warmup}.pth")  # fmt: skip
            resume = ckpt if os.path.exists(ckpt) else None
            if resume is None:
                print(f"[{k}/{len(runs)}] {run.setting} {run.policy}: no {ckpt}, so this run "
                      "trains its warm-up itself", flush=True)  # fmt: skip
        print(f"[{k}/{len(runs)}] {run.setting} {run.policy}: {run.epochs} epochs"
              + (f", continuing from {resume}" if resume else ""), flush=True)  # fmt: skip
        start = time.time()
        code = runner(run.command(args.work_root, args.gpus, resume))
        if code != 0:
            print(f"[{k}/{len(runs)}] {run.setting} {run.policy}: failed ({code})", flush=True)
            status = 1
            continue
        with open(os.path.join(run.work_dir(args.work_root), "done.json"), "w") as f:
            json.dump({"seconds": time.time() - start, "command": run.command(args.work_root,
                       args.gpus, resume)}, f)  # fmt: skip
        write_tables(runs, args.work_root, args.out)
    write_tables(runs, args.work_root, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
