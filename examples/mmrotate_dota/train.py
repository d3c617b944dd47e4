"""Train one cell of the DBF paper's Table II: a detector config plus a policy config.

    python examples/mmrotate_dota/train.py configs/retinanet_r50_dota.py \
        --policy configs/policies/dbf.py --epochs 400 --warmup 50 --rho 5 \
        --work-dir work_dirs/retinanet_r50_dota/dbf_rho5

Multi-GPU: `torchrun --nproc_per_node=N train.py ... --launcher pytorch` (freezing
needs DDP's find_unused_parameters=True; this script sets it). The batch is the paper's
total, 8 images, on any number of GPUs: each of N GPUs takes 8/N, and the learning rate
stays the paper's 0.005 (N must divide 8). Both are printed at start. Everything else is
MMEngine's Runner with the config; no MMDetection/MMRotate source is patched.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# Registers FlopAccountingHook (a config built in Python skips custom_imports).
ACCOUNTING = importlib.import_module("dbf_accounting")


def build_config(
    detector: str,
    policy: str,
    *,
    epochs: int,
    warmup: int | None = None,
    rho: float | str | None = None,
    work_dir: str | None = None,
    resume_from: str | None = None,
    launcher: str = "none",
    world_size: int | None = None,
    options: dict | None = None,
) -> Config:
    """The detector config with the policy merged in and the run's settings applied.

    The config's ``train_dataloader.batch_size`` is the paper's *total* batch; on
    ``world_size`` processes (default: ``$WORLD_SIZE`` under a launcher, else 1) each takes
    an equal share and the learning rate is left as configured.
    """
    cfg = Config.fromfile(detector)
    cfg.merge_from_dict(Config.fromfile(policy).to_dict())
    cfg.train_cfg.max_epochs = epochs
    # Every run is accounted (Eq. 1, paper and measured; time; memory): dbf_accounting.py.
    imports = list(cfg.get("custom_imports", {}).get("imports", []))
    cfg.custom_imports = dict(imports=[*imports, "dbf_accounting"], allow_failed_imports=False)
    cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type="FlopAccountingHook")]
    hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") == "FreezeScheduleHook"]
    if warmup is not None or rho is not None:
        if not hooks or hooks[0].schedule.get("type") != "WarmupThenFreeze":
            raise ValueError(
                f"--warmup/--rho apply to the DBF policy (a WarmupThenFreeze schedule); "
                f"{policy} has none (warmup={warmup!r}, rho={rho!r})"
            )
        if warmup is not None:
            hooks[0].schedule.warmup = warmup
        if rho is not None:
            hooks[0].schedule.then.rho = rho
    cfg.work_dir = work_dir or os.path.join(
        "work_dirs",
        os.path.splitext(os.path.basename(detector))[0],
        os.path.splitext(os.path.basename(policy))[0],
    )
    if resume_from:
        cfg.load_from, cfg.resume = resume_from, True
        # MMEngine 0.10 resumes with a bare torch.load, which torch >= 2.6 refuses for the
        # HistoryBuffer objects in its own checkpoints; these are the user's own files.
        os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg.launcher = launcher
    if launcher != "none":
        # Frozen parameters produce no gradient; DDP must be told (the hook checks).
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=True)
    if options:  # before the split: train_dataloader.batch_size=... sets the total
        cfg.merge_from_dict(options)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if launcher != "none" else 1
    total = cfg.train_dataloader.batch_size
    if world_size < 1 or total % world_size:
        raise ValueError(
            f"the paper's total batch of {total} images cannot be split evenly over "
            f"{world_size} processes; use a number of GPUs that divides {total}"
        )
    cfg.train_dataloader.batch_size = total // world_size
    cfg.total_batch = total
    return cfg


def batch_rule(cfg: Config) -> str:
    """The batch and learning rate a run trains with, in one line."""
    per_gpu, total = cfg.train_dataloader.batch_size, cfg.total_batch
    lr = cfg.optim_wrapper.optimizer.lr
    batch_note = "the paper's" if total == 8 else "the paper trained with 8"
    lr_note = "the paper's" if lr == 0.005 else "the paper's is 0.005"
    return (
        f"batch: {total // per_gpu} process(es) x {per_gpu} images = {total} images per "
        f"step ({batch_note}, on one GPU); lr {lr:g} ({lr_note}; not rescaled with the "
        "number of GPUs)"
    )


def main(argv: Sequence[str] | None = None) -> Runner:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("detector", help="a detector config, e.g. configs/retinanet_r50_dota.py")
    parser.add_argument("--policy", required=True, help="configs/policies/{full,frozen,dbf}.py")
    parser.add_argument("--epochs", type=int, required=True, help="total epochs (Table I)")
    parser.add_argument("--warmup", type=int, help="DBF: epochs at rho=1 first (Table I)")
    parser.add_argument("--rho", help="DBF: rho after the warm-up: 2, 5, 10 or inf")
    parser.add_argument("--work-dir")
    parser.add_argument("--resume-from", help="a checkpoint to resume (e.g. a finished rho=1 run)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    args = parser.parse_args(argv)
    rho = args.rho if args.rho in (None, "inf") else float(args.rho)
    cfg = build_config(
        args.detector, args.policy, epochs=args.epochs, warmup=args.warmup,
        rho=int(rho) if isinstance(rho, float) and rho.is_integer() else rho,
        work_dir=args.work_dir, resume_from=args.resume_from, launcher=args.launcher,
        options=args.cfg_options,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        print(batch_rule(cfg), flush=True)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == "__main__":  # DOTAMetric evaluates in a spawn pool: keep this guard
    main()
