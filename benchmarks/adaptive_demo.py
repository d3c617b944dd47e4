"""Accuracy against training FLOPs on the demo's task, fixed and adaptive policies.

    cd benchmarks && python adaptive_demo.py [--seeds 0 1 2] [--epochs 15] [--json PATH]
                                             [--plot PATH] [--quick]

Runs the demo (`freezesched.demo.run_demo`: a small CNN pretrained on a source task,
fine-tuned on a shifted domain) once per seed, under its six policies: full, frozen,
DBF ρ=5, cosine, and the adaptive plateau and gradient policies. Each seed is one run in
which every policy starts from the same pretrained weights and sees the same data order.
Prints each seed's table (accuracy on a held-out test split, measured FLOPs) and a
summary over seeds; writes the records as JSON and a figure: accuracy against training
FLOPs for every seed (small points) and their mean (large), and when each policy froze
in the first seed.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from typing import Any

import torch

from freezesched.demo import STAGES, policies, run_demo
from freezesched.profiling import render_runs
from freezesched.schedules import Schedule, evaluate, timeline


def _decided(plan: dict[str, Schedule], epochs: int) -> dict[str, list[list[bool]]]:
    return {name: timeline(s, epochs).tolist() for name, s in plan.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--samples", type=int, default=768)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs, 32 images")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.samples, args.pretrain_epochs = [0], 2, 32, 1
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    first_plan: dict[str, Schedule] = {}
    for seed in args.seeds:
        plan = policies(args.epochs)
        results = run_demo(epochs=args.epochs, samples=args.samples, seed=seed, plan=plan,
                           pretrain_epochs=args.pretrain_epochs, stream=io.StringIO())  # fmt: skip
        first_plan = first_plan or plan
        print(f"seed {seed}")
        print(render_runs(results, metrics=["val acc %"]))
        print()
        decided = _decided(plan, args.epochs)
        for r in results:
            runs.append({
                "seed": seed,
                "policy": r.label,
                "schedule": r.schedule,
                "test_accuracy_pct": r.metrics["val acc %"],
                "flops_measured": r.flops_measured,
                "frozen_ticks": r.frozen_ticks,
                "decisions": decided[r.label],
            })  # fmt: skip
    names = list(first_plan)
    full = {r["seed"]: r["flops_measured"] for r in runs if r["policy"] == names[0]}
    lines = ["policy           acc % mean  [min, max]      TFLOPs mean  vs full  frozen epochs"]
    summary = []
    for name in names:
        rows = [r for r in runs if r["policy"] == name]
        acc = [r["test_accuracy_pct"] for r in rows]
        flops = [r["flops_measured"] for r in rows]
        ratio = statistics.mean(r["flops_measured"] / full[r["seed"]] for r in rows)
        frozen = [r["frozen_ticks"] for r in rows]
        summary.append({"policy": name, "accuracy_mean": statistics.mean(acc),
                        "accuracy_min": min(acc), "accuracy_max": max(acc),
                        "flops_mean": statistics.mean(flops), "flops_vs_full": ratio,
                        "frozen_ticks": frozen})  # fmt: skip
        lines.append(
            f"{name:<16} {statistics.mean(acc):>10.1f}  [{min(acc):.1f}, {max(acc):.1f}]"
            f"{'':<4}{statistics.mean(flops) / 1e12:>11.4f}  {ratio:>7.3f}  "
            + ", ".join(f"{f:g}" for f in frozen)
        )
    seconds = time.perf_counter() - started
    print(f"summary over seeds {args.seeds} ({args.epochs} epochs, {args.samples} images):")
    print("\n".join(lines))
    print(f"\n{seconds:.0f} s on {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            record = {"seeds": args.seeds, "epochs": args.epochs, "samples": args.samples,
                      "runs": runs, "summary": summary}  # fmt: skip
            json.dump(record, f, indent=2, ensure_ascii=False)
    if args.plot:
        _plot(runs, summary, first_plan, args.epochs, args.plot)


def _plot(runs, summary, plan, epochs, path) -> None:
    from freezesched.plot import new_axes, plot_timeline, save

    top = new_axes(11.0, 7.5)
    figure: Any = top.figure
    top.remove()
    upper, lower = figure.subplots(2, 1, height_ratios=[1, 1.5])
    labels: list[str] = []
    for name, schedule in plan.items():
        n = schedule.num_stages
        labels += [name] if n == 1 else [f"{name} [{STAGES[i]}]" for i in range(n)]

    def rows(tick: int) -> tuple[bool, ...]:
        return tuple(d for s in plan.values() for d in evaluate(s, tick))

    plot_timeline(rows, epochs, stage_labels=labels, ax=upper)
    upper.set_title("when each policy froze the backbone, first seed (filled = frozen)",
                    fontsize="medium")  # fmt: skip
    for i, row in enumerate(summary):
        color = f"C{i}"
        mine = [r for r in runs if r["policy"] == row["policy"]]
        xs = [r["flops_measured"] / 1e12 for r in mine]
        lower.scatter(xs, [r["test_accuracy_pct"] for r in mine], s=12, alpha=0.5, color=color)
        lower.scatter([row["flops_mean"] / 1e12], [row["accuracy_mean"]], s=70, color=color,
                      label=row["policy"], edgecolors="black", zorder=3)  # fmt: skip
    lower.set_xlabel("training TFLOPs (measured)")
    lower.set_ylabel("test accuracy %")
    lower.grid(alpha=0.3)
    lower.legend(fontsize="small")
    lower.set_title("accuracy against training FLOPs (small: each seed, large: mean)",
                    fontsize="medium")  # fmt: skip
    save(upper, path)


if __name__ == "__main__":
    main()
