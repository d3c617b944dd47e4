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
checkpoint at the end of the warm-up, as the paper does (the warm-up is then trained once).
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
#: Training samples per epoch: DOTA v1.0 train split in 1024x1024 patches (gap 200);
#: DIOR-R train split. (The paper's DIOR-R ΔTFLOPs imply train+val, 11,725; docs/table2.md.)
SAMPLES = {"dota": 15749, "dior-r": 5862}
RESOLUTION = {"dota": 1024, "dior-r": 800}
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
    """What a finished run produced, or None if it has not finished."""
    done = os.path.join(run.work_dir(root), "done.json")
    if not os.path.exists(done):
        return None
    with open(done) as f:
        record = json.load(f)
    accounting = os.path.join(run.work_dir(root), "freezesched_accounting.json")
    if os.path.exists(accounting):
        with open(accounting) as f:
            record["accounting"] = json.load(f)
    maps = []
    for dirpath, _, files in os.walk(run.work_dir(root)):
        if "scalars.json" in files:
            with open(os.path.join(dirpath, "scalars.json")) as f:
                maps += [json.loads(line)["dota/mAP"] for line in f if "dota/mAP" in line]
    record["map"] = 100 * maps[-1] if maps else None
    return record


def write_tables(runs: Sequence[Run], root: str, out: str) -> None:
    """Table II (mAP, ΔTFLOPs) and Table III (time, memory) for every finished run."""
    os.makedirs(out, exist_ok=True)
    results = {run: collect(run, root) for run in runs}
    rows = []
    for run, record in results.items():
        if record is None:
            continue
        i = POLICIES.index(run.policy)
        acc = record.get("accounting", {})
        full = results.get(Run(run.detector, run.backbone, run.dataset, "full")) or {}
        full_measured = full.get("accounting", {}).get("flops_measured")
        measured = acc.get("flops_measured")
        peak = max((b for s in acc.get("states", []) for b in s["peak_cuda_bytes"]), default=None)
        rows.append({
            "dataset": run.dataset, "detector": run.detector, "backbone": run.backbone,
            "policy": run.policy,
            "mAP": None if record["map"] is None else round(record["map"], 2),
            "mAP (paper)": PAPER_MAP[run.dataset, run.detector, run.backbone][i],
            "ΔTFLOPs paper conv.": None if "delta_flops_paper" not in acc
            else round(acc["delta_flops_paper"] / 1e12),
            "ΔTFLOPs measured": None if measured is None or full_measured is None
            else round((measured - full_measured) / 1e12),
            "ΔTFLOPs (paper)": PAPER_DELTA[run.dataset, run.backbone][i],
            "time (min)": round(record["seconds"] / 60, 1),
            "ΔT (min)": None if "seconds" not in full
            else round((record["seconds"] - full["seconds"]) / 60, 1),
            "peak GiB": None if peak is None else round(peak / 2**30, 2),
        })  # fmt: skip
    columns = ["dataset", "detector", "backbone", "policy", "mAP", "mAP (paper)",
               "ΔTFLOPs paper conv.", "ΔTFLOPs measured", "ΔTFLOPs (paper)"]  # fmt: skip
    timing = ["dataset", "detector", "backbone", "policy", "mAP", "time (min)", "ΔT (min)",
              "peak GiB"]  # fmt: skip
    for name, cols in (("table2.md", columns), ("table3.md", timing)):
        with open(os.path.join(out, name), "w") as f:
            f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for row in rows:
                f.write("| " + " | ".join("-" if row[c] is None else str(row[c]) for c in cols)
                        + " |\n")  # fmt: skip
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
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--work-root", default="work_dirs/table2")
    parser.add_argument("--out", default="work_dirs/table2/results")
    parser.add_argument("--continue-from-full", action="store_true",
                        help="start DBF runs from the full run's warm-up checkpoint")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print commands and projections")
    args = parser.parse_args(argv)
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
