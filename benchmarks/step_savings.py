"""What one training step costs with the backbone frozen: ways of freezing it, and fast mode.

    python benchmarks/step_savings.py [--quick] [--reps 7] [--size 128] [--models resnet18,resnet50]
                                      [--no-compile] [--json PATH]

A ResNet-18 (and a ResNet-50) backbone with a detection-like head (benchmarks/_models.py,
BatchNorm statistics calibrated on the input as a trained model's are), batch 8, SGD with
momentum over all parameters. Per step (forward, backward, optimizer step): wall time,
bytes autograd keeps for backward (distinct storages) and FLOPs executed (the profiler).
The variants of a model run interleaved in the same process: each repetition runs every
variant, in a shuffled order, for one untimed step then `--block` timed steps (the first
step after switching variant pays for kernel selection and memory that the previous
variant did not need, which is not what we measure). Medians over all timed steps are
reported, with ratios to the ideal:

1. full       full training (nothing frozen)
2. freezesched  FrozenStageGuard with the backbone frozen (bn="eval")
3. ideal      a hand-written `torch.no_grad()` backbone in eval mode
4. detach     the DBF paper's official code: backbone forward with grad, `out.detach()`
5. no-grad-flag  `backbone.requires_grad_(False)` only (BN keeps updating its statistics)
6. lightning  Lightning's `BaseFinetuning.freeze(backbone, train_bn=False)` (if installed;
              it sets BN `track_running_stats=False`: batch statistics, not running ones)

and fast frozen mode (`FreezePolicy(fast=FastFrozen(...))`, the guard as in 2):

7. fast-fold     BatchNorm folded into the convolutions
8. fast          folded + channels-last
9. fast-bf16     folded + channels-last + a bfloat16 copy
10. fast-compile folded + channels-last + inductor with frozen weights (not with
                 `--no-compile` / `--quick`)
11. fast-cache   fast + a FeatureCache, on a repeated-epoch workload of `--cache-batches`
                 batches with sample keys, timed from the second epoch on

Fast variants also report the largest absolute and relative difference of the backbone's
output from the ideal's (`max_abs_diff`, `max_rel_diff`); their FLOPs are not counted
(the profiler's module hooks make fast mode run the plain forward). The ResNet-50 model
runs the ideal, freezesched and the fast variants only.

Then, for ResNet-18: the guard's own cost per step (enter + exit) against a trainable step;
the measured frozen-step speedup against the speedup the FLOP counts predict; and the cost
per step of layer-wise progressive freezing as 0..5 backbone stages freeze. On CUDA
(`--device cuda`, the default when available) the peak memory per step is reported too.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _models import ResNet18Detector, ResNet50Detector, calibrate
from torch import nn

from freezesched import Constant, FreezePolicy, FrozenStageGuard, Layerwise, Step
from freezesched.freezing import (
    FastFrozen,
    FastModeWarning,
    FeatureCache,
    drop_fast,
    fast_report,
    sample_keys,
)
from freezesched.profiling import SavedTensorMeter, count_flops

Step_ = Callable[[], None]


def make_variants(model: nn.Module, x: torch.Tensor, peers: bool = True) -> dict[str, Step_]:
    backbone, head = model.backbone, model.head
    guard = FrozenStageGuard(Constant(True))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad()

    def full() -> None:
        finish(model(x).square().mean())

    def freezesched() -> None:
        with guard(backbone, 0):
            finish(model(x).square().mean())

    def ideal() -> None:
        backbone.eval()
        with torch.no_grad():
            features = backbone(x)
        backbone.train()
        finish(head(features).square().mean())

    def detach() -> None:
        finish(head(backbone(x).detach()).square().mean())

    def no_grad_flag() -> None:
        backbone.requires_grad_(False)
        try:
            finish(model(x).square().mean())
        finally:
            backbone.requires_grad_(True)

    if not peers:
        return {"freezesched": freezesched, "ideal": ideal}
    variants = {"full": full, "freezesched": freezesched, "ideal": ideal, "detach": detach,
                "no-grad-flag": no_grad_flag}  # fmt: skip
    try:
        from lightning.pytorch.callbacks import BaseFinetuning
    except ImportError:
        return variants

    def lightning() -> None:
        BaseFinetuning.freeze(backbone, train_bn=False)
        try:
            finish(model(x).square().mean())
        finally:
            BaseFinetuning.make_trainable(backbone)  # restores requires_grad and BN stats
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.track_running_stats = True

    variants["lightning"] = lightning
    return variants


def fast_specs(compile: bool) -> dict[str, FastFrozen]:
    specs = {
        "fast-fold": FastFrozen(),
        "fast": FastFrozen(channels_last=True),
        "fast-bf16": FastFrozen(channels_last=True, dtype="bfloat16"),
    }
    if compile:
        specs["fast-compile"] = FastFrozen(channels_last=True, compile=True)
    return specs


def make_fast_variants(
    model: nn.Module, x: torch.Tensor, compile: bool, batches: int
) -> tuple[dict[str, Step_], dict[str, Callable[[], torch.Tensor]], Step_]:
    """Fast-mode steps; a probe per variant giving its backbone output for the ideal's
    input (for the difference); and one epoch of the cache workload (to fill the cache)."""
    backbone = model.backbone
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    steps: dict[str, Step_] = {}
    probes: dict[str, Callable[[], torch.Tensor]] = {}

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad()

    for name, spec in fast_specs(compile).items():
        guard = FrozenStageGuard(Constant(True), policy=FreezePolicy(fast=spec))

        def step(guard: FrozenStageGuard = guard) -> None:
            with guard(backbone, 0):
                finish(model(x).square().mean())

        def probe(guard: FrozenStageGuard = guard) -> torch.Tensor:
            with guard(backbone, 0), torch.no_grad():
                return backbone(x)

        steps[name], probes[name] = step, probe

    # The cache workload: `batches` distinct batches (keys 0..), the same ones every epoch.
    n = x.shape[0]
    data = torch.cat([x, torch.randn(n * (batches - 1), *x.shape[1:], device=x.device)])
    cache = FreezePolicy(fast=FastFrozen(channels_last=True, cache=FeatureCache()))
    guard = FrozenStageGuard(Constant(True), policy=cache)
    position = [0]

    def cached() -> None:
        i = position[0] % batches
        position[0] += 1
        with guard(backbone, 0), sample_keys(range(i * n, (i + 1) * n)):
            finish(model(data[i * n : (i + 1) * n]).square().mean())

    def cached_probe() -> torch.Tensor:
        with guard(backbone, 0), sample_keys(range(n)), torch.no_grad():
            return backbone(x)  # batch 0 is x: served from the cache

    def epoch() -> None:
        for _ in range(batches):
            cached()

    steps["fast-cache"], probes["fast-cache"] = cached, cached_probe
    return steps, probes, epoch


def difference(probe: Callable[[], torch.Tensor], reference: torch.Tensor) -> tuple[float, float]:
    d = (probe().double() - reference.double()).abs().max().item()
    return d, d / reference.double().abs().max().item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Step_, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def saved_bytes(step: Step_) -> int:
    with SavedTensorMeter() as meter:
        step()
    return meter.bytes


def peak_bytes(step: Step_, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def guard_overhead(model: nn.Module, calls: int) -> dict[str, float]:
    """Median seconds of one enter + exit, trainable and frozen ticks."""
    guard = FrozenStageGuard(Step(2))
    out = {}
    for name, tick in (("trainable", 0), ("frozen", 1)):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            with guard(model.backbone, tick):
                pass
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def run_model(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, torch.Tensor, dict[str, float], list[dict[str, object]]]:
    torch.manual_seed(0)
    model: nn.Module = (ResNet18Detector() if name == "resnet18" else ResNet50Detector()).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    calibrate(model, x)
    variants = make_variants(model, x, peers=name == "resnet18")
    plain = list(variants)
    # The fast variants run on a copy: the "full" variant trains the backbone, and a frozen
    # phase's weights do not change (each change rebuilds the twins and empties the cache).
    fast_model = copy.deepcopy(model)
    fast, probes, first_epoch = make_fast_variants(fast_model, x, args.compile, args.cache_batches)
    variants.update(fast)
    names = list(variants)

    flops = {n: count_flops(variants[n], model).total.total for n in plain}
    saved = {n: saved_bytes(variants[n]) for n in names}
    peak = {n: peak_bytes(variants[n], device) for n in names}
    for _ in range(2):  # warm-up (fast variants build, check and compile their twins here)
        for n in names:
            variants[n]()
    first_epoch()  # the feature cache's first epoch: every batch a miss
    fast_model.backbone.eval()
    with torch.no_grad():
        reference = fast_model.backbone(x)  # the plain frozen forward
    fast_model.backbone.train()
    diffs = {n: difference(probes[n], reference) for n in fast}
    reports = {n: fast_report(fast_model.backbone) for n in fast}
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(args.reps):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            variants[n]()
            times[n] += [timed(variants[n], device) for _ in range(args.block)]
    median = {n: statistics.median(times[n]) for n in names}
    report = fast_report(fast_model.backbone)
    drop_fast(fast_model.backbone)

    records: list[dict[str, object]] = []
    for n in names:
        records.append({
            "variant": n,
            "model": name,
            "time_s": median[n],
            "time_ratio_to_ideal": median[n] / median["ideal"],
            "saved_bytes": saved[n],
            "saved_bytes_ratio_to_ideal": saved[n] / saved["ideal"],
            "flops": flops.get(n),
            "flops_ratio_to_ideal": flops[n] / flops["ideal"] if n in flops else None,
            "peak_bytes": peak[n],
            "max_abs_diff": diffs[n][0] if n in diffs else None,
            "max_rel_diff": diffs[n][1] if n in diffs else None,
        })  # fmt: skip

    print(f"\n{name} detector, batch {args.batch} at {args.size}x{args.size}")
    peak_col = "  peak MiB" if device.type == "cuda" else ""
    print(f"{'variant':<13} {'ms/step':>8} {'x ideal':>8} {'saved MiB':>10} {'x ideal':>8} "
          f"{'GFLOPs':>8} {'x ideal':>8} {'max|diff|':>10} {'rel':>9}{peak_col}")  # fmt: skip
    for r in records:
        gflops = "-" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"  # type: ignore[operator]
        fratio = "-" if r["flops_ratio_to_ideal"] is None else f"{r['flops_ratio_to_ideal']:.3f}"
        dabs = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        drel = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.2e}"
        line = (f"{r['variant']:<13} {1e3 * r['time_s']:>8.1f} {r['time_ratio_to_ideal']:>8.3f} "
                f"{r['saved_bytes'] / 2**20:>10.2f} {r['saved_bytes_ratio_to_ideal']:>8.3f} "
                f"{gflops:>8} {fratio:>8} {dabs:>10} {drel:>9}")  # type: ignore[operator]  # fmt: skip
        if r["peak_bytes"] is not None:
            line += f"  {r['peak_bytes'] / 2**20:>8.1f}"  # type: ignore[operator]
        print(line)
    if report is not None:
        folded = len(reports["fast"].folded) if reports.get("fast") else 0
        print(f"fast mode folded {folded} BatchNorm layers into convolutions; "
              f"feature cache: {report.cache_hits} hits, {report.cache_misses} misses "
              f"({report.cache_verified} hits recomputed and checked); "
              f"{report.fast_calls} calls ran a fast twin, "
              f"{report.builds} twins built")  # fmt: skip
        for reason, calls in report.plain_calls:  # what ran plainly, and why
            print(f"  plain ({calls} calls): {reason}")
    return model, x, median, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=3, help="timed steps per variant per rep")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--cache-batches", type=int, default=4)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="ResNet-18 only, 64x64, 3 repetitions of 2 steps, no compile",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.size, args.reps, args.block = 64, 3, 2
        args.models, args.compile = "resnet18", False
    models = args.models.split(",")
    if models[0] != "resnet18" or not set(models) <= {"resnet18", "resnet50"}:
        parser.error("--models must start with resnet18 and name resnet18 / resnet50")
    warnings.filterwarnings("ignore", category=FastModeWarning)  # reported in the table
    device = torch.device(args.device)
    cpu = platform.processor() or platform.machine()
    when = datetime.date.today().isoformat()
    print(f"{when}, torch {torch.__version__}, {device.type} ({cpu}, {torch.get_num_threads()} "
          f"threads), batch {args.batch} at {args.size}x{args.size}, {args.reps} interleaved "
          f"repetitions of {args.block} steps, medians")  # fmt: skip

    records = []
    for name in models:
        out = run_model(name, args, device)
        records += out[3]
        if name == "resnet18":
            model, x, median = out[0], out[1], out[2]
    r18 = {r["variant"]: r for r in records if r["model"] == "resnet18"}
    flops = {n: r["flops"] for n, r in r18.items()}

    # The guard's own cost, against the step it wraps.
    overhead = guard_overhead(model, calls=100 if args.quick else 2000)
    trainable_ratio = overhead["trainable"] / median["full"]
    frozen_ratio = overhead["frozen"] / median["freezesched"]
    print(f"\nguard enter+exit (resnet18): trainable tick {1e6 * overhead['trainable']:.1f} us "
          f"({100 * trainable_ratio:.3f} % of a full step), frozen tick "
          f"{1e6 * overhead['frozen']:.1f} us "
          f"({100 * frozen_ratio:.3f} % of a frozen step)")  # fmt: skip

    predicted = flops["full"] / flops["freezesched"]  # type: ignore[operator]
    measured = median["full"] / median["freezesched"]
    print(f"frozen-step speedup: measured {measured:.3f}x, predicted by FLOPs {predicted:.3f}x, "
          f"efficiency {measured / predicted:.3f}")  # fmt: skip

    # Layer-wise: the first k of 5 backbone stages frozen.
    stages = list(model.backbone)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    layer_rows = []
    for k in range(len(stages) + 1):
        guard = FrozenStageGuard(Layerwise([Constant(i < k) for i in range(len(stages))]))

        def step(guard: FrozenStageGuard = guard) -> None:
            with guard(stages, 0):
                model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        step()
        ts = [timed(step, device) for _ in range(max(3, args.reps))]
        layer_rows.append({"frozen_stages": k, "time_s": statistics.median(ts),
                           "saved_bytes": saved_bytes(step),
                           "flops": count_flops(step, model).total.total})  # fmt: skip
    print(f"\nlayer-wise progressive freezing (first k of {len(stages)} backbone stages frozen)")
    print(f"{'k':>2} {'ms/step':>8} {'x k=0':>7} {'saved MiB':>10} {'GFLOPs':>8} {'x k=0':>7}")
    for r in layer_rows:
        print(f"{r['frozen_stages']:>2} {1e3 * r['time_s']:>8.1f} "
              f"{r['time_s'] / layer_rows[0]['time_s']:>7.3f} {r['saved_bytes'] / 2**20:>10.2f} "
              f"{r['flops'] / 1e9:>8.2f} {r['flops'] / layer_rows[0]['flops']:>7.3f}")  # fmt: skip

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": when, "torch": torch.__version__, "device": device.type,
                "threads": torch.get_num_threads(), "cpu": cpu,
                "size": args.size, "batch": args.batch, "reps": args.reps, "block": args.block,
                "models": models, "compile": args.compile,
                "variants": records,
                "guard_overhead_s": overhead,
                "guard_overhead_ratio": {"trainable": trainable_ratio, "frozen": frozen_ratio},
                "speedup": {"measured": measured, "predicted_by_flops": predicted},
                "layerwise": layer_rows,
            }, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
