"""A worker for tests/test_deepspeed.py: one DeepSpeed rank on the CPU accelerator with gloo."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12)))
    model.add_module("head", nn.Linear(12, 3))
    return model


def run(rank: int, world: int, port: int, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    try:
        results.put((rank, "ok", _stages(rank, world)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _stages(rank: int, world: int) -> dict[int, dict[str, Any]]:
    import deepspeed
    import torch.distributed as dist

    from freezesched import Constant, FreezeController, Step, UnfreezeAt, freeze

    deepspeed.init_distributed(dist_backend="gloo")
    out: dict[int, dict[str, Any]] = {}
    for stage in (1, 2, 3):

        def engine(model: nn.Module, stage: int = stage) -> Any:
            params = [p for p in model.parameters() if p.requires_grad]
            config = {
                "train_micro_batch_size_per_gpu": 4,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
            }
            opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
            return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]

        def full(module: nn.Module, stage: int = stage) -> list[torch.Tensor]:
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
                return [p.detach().clone() for p in params]

        def step(eng: Any, i: int) -> None:
            g = torch.Generator().manual_seed(100 * rank + i)
            eng.backward(eng(torch.randn(4, 6, generator=g)).sum())
            eng.step()

        result: dict[str, Any] = {}
        # The recipe: frozen before initialize, for the whole run.
        model = _model()
        with freeze(model.backbone):
            eng = engine(model)
            ctrl = FreezeController(eng, {"backbone": Constant(True)})  # accepted
            backbone, head = full(model.backbone), full(model.head)
            for i in range(2):
                ctrl.apply(i)
                step(eng, i)
            result["backbone_moved"] = any(
                not torch.equal(a, b) for a, b in zip(backbone, full(model.backbone), strict=True)
            )
            result["head_moved"] = any(
                not torch.equal(a, b) for a, b in zip(head, full(model.head), strict=True)
            )
            flat = torch.cat([t.reshape(-1) for t in full(model)])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            result["rank_mismatches"] = sum(not torch.equal(g, gathered[0]) for g in gathered)
            ctrl.release()
            try:
                FreezeController(eng, {"backbone": UnfreezeAt(3)})
                result["unfreeze_refused"] = ""
            except ValueError as error:
                result["unfreeze_refused"] = str(error)
        # Frozen after initialize: refused by the controller and by the guard's hook.
        model = _model()
        eng = engine(model)
        try:
            FreezeController(eng, {"backbone": Step(2)})
            result["toggle_refused"] = ""
        except ValueError as error:
            result["toggle_refused"] = str(error)
        before = full(model)
        try:
            with freeze(model.backbone):
                step(eng, 0)
            result["guard_refused"] = ""
        except ValueError as error:
            result["guard_refused"] = str(error)
        result["refused_untouched"] = all(
            torch.equal(a, b) for a, b in zip(before, full(model), strict=True)
        )
        out[stage] = result
    return out
