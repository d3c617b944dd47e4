"""How fast can a frozen backbone's forward get in float32 on this machine?

    python benchmarks/frozen_forward_ceiling.py [--reps 10] [--size 128] [--batch 8] [--json PATH]

Issue 17 aims at a fast frozen step of at most 0.70x the hand-written ``no_grad`` step.
This benchmark asks whether that is reachable here at all, by timing only the frozen
backbone's forward (no head, no backward: the part fast mode can speed up) of the
ResNet-18 and ResNet-50 backbones of ``step_savings.py`` (BatchNorm statistics
calibrated), batch 8 at 128x128, with freezesched's fast modes next to torch's own best
float32 inference tools applied by hand to an eval-mode copy:

1. plain              ``torch.no_grad()`` forward of the eval-mode backbone (the ideal's)
2. fast               fast frozen mode: BatchNorm folded, channels-last (eager)
3. fast-compile       fast frozen mode with ``compile=True`` (inductor, weights frozen)
4. inductor           ``torch.compile`` with inductor's ``freezing`` on a copy
5. inductor-cl        the same, channels-last weights and input
6. jit-inference      ``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``
7. mkldnn             ``torch.utils.mkldnn.to_mkldnn`` (oneDNN layouts end to end)

The variants run interleaved in the same process (each repetition runs every variant
once, in a shuffled order, after warm-up); medians and the ratio to ``plain`` are
reported with the largest relative difference of each output from ``plain``'s. If torch's
own tools do not reach 0.70x on the backbone alone, no float32 fast mode can reach it on
the whole step, which also runs the head, the backward and the optimizer.
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

from freezesched import Constant, FreezePolicy, FrozenStageGuard
from freezesched.freezing import FastFrozen, FastModeWarning
from freezesched.profiling import render_table

Forward = Callable[[], torch.Tensor]


def compiled(module: nn.Module, x: torch.Tensor) -> Forward:
    import torch._inductor as inductor

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        return inductor.compile(gm, inputs, options={"freezing": True})

    run = torch.compile(module.forward, backend=backend, dynamic=False)
    return lambda: run(x)


def variants(backbone: nn.Module, x: torch.Tensor) -> dict[str, Forward]:
    plain = copy.deepcopy(backbone).eval().requires_grad_(False)
    out: dict[str, Forward] = {"plain": lambda: plain(x)}
    for name, spec in {
        "fast": FastFrozen(channels_last=True),
        "fast-compile": FastFrozen(channels_last=True, compile=True),
    }.items():
        guard = FrozenStageGuard(Constant(True), policy=FreezePolicy(fast=spec))

        def fast(guard: FrozenStageGuard = guard) -> torch.Tensor:
            with guard(backbone, 0):
                return backbone(x)

        out[name] = fast
    out["inductor"] = compiled(copy.deepcopy(plain), x)
    channels_last = copy.deepcopy(plain).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out["inductor-cl"] = compiled(channels_last, x.contiguous(memory_format=torch.channels_last))
    scripted = torch.jit.optimize_for_inference(
        torch.jit.freeze(torch.jit.script(copy.deepcopy(plain)))
    )
    out["jit-inference"] = lambda: scripted(x)
    from torch.utils import mkldnn

    onednn = mkldnn.to_mkldnn(copy.deepcopy(plain))
    out["mkldnn"] = lambda: onednn(x.to_mkldnn()).to_dense()
    return out


def run(name: str, model: nn.Module, x: torch.Tensor, reps: int) -> list[dict[str, object]]:
    calibrate(model, x)
    forwards = variants(model.backbone, x)
    with torch.no_grad():
        reference = forwards["plain"]().double()
        diffs = {}
        for key, forward in forwards.items():
            for _ in range(3):  # warm-up: builds, compiles, checks
                result = forward()
            diffs[key] = ((result.double() - reference).abs().max() / reference.abs().max()).item()
        times: dict[str, list[float]] = {key: [] for key in forwards}
        order = list(forwards)
        for _ in range(reps):
            random.shuffle(order)
            for key in order:
                start = time.perf_counter()
                forwards[key]()
                times[key].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    return [
        {
            "model": name,
            "variant": key,
            "ms": round(1e3 * statistics.median(times[key]), 1),
            "x_plain": round(statistics.median(times[key]) / base, 3),
            "max_rel_diff": diffs[key],
            "rel_diff": f"{diffs[key]:.1e}",
        }
        for key in forwards
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FastModeWarning)
    random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    records = []
    for name, model in (("resnet18", ResNet18Detector()), ("resnet50", ResNet50Detector())):
        records += run(name, model, x, args.reps)
    when = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    print(f"# {when}, torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} at {args.size}x{args.size}, {args.reps} interleaved "
          "repetitions, medians; the frozen backbone's forward only")  # fmt: skip
    columns = [("model", "model"), ("variant", "variant"), ("ms", "ms"),
               ("x_plain", "x plain"), ("rel_diff", "max rel diff")]  # fmt: skip
    print(render_table(records, columns))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": when, "torch": torch.__version__, "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
