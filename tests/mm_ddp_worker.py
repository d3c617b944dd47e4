"""A worker for tests/test_integration_mmengine.py: one rank of an MMEngine run on gloo."""

from __future__ import annotations

import datetime
import os
import traceback
from typing import Any

import mm_toy
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

HOOK = {"type": "FreezeScheduleHook", "module": "backbone", "schedule": {"type": "Step", "rho": 2}}


class Watch(Hook):
    """Per epoch: did this rank's backbone move; after every iteration: ranks in sync."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.moved: list[bool] = []
        self.out_of_sync = 0

    def before_train_epoch(self, runner) -> None:
        self.before = [p.detach().clone() for p in runner.model.module.backbone.parameters()]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in runner.model.module.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.out_of_sync += sum(not torch.equal(g, gathered[0]) for g in gathered)

    def after_train_epoch(self, runner) -> None:
        now = list(runner.model.module.backbone.parameters())
        self.moved.append(any(not torch.equal(a, b) for a, b in zip(self.before, now, strict=True)))


def runner(work_dir: str, find_unused: bool) -> Runner:
    cfg = mm_toy.config(
        work_dir,
        4,
        HOOK,
        launcher="pytorch",
        model_wrapper_cfg={
            "type": "MMDistributedDataParallel",
            "find_unused_parameters": find_unused,
            "device_ids": None,  # CPU
        },
    )
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, f"config_{dist.get_rank()}.py")
    Config(cfg).dump(path)
    return Runner.from_cfg(Config.fromfile(path))  # custom_imports registers the hook


def run(rank: int, world: int, init_file: str, work_dir: str, results: Any) -> None:
    try:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )  # fmt: skip
        refused = ""
        try:  # the setting that hangs or fails at the first frozen step is refused up front
            runner(os.path.join(work_dir, "refused"), find_unused=False).train()
        except ValueError as e:
            refused = str(e)
        run_ = runner(os.path.join(work_dir, "ok"), find_unused=True)
        watch = Watch()
        run_.register_hook(watch)
        run_.train()
        results.put((rank, "ok", {"refused": refused, "moved": watch.moved,
                                  "out_of_sync": watch.out_of_sync}))  # fmt: skip
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
