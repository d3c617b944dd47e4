"""A worker for tests/test_ddp.py: one DDP rank on gloo (a module of its own, for spawn)."""

from __future__ import annotations

import datetime
import traceback
from typing import Any

import torch
import torch.distributed as dist
from helpers import batch, make_net
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from freezesched import FreezeController, FrozenStageGuard, Step
from freezesched.profiling import FlopAccountant


def _flat(module: nn.Module, *, buffers: bool = True) -> torch.Tensor:
    tensors = [p.detach().reshape(-1) for p in module.parameters()]
    if buffers:
        tensors += [b.detach().reshape(-1).float() for b in module.buffers()]
    return torch.cat(tensors)


def _mismatches(tensor: torch.Tensor, world: int) -> int:
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return sum(not torch.equal(g, gathered[0]) for g in gathered)


def run(rank: int, world: int, init_file: str, results: Any) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )  # fmt: skip
        model = make_net(seed=0, dropout=0.0)
        # The controller refuses the DDP setting that breaks at the first frozen step.
        try:
            FreezeController(DDP(make_net(seed=0)), {"backbone": Step(2)})
            refused = ""
        except ValueError as error:
            refused = str(error)
        ddp = DDP(model, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        ctrl = FreezeController(ddp, {"backbone": Step(2)}, optimizers=opt, on_unfreeze="reset")
        guard = FrozenStageGuard(Step(3))  # the neck, per step, toggling more often
        acct = FlopAccountant(model)  # state found by looking; runs under DDP; own data
        steps, param_mismatches, buffer_mismatches, frozen_moved = 0, 0, 0, []
        for epoch in range(5):
            ctrl.apply(epoch)
            snapshot = [_flat(model.backbone) if rank == 0 else None]
            dist.broadcast_object_list(snapshot, src=0)
            for i in range(3):
                x, y = batch(100 * rank + 10 * epoch + i)  # each rank its own data
                with guard(model.neck, steps), acct.step(batch_size=len(x)):
                    nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
                steps += 1
                param_mismatches += _mismatches(_flat(model, buffers=False), world)
                if ctrl.frozen["backbone"]:
                    # BN pinned to eval: no rank updates its running stats, so the buffers
                    # DDP broadcast from rank 0 stay identical. (While BN trains, each rank
                    # updates them with its own batch after the broadcast: DDP semantics.)
                    buffer_mismatches += _mismatches(_flat(model.backbone), world)
            if ctrl.frozen["backbone"]:
                # Parameters untouched; buffers are DDP-broadcast from rank 0, whose are.
                frozen_moved.append(not torch.equal(_flat(model.backbone), snapshot[0]))
        ctrl.release()
        results.put((rank, "ok", {"steps": steps, "param_mismatches": param_mismatches,
                                  "buffer_mismatches": buffer_mismatches,
                                  "frozen_moved": frozen_moved, "refused": refused,
                                  "mine": acct.totals().to_dict(),
                                  "gathered": acct.gather().to_dict()}))  # fmt: skip
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
