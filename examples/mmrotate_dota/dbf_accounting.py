"""An MMEngine hook that accounts a run with freezesched's profiler (Eq. 1, both conventions).

Registered as ``FlopAccountingHook``; train.py adds it to every run. The first two
iterations of each freeze state are counted exactly (FLOPs by phase, bytes kept for
backward, peak CUDA memory); the others only add their batch size and wall time
(``freezesched.profiling.FlopAccountant``, which finds the state by looking at what
freezesched holds frozen). Besides the run's totals it keeps, per epoch, the samples
trained in each state, the training time and the validation mAP, so that a run that
continues another (``--continue-from-full``) can be compared with it over the same
epochs.

On N GPUs every rank counts its own samples; at the end the records of all ranks are
combined (``FlopAccountant.gather``) and rank 0 alone writes
``freezesched_accounting.json`` into the work_dir. run_table2.py reads it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from freezesched import is_frozen
from freezesched.profiling import FlopAccountant, RunCost

#: The file each run writes into its work_dir.
FILENAME = "freezesched_accounting.json"
#: The validation metric the tables report (MMRotate's DOTAMetric, VOC07 AP@50).
METRIC = "dota/mAP"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def never_trained(model: nn.Module) -> list[str]:
    """Outermost submodules whose parameters are all ``requires_grad=False`` before any
    freezing by freezesched, e.g. ResNet's stem and first stage under ``frozen_stages=1``."""
    out: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(o + ".") for o in out) or not name:
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and not is_frozen(module):
            out.append(name)
    return out


def epoch_curve(run: RunCost, epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch: samples, measured and 2x FLOPs, from the run's per-sample costs."""
    costs = {",".join(p.frozen_modules): p.cost for p in run.phases}
    curve = []
    for epoch in epochs:
        measured = flops_2x = full_2x = 0
        for key, samples in epoch["samples"].items():
            cost = costs.get(key)
            if cost is None:
                continue
            measured += samples * cost.measured
            flops_2x += samples * cost.flops_2x
            full_2x += samples * cost.full_training_2x
        curve.append(
            {
                **epoch,
                "flops_measured": measured,
                "flops_2x": flops_2x,
                "delta_flops_2x": flops_2x - full_2x,
            }
        )
    return curve


@HOOKS.register_module()
class FlopAccountingHook(Hook):
    """Account every training iteration; write the run's record at the end (rank 0)."""

    priority = "VERY_LOW"  # after FreezeScheduleHook has applied the iteration's state

    def __init__(self, samples_per_state: int = 2, rtol: float = 0.2) -> None:
        # rtol: a detector's loss (assignment, RoI sampling) depends on the boxes of each
        # image, so its sampled steps differ slightly per sample; they are averaged.
        self.samples_per_state = samples_per_state
        self.rtol = rtol
        self.accountant: FlopAccountant | None = None
        self._step: Any = None
        self.epochs: list[dict[str, Any]] = []
        self.maps: list[tuple[int, float]] = []
        self.start_epoch = 0

    def before_train(self, runner: Any) -> None:
        model = _unwrap(runner.model)
        self.accountant = FlopAccountant(
            model, samples_per_state=self.samples_per_state, rtol=self.rtol
        )
        self.never_trained = never_trained(model)
        self.start_epoch = runner.epoch  # > 0 when the run resumed from a checkpoint

    def _samples(self) -> dict[str, int]:
        assert self.accountant is not None
        return {",".join(p.frozen_modules): p.samples for p in self.accountant.totals().phases}

    def before_train_epoch(self, runner: Any) -> None:
        self._epoch_start = time.perf_counter()
        self._samples_before = self._samples()

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        assert self.accountant is not None
        inputs = data_batch["inputs"] if isinstance(data_batch, dict) else data_batch
        self._step = self.accountant.step(batch_size=len(inputs))
        self._step.__enter__()

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)

    def after_train_epoch(self, runner: Any) -> None:
        now = self._samples()
        samples = {k: n - self._samples_before.get(k, 0) for k, n in now.items()}
        self.epochs.append(
            {
                "epoch": runner.epoch,  # 0-based index of the epoch just trained
                "seconds": time.perf_counter() - self._epoch_start,
                "samples": {k: n for k, n in samples.items() if n},
            }
        )

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        if metrics and METRIC in metrics:
            # runner.epoch has advanced past the epoch trained: it counts epochs done.
            self.maps.append((runner.epoch, 100 * float(metrics[METRIC])))

    def after_train(self, runner: Any) -> None:
        assert self.accountant is not None
        run = self.accountant.gather(label=os.path.basename(runner.work_dir))
        # Per epoch, all ranks: samples add up, the time is the slowest rank's.
        ranks = _all_gather(self.epochs)
        epochs = []
        for i, epoch in enumerate(ranks[0]):
            samples: dict[str, int] = {}
            for rank in ranks:
                for key, n in rank[i]["samples"].items():
                    samples[key] = samples.get(key, 0) + n
            seconds = max(rank[i]["seconds"] for rank in ranks)
            epochs.append({"epoch": epoch["epoch"], "seconds": seconds, "samples": samples})
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        last = self.maps[-1] if self.maps else None
        best = max(self.maps, key=lambda m: m[1]) if self.maps else None
        run = run.with_metrics(
            **{"mAP last": last[1] if last else None, "mAP best": best[1] if best else None}
        )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        loader = runner.cfg.train_dataloader
        record = {
            "run": run.to_dict(),
            "epochs": epoch_curve(run, epochs),
            "first_epoch": self.start_epoch,
            "end_epoch": runner.epoch,
            "resumed_from": runner.cfg.get("load_from") if runner.cfg.get("resume") else None,
            "world_size": world,
            "batch_per_gpu": loader.batch_size,
            "total_batch": loader.batch_size * world,
            "lr": runner.cfg.optim_wrapper.optimizer.lr,
            "map": {
                "last": last and {"epoch": last[0], "value": last[1]},
                "best": best and {"epoch": best[0], "value": best[1]},
                "curve": self.maps,
            },
            "never_trained": self.never_trained,
        }
        with open(os.path.join(runner.work_dir, FILENAME), "w") as f:
            json.dump(record, f, indent=2)
