"""One rank of the example's 2-process CPU run (a module of its own, for spawn)."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import torch.distributed as dist
from mmengine.runner import Runner
from synthetic import tiny
from train import build_config

EXAMPLE = Path(__file__).resolve().parent.parent


def config(data_root: Path, work_dir: Path, *, launcher: str, world_size: int):
    """DBF after no warm-up with rho=2 (trainable, then frozen), total batch 2, no validation."""
    cfg = build_config(
        str(EXAMPLE / "configs" / "retinanet_r50_dota.py"),
        str(EXAMPLE / "configs" / "policies" / "dbf.py"),
        epochs=2, warmup=0, rho=2, launcher=launcher, world_size=world_size,
        options={"train_dataloader.batch_size": 2},  # the total, split over the ranks
    )  # fmt: skip
    cfg = tiny(cfg, data_root, work_dir, train_batch=None)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None  # no evaluation
    if launcher != "none":
        cfg.model_wrapper_cfg.device_ids = None  # CPU
    return cfg


def run(rank: int, world: int, init_file: str, data_root: str, work_dir: str, results: Any) -> None:
    try:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
        cfg = config(Path(data_root), Path(work_dir), launcher="pytorch", world_size=world)
        runner = Runner.from_cfg(cfg)
        runner.train()
        results.put((rank, "ok", {"batch": cfg.train_dataloader.batch_size}))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
