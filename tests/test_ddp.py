"""DistributedDataParallel: 2 processes on gloo (CPU), freezing toggled several times."""

from __future__ import annotations

import ddp_worker
import pytest
from helpers import run_ranks

WORLD = 2
TIMEOUT = 120  # seconds; a hang fails the test instead of the CI run


def test_ddp_training_with_toggled_freezing_stays_in_sync_and_exact(tmp_path):
    outcomes = run_ranks(ddp_worker.run, WORLD, TIMEOUT, str(tmp_path / "rendezvous"))
    for payload in outcomes.values():
        assert payload["steps"] == 15
        assert payload["param_mismatches"] == 0  # parameters equal across ranks, every step
        assert payload["buffer_mismatches"] == 0  # and buffers too while frozen
        assert payload["frozen_moved"] == [False, False]  # epochs 1 and 3
        assert "find_unused_parameters=True" in payload["refused"]


def test_accountant_gather_gives_the_single_process_totals(tmp_path):
    """Each rank counts its own samples; gather() must give the whole run's totals: the
    same as one process training both ranks' batches under the same freeze states (the
    first release wrote one rank's, 1/N of the truth)."""
    import torch
    from helpers import batch, make_net
    from torch import nn

    from freezesched import FreezeController, FrozenStageGuard, Step
    from freezesched.profiling import FlopAccountant, FrozenMiddleWarning

    outcomes = run_ranks(ddp_worker.run, WORLD, TIMEOUT, str(tmp_path / "rendezvous"))
    model = make_net(seed=0, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = FreezeController(model, {"backbone": Step(2)}, optimizers=opt, on_unfreeze="reset")
    guard, acct = FrozenStageGuard(Step(3)), FlopAccountant(model)

    def train() -> None:
        steps = 0
        for epoch in range(5):
            ctrl.apply(epoch)
            for i in range(3):
                for rank in range(WORLD):
                    x, y = batch(100 * rank + 10 * epoch + i)
                    with guard(model.neck, steps), acct.step(batch_size=len(x)):
                        nn.functional.cross_entropy(model(x), y).backward()
                opt.zero_grad()
                steps += 1

    with pytest.warns(FrozenMiddleWarning, match="frozen neck still compute"):
        train()
    ctrl.release()
    single = acct.totals().to_dict()
    assert len(single["phases"]) == 4  # nothing / neck / backbone / both frozen
    for payload in outcomes.values():
        mine, gathered = payload["mine"]["totals"], payload["gathered"]["totals"]
        assert mine["samples"] * WORLD == gathered["samples"] == single["totals"]["samples"]
        for key in ("flops_measured", "flops_2x", "delta_flops_measured", "delta_flops_2x"):
            assert gathered[key] == single["totals"][key], key
            assert mine[key] * WORLD == gathered[key], key
        assert gathered["delta_flops_2x"] < 0
        # Ranks step together: 15 steps, not 30, and the wall time is one rank's.
        assert gathered["steps"] == mine["steps"] == 15
        assert [p["frozen_modules"] for p in payload["gathered"]["phases"]] == [
            p["frozen_modules"] for p in single["phases"]
        ]
