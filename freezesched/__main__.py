"""Command line: ``python -m freezesched {demo,timeline,project}``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from freezesched.demo import format_table, run_demo, to_json

    print(
        f"freezesched demo: fine-tuning a pretrained CNN for {args.epochs} epochs on "
        f"{args.samples} embedded synthetic images under four policies (CPU)...",
        file=sys.stderr,
    )
    results = run_demo(
        epochs=args.epochs,
        samples=args.samples,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(to_json(results) + "\n")
    if args.plot:
        try:
            _demo_plot(results, args.epochs, args.plot)
        except ImportError as error:
            print(f"freezesched demo: no plot written ({error})", file=sys.stderr)
        else:
            print(f"freezesched demo: wrote {args.plot}", file=sys.stderr)
    return 0


def _demo_plot(results: Sequence[Any], epochs: int, path: str) -> None:
    """Timelines of the demo's policies above their cumulative training FLOPs."""
    from freezesched.demo import policies
    from freezesched.plot import new_axes, plot_cumulative_flops, plot_timeline, save
    from freezesched.schedules import Layerwise

    plan = policies(epochs)
    top = new_axes(8.0, 6.0)
    figure: Any = top.figure
    top.remove()
    upper, lower = figure.subplots(2, 1, height_ratios=[1, 2])
    plot_timeline(Layerwise(tuple(plan.values())), epochs, stage_labels=list(plan), ax=upper)
    upper.set_title("when each policy freezes the backbone (filled = frozen)", fontsize="medium")
    plot_cumulative_flops(
        {r.policy: [1e12 * t for t in r.cumulative_tflops] for r in results}, ax=lower
    )
    lower.set_title("training FLOPs, measured by the profiler", fontsize="medium")
    save(upper, path)


def _timeline(args: argparse.Namespace) -> int:
    from freezesched.schedules import schedule_from_config

    try:
        schedule = schedule_from_config(json.loads(args.schedule))
        line = schedule.timeline(args.ticks, start=args.start)
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        print(f"freezesched timeline: {error}", file=sys.stderr)
        return 2
    print(repr(schedule))
    if args.plot:
        try:
            from freezesched.plot import plot_timeline, save

            save(plot_timeline(schedule, args.ticks, start=args.start), args.plot)
        except ImportError as error:
            print(f"freezesched timeline: {error}", file=sys.stderr)
            return 2
    rows = line.reshape(len(line), -1).T
    for i, row in enumerate(rows):
        label = "frozen" if len(rows) == 1 else f"stage {i}"
        marks = "".join("#" if f else "." for f in row)
        print(f"{label:>8} {marks}  ({int(row.sum())}/{len(row)} frozen; # = frozen)")
    return 0


def _load_model(spec: str) -> Any:
    """``"package.module:attr"`` -> the module, or what calling ``attr()`` returns."""
    import importlib

    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def _default_policies(warmup: int) -> dict[str, Any]:
    from freezesched.schedules import Step, WarmupThenFreeze

    policies: dict[str, Any] = {"full (ρ=1)": Step(1), "frozen (ρ=∞)": Step(math.inf)}
    for rho in (2, 5, 10, math.inf):
        label = "∞" if math.isinf(rho) else str(rho)
        if warmup:
            policies[f"DBF (ρ=1 → ρ={label})"] = WarmupThenFreeze(warmup, then=Step(rho))
        else:
            policies[f"DBF (ρ={label})"] = Step(rho)
    return policies


def _project(args: argparse.Namespace) -> int:
    from freezesched.profiling import policy_table, project_policies
    from freezesched.schedules import schedule_from_config

    try:
        model = _load_model(args.model)
        shape = [int(s) for s in args.input_shape.split(",")]
        modules = [m for spec in args.module for m in spec.split(",") if m]
        policies: dict[str, Any] = {}
        for spec in args.policy:
            label, sep, config = spec.partition("=")
            if not sep:
                raise ValueError(f"--policy must look like 'NAME=JSON', got {spec!r}")
            policies[label] = schedule_from_config(json.loads(config))
        rows = project_policies(
            model,
            shape,
            modules,
            policies or _default_policies(args.warmup),
            epochs=args.epochs,
            samples_per_epoch=args.samples,
            device=args.device,
        )
    except (ValueError, TypeError, ImportError, AttributeError, KeyError) as error:
        print(f"freezesched project: {error}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            _project_plot(model, shape, modules, policies or _default_policies(args.warmup), args)
        except ImportError as error:
            print(f"freezesched project: {error}", file=sys.stderr)
            return 2
    table = policy_table(rows, args.format)
    print(
        f"# {args.model}, frozen: {', '.join(modules)}, input {tuple(shape)}, "
        f"{args.epochs} epochs x {args.samples} samples; FLOPs = 2 x MACs",
        file=sys.stderr,
    )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    else:
        print(table)
    return 0


def _project_plot(
    model: Any, shape: list[int], modules: list[str], policies: dict[str, Any], args: Any
) -> None:
    """Cumulative training FLOPs (paper convention) of each policy, epoch by epoch."""
    from freezesched.plot import plot_cumulative_flops, save
    from freezesched.profiling import cumulative_flops, measure_policy_costs

    costs = measure_policy_costs(
        model, shape, modules, policies.values(), epochs=args.epochs, device=args.device
    )
    curves = {
        label: cumulative_flops(
            costs, schedule, epochs=args.epochs, samples_per_epoch=args.samples,
            num_modules=len(modules), convention="paper",
        )
        for label, schedule in policies.items()
    }  # fmt: skip
    ax = plot_cumulative_flops(curves)
    ax.set_title(f"Eq. 1, paper convention: {args.model}", fontsize="medium")
    save(ax, args.plot)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freezesched", description="Freezing schedules for PyTorch fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune a small CNN under four freezing policies")
    demo.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs per policy")
    demo.add_argument("--samples", type=int, default=768, help="training images")
    demo.add_argument("--pretrain-epochs", type=int, default=4, help="source-task epochs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    demo.add_argument(
        "--plot",
        metavar="PATH",
        default="freezesched-demo.png",
        help="write timelines and cumulative FLOPs here ('' for none; needs matplotlib)",
    )
    demo.set_defaults(run=_demo)
    timeline = sub.add_parser("timeline", help="print a schedule's decisions over ticks")
    timeline.add_argument(
        "schedule", help='a schedule config as JSON, e.g. \'{"type": "Step", "rho": 5}\''
    )
    timeline.add_argument("--ticks", type=int, default=40, help="one past the last tick")
    timeline.add_argument("--start", type=int, default=0, help="the first tick")
    timeline.add_argument("--plot", metavar="PATH", help="also draw it into this image file")
    timeline.set_defaults(run=_timeline)
    project = sub.add_parser(
        "project",
        help="Eq. 1: training FLOPs and ΔTFLOPs of freezing policies, without training",
    )
    project.add_argument(
        "--model",
        required=True,
        help="import path of a model or factory, e.g. torchvision.models:resnet50",
    )
    project.add_argument(
        "--module",
        action="append",
        required=True,
        help="submodule(s) to freeze, dotted; repeat or comma-separate",
    )
    project.add_argument(
        "--input-shape", required=True, help="example batch shape, e.g. 1,3,800,800"
    )
    project.add_argument("--epochs", type=int, required=True, help="epochs per run")
    project.add_argument("--samples", type=int, required=True, help="training samples per epoch")
    project.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a policy as a schedule config; default: the paper's Table II set",
    )
    project.add_argument(
        "--warmup", type=int, default=0, help="ρ=1 epochs before DBF in the default policies"
    )
    project.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text")
    project.add_argument("--output", metavar="PATH", help="write the table here")
    project.add_argument(
        "--plot", metavar="PATH", help="draw cumulative FLOPs per policy into this image file"
    )
    project.add_argument(
        "--device", default="meta", help="where to count (default meta: shapes only, no arithmetic)"
    )
    project.set_defaults(run=_project)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
