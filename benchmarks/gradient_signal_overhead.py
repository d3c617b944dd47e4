"""Cost of measuring the gradient signal GradientFreeze observes, as a fraction of a step.

    python benchmarks/gradient_signal_overhead.py [--steps 60] [--size 128] [--quick] [--json PATH]

A ResNet-18 detector (CPU, batch 8) trains with SGD + momentum; the controller schedules
its backbone's five stages with a GradientFreeze that never freezes (so every step is a
full-training step and the two variants do the same work). Each step of the measured
variant also calls `ctrl.record_gradients()` (one fused norm per stage, no
synchronization). Both variants run interleaved, step by step, in one process. Reported,
same run: the median time of `record_gradients()` against the median plain step, and the
ratio of the two variants' median step times. Once per tick the controller also turns the
sums into floats (`GradientSignal.take`), timed too.
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
    parser.add_argument("--quick", action="store_true", help="12 steps at 64x64")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.size = 12, 64
    torch.manual_seed(0)
    models = {v: ResNet18Detector() for v in ("plain", "signal")}
    models["signal"].load_state_dict(models["plain"].state_dict())
    opts = {v: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for v, m in models.items()}
    ctrl = FreezeController(models["signal"], {STAGES: GradientFreeze(5, threshold=0.0)})
    ctrl.apply(0)
    x = torch.randn(8, 3, args.size, args.size)
    step_times: dict[str, list[float]] = {"plain": [], "signal": []}
    record_times: list[float] = []

    def step(variant: str) -> None:
        model, opt = models[variant], opts[variant]
        start = time.perf_counter()
        model(x).square().mean().backward()
        if variant == "signal":
            before = time.perf_counter()
            ctrl.record_gradients()
            record_times.append(time.perf_counter() - before)
        opt.step()
        opt.zero_grad()
        step_times[variant].append(time.perf_counter() - start)

    for _ in range(2):  # warm-up, not kept
        for variant in models:
            step(variant)
    for times in (*step_times.values(), record_times):
        times.clear()
    for i in range(args.steps):
        for variant in (("plain", "signal") if i % 2 == 0 else ("signal", "plain")):
            step(variant)
    ctrl.release()
    model = models["signal"]  # once per tick: the sums become floats (one synchronization)
    signal = GradientSignal([model.get_submodule(name) for name in STAGES])
    model(x).square().mean().backward()
    signal.record()
    start = time.perf_counter()
    norms = signal.take()
    take_seconds = time.perf_counter() - start

    plain = statistics.median(step_times["plain"])
    measured = statistics.median(step_times["signal"])
    record = statistics.median(record_times)
    result = {
        "steps": args.steps,
        "size": args.size,
        "stages": len(STAGES),
        "parameters": sum(p.numel() for p in models["plain"].parameters()),
        "median_plain_step_s": plain,
        "median_step_with_signal_s": measured,
        "median_record_s": record,
        "record_fraction_of_step": record / plain,
        "step_time_ratio": measured / plain,
        "take_s": take_seconds,
        "norms": norms,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    print(f"steps per variant:             {args.steps} (batch 8, {args.size}x{args.size})")
    print(f"median plain step:             {plain * 1e3:.1f} ms")
    print(f"median step with the signal:   {measured * 1e3:.1f} ms")
    print(f"median record_gradients():     {record * 1e3:.3f} ms")
    print(f"record / plain step:           {100 * record / plain:.3f} %")
    print(f"step time ratio (same run):    {measured / plain:.4f}")
    print(f"take() once per tick:          {take_seconds * 1e3:.3f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
