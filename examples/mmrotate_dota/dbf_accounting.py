"""An MMEngine hook that accounts a run with freezesched's profiler (Eq. 1, both conventions).

Registered as ``FlopAccountingHook``; train.py adds it to every run. The first two
iterations of each freeze state are counted exactly (FLOPs by phase, bytes kept for
backward, peak CUDA memory); the others only add their batch size and wall time
(``freezesched.profiling.FlopAccountant``). At the end of training it writes
``freezesched_accounting.json`` into the work_dir: run totals, ΔF against full training
(paper convention always; measured when a trainable iteration was seen), and per-state
statistics. run_table2.py reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from freezesched import is_frozen
from freezesched.profiling import FlopAccountant


@dataclass
class _State:
    """What FlopAccountant reads from a FrozenRegion: the modules and their decisions."""

    modules: tuple[nn.Module, ...]
    frozen: tuple[bool, ...]


@HOOKS.register_module()
class FlopAccountingHook(Hook):
    priority = "VERY_LOW"  # after FreezeScheduleHook has applied the iteration's state

    def __init__(self, module: str = "backbone", samples_per_state: int = 2) -> None:
        self.module = module
        self.samples_per_state = samples_per_state
        self.accountant: FlopAccountant | None = None
        self._step = None

    def _model(self, runner) -> nn.Module:
        model = runner.model
        return model.module if hasattr(model, "module") else model

    def before_train(self, runner) -> None:
        # rtol: a two-stage detector's RoI head sees a data-dependent number of proposals,
        # so its sampled steps differ slightly per sample; they are averaged.
        self.accountant = FlopAccountant(
            self._model(runner), samples_per_state=self.samples_per_state, rtol=0.2
        )

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        target = self._model(runner).get_submodule(self.module)
        inputs = data_batch["inputs"] if isinstance(data_batch, dict) else data_batch
        self._step = self.accountant.step(_State((target,), (is_frozen(target),)),
                                          batch_size=len(inputs))  # fmt: skip
        self._step.__enter__()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None

    def after_train(self, runner) -> None:
        totals = self.accountant.totals()
        states = []
        for stats in self.accountant.states.values():
            states.append({
                "frozen": bool(stats.state[0]) if stats.state else False,
                "steps": stats.steps,
                "samples": stats.samples,
                "seconds_per_step": sorted(stats.seconds)[len(stats.seconds) // 2]
                if stats.seconds else None,
                "flops_per_sample": stats.cost.measured.total if stats.cost else None,
                "saved_bytes": list(stats.saved_bytes),
                "peak_cuda_bytes": list(stats.peak_cuda_bytes),
            })  # fmt: skip
        record = {
            "samples": totals.samples,
            "flops_paper": totals.flops_paper,
            "flops_measured": totals.flops_measured,
            "delta_flops_paper": totals.delta_flops_paper,
            "delta_flops_measured": totals.delta_flops_measured,
            "states": states,
        }
        with open(os.path.join(runner.work_dir, "freezesched_accounting.json"), "w") as f:
            json.dump(record, f, indent=2)
