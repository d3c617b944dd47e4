"""How long evaluating each schedule over a long timeline takes (vectorized).

    python benchmarks/timeline_speed.py [--ticks 1000000] [--repeat 5] [--json PATH]

Reports the median of ``--repeat`` runs per schedule, and the ratio to the issue's budget
of 1 s per million ticks. A per-tick Python loop over ``s(t)`` is timed on a 10,000-tick
slice for contrast.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from freezesched import (
    Cosine,
    Layerwise,
    Sequential,
    Step,
    WarmupThenFreeze,
)
from freezesched.profiling import FlopCount, StepCost, project

SCHEDULES = {
    "Step(5)": Step(5),
    "Step(inf)": Step(math.inf),
    "WarmupThenFreeze(50, Step(5))": WarmupThenFreeze(50, then=Step(5)),
    "Cosine(0, 1e6)": Cosine(begin=0, end=1_000_000),
    "Sequential(3 children)": Sequential([Step(1), Step(2), Cosine(0, 10_000)], [1000, 5000]),
    "Step(2) & ~Step(3) | Step(7)": (Step(2) & ~Step(3)) | Step(7),
    "Layerwise.progressive(5, cubic)": Layerwise.progressive(5, 0, 900_000, spacing="cubic"),
    "Layerwise.gradual_unfreeze(5)": Layerwise.gradual_unfreeze(5, begin=10, every=100),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    print(f"# {platform.platform()}, {platform.processor() or 'cpu'}, torch {torch.__version__}")
    print(f"{'schedule':34} {'timeline s':>10} {'x budget':>9} {'loop s/1e4':>11}")
    records = []
    for name, schedule in SCHEDULES.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            schedule.timeline(args.ticks)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        start = time.perf_counter()
        for t in range(10_000):
            schedule(t)
        loop = time.perf_counter() - start
        budget = median / (args.ticks / 1_000_000)
        print(f"{name:34} {median:10.4f} {budget:9.3f} {loop:11.3f}")
        records.append({"schedule": name, "ticks": args.ticks, "median_s": median,
                        "fraction_of_budget": budget, "scalar_loop_s_per_1e4": loop})  # fmt: skip
    # Eq. 1 projection of 1,600 epochs (the paper's longest run) for every binary schedule
    # above, from per-state costs: the arithmetic the `project` CLI does after counting.
    costs = {s: StepCost(("backbone",) if s[0] else (), FlopCount(forward=10**9,
                                                                      weight_grad=10**9),
                         5 * 10**8 if s[0] else 0)
             for s in [(False,), (True,)]}  # fmt: skip
    start = time.perf_counter()
    for schedule in SCHEDULES.values():
        if schedule.num_stages == 1:
            project(costs, schedule, epochs=1600, samples_per_epoch=11725, num_modules=1)
    seconds = time.perf_counter() - start
    print(f"Eq. 1 projection, 1,600 epochs, 6 schedules: {seconds:.4f} s in all")
    records.append({"schedule": "project(1600 epochs) x 6", "median_s": seconds})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
