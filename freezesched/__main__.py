"""Command line: ``python -m freezesched {demo,timeline,project,flops,plan-memory}``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["main"]

SCHEDULE_EXAMPLE = (
    '\'{"type": "WarmupThenFreeze", "warmup": 3, "then": {"type": "Step", "rho": 5}}\''
)


class CommandError(Exception):
    """A bad command-line argument, reported in one line with exit status 2."""


def _schedule(text: str, what: str = "schedule") -> Any:
    from freezesched.schedules import schedule_from_config

    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(
            f"the {what} must be a schedule config in JSON, e.g. {SCHEDULE_EXAMPLE}; "
            f"{text!r} is not JSON ({error.msg} at character {error.pos})"
        ) from None
    try:
        return schedule_from_config(config)
    except (TypeError, ValueError) as error:
        raise CommandError(f"the {what} {text!r} is not a valid schedule: {error}") from None


def _demo(args: argparse.Namespace) -> int:
    from freezesched.demo import format_table, policies, run_demo, to_json

    plan = policies(args.epochs)
    print(
        f"freezesched demo: fine-tuning a pretrained CNN for {args.epochs} epochs on "
        f"{args.samples} embedded synthetic images under {len(plan)} policies (CPU)...",
        file=sys.stderr,
    )
    results = run_demo(
        epochs=args.epochs,
        samples=args.samples,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
        plan=plan,
    )
    print(format_table(results))
    print(
        "frozen: frozen epochs (gradient: fraction of the backbone's stages, summed); "
        "val acc: on a held-out test split; TFLOPs: measured training FLOPs of the run "
        "(FLOPs = 2 x MACs); ΔTFLOPs: against full training, measured and with the DBF "
        "paper's rule (2x: backward = 2 x forward of trainable layers); saved MiB: what "
        "autograd keeps for backward in a frozen / trainable step",
        file=sys.stderr,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(to_json(results) + "\n")
    if args.plot:
        try:
            _demo_plot(results, plan, args.epochs, args.plot)
        except ImportError as error:
            print(f"freezesched demo: no plot written ({error})", file=sys.stderr)
        else:
            print(f"freezesched demo: wrote {args.plot}", file=sys.stderr)
    return 0


def _demo_plot(results: Sequence[Any], plan: Mapping[str, Any], epochs: int, path: str) -> None:
    """When each policy froze, its cumulative training FLOPs, and accuracy against FLOPs."""
    from freezesched.plot import new_axes, plot_cumulative_flops, plot_timeline, plot_tradeoff, save
    from freezesched.schedules import evaluate

    labels: list[str] = []
    for name, schedule in plan.items():
        n = schedule.num_stages
        labels += [name] if n == 1 else [f"{name} [stage {i}]" for i in range(n)]

    def rows(tick: int) -> tuple[bool, ...]:  # every policy's decisions, as decided
        return tuple(d for schedule in plan.values() for d in evaluate(schedule, tick))

    top = new_axes(11.0, 8.0)
    figure: Any = top.figure
    top.remove()
    grid = figure.add_gridspec(2, 2, height_ratios=[1, 1.4])
    upper = figure.add_subplot(grid[0, :])
    plot_timeline(rows, epochs, stage_labels=labels, ax=upper)
    upper.set_title("when each policy froze the backbone (filled = frozen)", fontsize="medium")
    lower = figure.add_subplot(grid[1, 0])
    plot_cumulative_flops({r.label: list(r.curve) for r in results}, ax=lower)
    lower.set_title("training FLOPs, measured by the profiler", fontsize="medium")
    right = figure.add_subplot(grid[1, 1])
    points = {r.label: (float(r.flops_measured), r.metrics["val acc %"]) for r in results}
    plot_tradeoff(points, metric="test accuracy %", ax=right)
    right.set_title("accuracy against training FLOPs", fontsize="medium")
    save(upper, path)


def _timeline(args: argparse.Namespace) -> int:
    from freezesched.schedules import timeline

    schedule = _schedule(args.schedule)
    try:
        line = timeline(schedule, args.ticks, start=args.start)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    print(repr(schedule) if args.full else schedule.summary())
    if args.plot:
        from freezesched.plot import plot_timeline, save

        save(plot_timeline(schedule, args.ticks, start=args.start), args.plot)
    rows = line.T
    for i, row in enumerate(rows):
        label = "frozen" if len(rows) == 1 else f"stage {i}"
        marks = "".join("#" if f else "." for f in row)
        print(f"{label:>8} {marks}  ({int(row.sum())}/{len(row)} frozen; # = frozen)")
    return 0


def _load_model(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """``"package.module:attr"`` -> the module, or what calling ``attr(**kwargs)`` returns."""
    import importlib

    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as error:
        raise CommandError(f"--model {spec!r}: {error}") from None
    if isinstance(obj, nn.Module):
        model = obj
    else:
        try:
            model = obj(**(kwargs or {}))
        except TypeError as error:
            raise CommandError(f"--model {spec!r}: {error}") from None
    if not isinstance(model, nn.Module):
        raise CommandError(f"--model {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def _shape(text: str) -> list[int]:
    try:
        shape = [int(s) for s in text.split(",")]
    except ValueError:
        raise CommandError(f"--input-shape must be comma-separated ints, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise CommandError(f"--input-shape must be positive ints, got {text!r}")
    return shape


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
    import warnings

    from freezesched.profiling import FrozenMiddleWarning, project_policies, render_runs

    model = _load_model(args.model)
    shape = _shape(args.input_shape)
    modules = [m for spec in args.module for m in spec.split(",") if m]
    policies: dict[str, Any] = {}
    for spec in args.policy:
        label, sep, config = spec.partition("=")
        if not sep:
            raise CommandError(f"--policy must look like 'NAME=JSON', got {spec!r}")
        policies[label] = _schedule(config, f"--policy {label!r}")
    chosen = policies or _default_policies(args.warmup)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FrozenMiddleWarning)  # printed below, once
            runs = project_policies(
                model, shape, modules, chosen, epochs=args.epochs,
                samples_per_epoch=args.samples, device=args.device,
            )  # fmt: skip
    except (ValueError, TypeError, KeyError) as error:
        raise CommandError(str(error)) from None
    if args.plot:
        _project_plot(model, shape, modules, chosen, args)
    table = render_runs(runs, args.format)
    print(
        f"# {args.model}, frozen: {', '.join(modules)}, input {tuple(shape)}, "
        f"{args.epochs} epochs x {args.samples} samples; FLOPs = 2 x MACs; ΔTFLOPs against "
        "full training, measured and 2x (backward = 2 x forward of trainable layers, the "
        "DBF paper's rule); frozen: frozen epochs (per-stage schedules: summed over epochs "
        "of the fraction of stages frozen)",
        file=sys.stderr,
    )
    for note in runs[0].notes if runs else ():
        print(f"# note: {note}", file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    else:
        print(table)
    return 0


def _project_plot(
    model: Any, shape: list[int], modules: list[str], policies: dict[str, Any], args: Any
) -> None:
    """Cumulative training FLOPs (2x convention) of each policy, epoch by epoch."""
    from freezesched.plot import plot_cumulative_flops, save
    from freezesched.profiling import cumulative_flops, measure_policy_costs

    costs = measure_policy_costs(
        model, shape, modules, policies.values(), epochs=args.epochs, device=args.device
    )
    curves = {
        label: cumulative_flops(
            costs, schedule, epochs=args.epochs, samples_per_epoch=args.samples,
            num_modules=len(modules), convention="2x",
        )
        for label, schedule in policies.items()
    }  # fmt: skip
    ax = plot_cumulative_flops(curves)
    ax.set_title(f"Eq. 1, backward = 2 x forward: {args.model}", fontsize="medium")
    save(ax, args.plot)


def _flops(args: argparse.Namespace) -> int:
    import torch

    from freezesched.freezing import freeze
    from freezesched.profiling import FlopProfiler, default_loss, render_modules

    model = _load_model(args.model)
    shape = _shape(args.input_shape)
    modules = [m for spec in args.freeze for m in spec.split(",") if m]
    device = torch.device(args.device)
    model = model.to(device)
    model.train()
    x = torch.empty(shape, device=device) if device.type == "meta" else torch.randn(shape)
    try:
        region = freeze(model, modules) if modules else None
        if region is not None:
            region.__enter__()
        try:
            with FlopProfiler(model) as prof:
                torch.autograd.backward(default_loss(model(x)))
        finally:
            if region is not None:
                region.__exit__(None, None, None)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    step = prof.result
    print(
        f"# {args.model}, input {tuple(shape)}, frozen: {', '.join(modules) or 'nothing'}; "
        "one training step, FLOPs = 2 x MACs, each module's own work (children excluded), "
        "so the rows add up to the total",
        file=sys.stderr,
    )
    print(render_modules(step, args.format, depth=args.depth))
    return 0


def _plan_memory(args: argparse.Namespace) -> int:
    import torch

    from freezesched.profiling import plan_memory, render_memory

    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as error:
        raise CommandError(f"--model-kwargs must be a JSON object: {error.msg}") from None
    if not isinstance(kwargs, dict):
        raise CommandError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    with torch.device("meta"):  # nothing is allocated, whatever the model's size
        model = _load_model(args.model, kwargs)
    shape = _shape(args.input_shape)
    stages = [[m for m in spec.split(",") if m] for spec in args.module]
    try:
        plan = plan_memory(
            model, shape, stages, optimizer=args.optimizer, precision=args.precision,
            sharding=args.sharding, world_size=args.world_size, step=args.step,
            label=args.model,
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    elements = plan.phases[0].trainable_elements + plan.phases[0].frozen_elements
    print(
        f"# {args.model}: {elements:,} parameters; per rank: batch {tuple(shape)}, "
        f"{args.optimizer}, {args.precision}, sharding {args.sharding} over "
        f"{args.world_size} rank(s), optimizer step {args.step}; GiB = 2**30 bytes; "
        "peak = weights + optimizer + buffers + max(activations, grads) + transient",
        file=sys.stderr,
    )
    print(plan.to_json() if args.format == "json" else render_memory(plan, args.format))
    return 0


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
    timeline.add_argument("schedule", help=f"a schedule config as JSON, e.g. {SCHEDULE_EXAMPLE}")
    timeline.add_argument("--ticks", type=int, default=40, help="one past the last tick")
    timeline.add_argument("--start", type=int, default=0, help="the first tick")
    timeline.add_argument("--full", action="store_true", help="print the schedule in full")
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
    flops = sub.add_parser(
        "flops", help="one training step's FLOPs per module (forward, input and weight grads)"
    )
    flops.add_argument("--model", required=True, help="import path of a model or factory")
    flops.add_argument("--input-shape", required=True, help="example batch shape")
    flops.add_argument(
        "--freeze", action="append", default=[], help="submodule(s) frozen in the step"
    )
    flops.add_argument(
        "--depth", type=int, default=None, help="fold modules deeper than this into their parent"
    )
    flops.add_argument(
        "--by-module", action="store_true", help="(the default view; kept for clarity)"
    )
    flops.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text")
    flops.add_argument("--device", default="meta", help="where to count (default meta)")
    flops.set_defaults(run=_flops)
    plan = sub.add_parser(
        "plan-memory",
        help="memory per rank of each freeze state (weights, grads, optimizer, activations)",
    )
    plan.add_argument(
        "--model", required=True, help="import path of a model or factory (built on meta)"
    )
    plan.add_argument("--model-kwargs", default="", help="JSON keyword arguments for the factory")
    plan.add_argument(
        "--input-shape", required=True, help="the batch of one rank, e.g. 2,3,1024,1024"
    )
    plan.add_argument(
        "--module",
        action="append",
        required=True,
        help="a stage that freezes (comma-separated names freeze together); repeat for "
        "layer-wise stages, front first",
    )
    plan.add_argument("--optimizer", choices=["adamw", "adam", "sgd-momentum", "sgd"],
                      default="adamw")  # fmt: skip
    plan.add_argument(
        "--precision", choices=["fp32", "bf16-mixed", "fp16-mixed", "bf16", "bf16-master"],
        default="fp32",
    )  # fmt: skip
    plan.add_argument(
        "--sharding", choices=["none", "ddp", "fsdp", "zero1", "zero2", "zero3"], default="none"
    )
    plan.add_argument("--world-size", type=int, default=1, help="ranks")
    plan.add_argument("--step", choices=["foreach", "for-loop", "fused"], default="foreach",
                      help="optimizer implementation (its temporaries)")  # fmt: skip
    plan.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text")
    plan.set_defaults(run=_plan_memory)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except CommandError as error:
        print(f"freezesched {args.command}: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"freezesched {args.command}: {error}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
