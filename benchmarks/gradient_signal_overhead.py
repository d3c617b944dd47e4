"""Cost of measuring the gradient signal GradientFreeze observes, as a fraction of a step.

    cd benchmarks && python gradient_signal_overhead.py [--steps 60] [--size 128]
                                                        [--quick] [--json PATH]

A ResNet-18 detector (CPU, batch 8) trains with SGD + momentum. Three copies run
interleaved, step by step, in one process: plain; with a controller whose GradientFreeze
over the backbone's five stages measures every step (`every=1`); and with the default
`every=10`. The GradientFreeze never freezes, so every step is a full-training step and
the variants do the same work. Reported, same run: the cost of one measured
`record_gradients()` call (one fused norm per stage, no synchronization) against the
median plain step, the mean cost per step with the default `every=10`, and the ratios of
the variants' median step times. Once per tick the controller also turns the sums into
floats (`GradientSignal.take`), timed too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _models import ResNet18Detector

from freezesched import FreezeController
from freezesched.freezing import GradientSignal
from freezesched.schedules import GradientFreeze

STAGES = tuple(f"backbone.{i}" for i in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 steps at 32x32")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.size = 3, 32
    torch.manual_seed(0)
    variants = ("plain", "every 1", "every 10")
    models = {v: ResNet18Detector() for v in variants}
    for model in models.values():
        model.load_state_dict(models["plain"].state_dict())
    opts = {v: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for v, m in models.items()}
    ctrls = {
        v: FreezeController(models[v], {STAGES: GradientFreeze(5, threshold=0.0, every=k)})
        for v, k in (("every 1", 1), ("every 10", 10))
    }
    for ctrl in ctrls.values():
        ctrl.apply(0)
    x = torch.randn(8, 3, args.size, args.size)
    step_times: dict[str, list[float]] = {v: [] for v in variants}
    record_times: dict[str, list[float]] = {v: [] for v in ctrls}

    def step(variant: str) -> None:
        model, opt = models[variant], opts[variant]
        start = time.perf_counter()
        model(x).square().mean().backward()
        if variant in ctrls:
            before = time.perf_counter()
            ctrls[variant].record_gradients()
            record_times[variant].append(time.perf_counter() - before)
        opt.step()
        opt.zero_grad()
        step_times[variant].append(time.perf_counter() - start)

    for _ in range(2):  # warm-up, not kept
        for variant in variants:
            step(variant)
    for times in (*step_times.values(), *record_times.values()):
        times.clear()
    for i in range(args.steps):
        order = list(variants[i % 3 :] + variants[: i % 3])  # rotate who goes first
        for variant in order:
            step(variant)
    for ctrl in ctrls.values():
        ctrl.release()
    model = models["every 1"]  # once per tick: the sums become floats (one synchronization)
    signal = GradientSignal([model.get_submodule(name) for name in STAGES])
    model(x).square().mean().backward()
    signal.record()
    start = time.perf_counter()
    norms = signal.take()
    take_seconds = time.perf_counter() - start

    plain = statistics.median(step_times["plain"])
    measured = statistics.median(record_times["every 1"])
    amortized = statistics.mean(record_times["every 10"])
    result = {
        "steps": args.steps,
        "size": args.size,
        "stages": len(STAGES),
        "parameters": sum(p.numel() for p in models["plain"].parameters()),
        "median_plain_step_s": plain,
        "median_step_s": {v: statistics.median(t) for v, t in step_times.items()},
        "median_record_s": measured,
        "record_fraction_of_step": measured / plain,
        "mean_record_every_10_s": amortized,
        "every_10_fraction_of_step": amortized / plain,
        "step_time_ratio": {v: statistics.median(step_times[v]) / plain for v in ctrls},
        "take_s": take_seconds,
        "norms": norms,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    print(f"steps per variant:                  {args.steps} (batch 8, {args.size}x{args.size})")
    print(f"median plain step:                  {plain * 1e3:.1f} ms")
    print(f"one measured record_gradients():    {measured * 1e3:.3f} ms "
          f"({100 * measured / plain:.3f} % of a plain step)")  # fmt: skip
    print(f"per step with every=10 (default):   {amortized * 1e3:.3f} ms "
          f"({100 * amortized / plain:.3f} % of a plain step)")  # fmt: skip
    for v in ctrls:
        ratio = statistics.median(step_times[v]) / plain
        print(f"step time ratio, {v:<8} (same run): {ratio:.4f}")
    print(f"take() once per tick:               {take_seconds * 1e3:.3f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
