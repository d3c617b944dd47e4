"""Overhead of FlopAccountant's sampled FLOP counting over a training run.

    python benchmarks/accounting_overhead.py [--steps 400] [--quick] [--json PATH]

A ResNet-18 detector (CPU, batch 8, 128x128) trains under DBF's Step(2) schedule (the
backbone alternates trainable / frozen every `--epoch-steps` steps). The same run is
timed twice, interleaved epoch by epoch: plain, and wrapped in `FlopAccountant.step`
with two counted steps per freeze state. Reported: the measured same-run ratio, and the
cost of one counted step, from which the overhead of any run length follows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _models import ResNet18Detector

from freezesched import FrozenStageGuard, Step
from freezesched.profiling import FlopAccountant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--epoch-steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="80 steps at 64x64")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.epoch_steps, args.size = 80, 20, 64
    torch.manual_seed(0)
    models = {v: ResNet18Detector() for v in ("plain", "accounted")}
    opts = {v: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for v, m in models.items()}
    accountant = FlopAccountant(models["accounted"], samples_per_state=2)
    guard = FrozenStageGuard(Step(2))
    x = torch.randn(8, 3, args.size, args.size)
    times: dict[str, list[float]] = {"plain": [], "accounted": []}
    counted: list[float] = []

    def step(variant: str, epoch: int) -> float:
        model, opt = models[variant], opts[variant]
        start = time.perf_counter()
        with guard(model.backbone, epoch) as region:
            if variant == "accounted":
                with accountant.step(region, batch_size=len(x)):
                    model(x).square().mean().backward()
            else:
                model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    for variant in models:  # warm-up in both freeze states, outside the accountant's view
        for epoch in (0, 1, 0, 1):
            with guard(models[variant].backbone, epoch):
                models[variant](x).square().mean().backward()
            opts[variant].zero_grad()
    for epoch in range(args.steps // args.epoch_steps):
        for variant in ("plain", "accounted") if epoch % 2 == 0 else ("accounted", "plain"):
            for _ in range(args.epoch_steps):
                sampled_before = accountant.counted_steps
                seconds = step(variant, epoch)
                sampled_after = accountant.counted_steps
                # Counted steps are reported on their own, not mixed into the step times.
                (counted if sampled_after > sampled_before else times[variant]).append(seconds)
    plain = sum(times["plain"])
    accounted = sum(times["accounted"]) + sum(counted)
    median_step = statistics.median(times["plain"])
    extra_per_counted = statistics.median(counted) - median_step
    per_state = 2 * extra_per_counted
    print(f"# {platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"steps per variant:           {len(times['plain'])}")
    print(f"median plain step:           {median_step * 1e3:.1f} ms")
    print(f"median uncounted step:       {statistics.median(times['accounted']) * 1e3:.1f} ms "
          "(accounted run; equal to plain: no lasting cost)")  # fmt: skip
    print(f"counted step costs extra:    {extra_per_counted * 1e3:.1f} ms "
          f"({extra_per_counted / median_step:.2f} plain steps)")  # fmt: skip
    print(
        f"run time ratio (same run):   {accounted / plain:.4f} ({accounted:.1f} s / {plain:.1f} s)"
    )
    for run_steps in (1_000, 10_000, 100_000):
        overhead = 2 * per_state / (run_steps * median_step)  # two freeze states
        print(f"projected overhead, {run_steps:>7,} steps, 2 states: {100 * overhead:.3f} %")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            record = {
                "median_step_s": median_step,
                "extra_per_counted_step_s": extra_per_counted,
                "run_ratio": accounted / plain,
                "steps": len(times["plain"]),
                "counted_steps": accountant.counted_steps,
                "accounted_steps": accountant.totals().steps,
                "phases": [list(p.frozen_modules) for p in accountant.totals().phases],
            }
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
