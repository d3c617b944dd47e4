"""A worker for tests/test_adaptive_controller.py: one DDP rank whose metrics differ by rank."""

from __future__ import annotations

import datetime
import traceback
from typing import Any

import torch
import torch.distributed as dist
from helpers import batch, make_net
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from freezesched import FreezeController
from freezesched.freezing import agree_across_ranks
from freezesched.schedules import GradientFreeze, Plateau, commit

#: What each rank measures after epochs 0..4: different on each rank; their means are
#: 1.5, 1.0, 0.75, 0.76, 0.77.
LOCAL = {0: [1.0, 0.8, 0.2, 0.22, 0.24], 1: [2.0, 1.2, 1.3, 1.3, 1.3]}


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def run(rank: int, world: int, init_file: str, results: Any) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        model = make_net(seed=0, dropout=0.0)
        ddp = DDP(model, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        gradient = GradientFreeze(2, percentile=100, max_frozen=1, every=1)
        ctrl = FreezeController(
            ddp, {"backbone": Plateau(patience=0), ("neck", "head"): gradient}, optimizers=opt
        )
        alone = Plateau(patience=0)  # this rank's own values, without agreeing
        decisions, out_of_sync = [], 0
        for epoch in range(6):
            decisions.append(ctrl.apply(epoch))
            commit(alone, epoch)
            for i in range(2):
                x, y = batch(100 * rank + 10 * epoch + i)  # each rank its own data
                nn.functional.cross_entropy(ddp(x), y).backward()
                ctrl.record_gradients()
                opt.step()
                opt.zero_grad()
                gathered = [torch.empty_like(_flat(model)) for _ in range(world)]
                dist.all_gather(gathered, _flat(model))
                out_of_sync += sum(not torch.equal(g, gathered[0]) for g in gathered)
            if epoch < 5:
                ctrl.observe(epoch, LOCAL[rank][epoch])
                alone.observe(epoch, LOCAL[rank][epoch])
        # What every rank agrees on, epoch by epoch (the values the controller observed).
        observed = [agree_across_ranks(e, LOCAL[rank][e], what="x") for e in range(5)]
        all_decisions = [None] * world
        dist.all_gather_object(all_decisions, [d["neck"] for d in decisions])
        ctrl.release()
        other = FreezeController(make_net(seed=0), {"backbone": Plateau()})
        other.apply(0)
        try:
            other.observe(rank, 1.0)  # the ranks disagree on the tick
            disagree = ""
        except ValueError as error:
            disagree = str(error)
        other.release()
        results.put((rank, "ok", {
            "decisions": decisions,
            "alone": alone.timeline(6).tolist(),
            "observed": observed,
            "gradient_decisions_agree": all_decisions[0] == all_decisions[1],
            "neck": [d["neck"] for d in decisions],
            "params_out_of_sync": out_of_sync,
            "disagree": disagree,
        }))  # fmt: skip
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
