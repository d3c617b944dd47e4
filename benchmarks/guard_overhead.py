"""What entering and leaving the guard costs per step, against the step it guards.

    python benchmarks/guard_overhead.py [--calls 2000] [--json PATH]

Two backbones (benchmarks/_models.py, no torchvision needed): ResNet-18 (62 parameters,
20 BatchNorm layers) and the ResNet-50 of a ResNet-50-FPN detector (161 parameters, 53
BatchNorm layers). Per backbone, the median time of one ``with guard(backbone, tick):
pass``, in microseconds, for

* ``frozen``: a frozen tick, the guard reusing its plan (the steady state of training);
* ``trainable``: a trainable tick (nothing to do but decide);
* ``first``: a frozen tick of a new guard, which plans the tree (what every frozen step
  cost before plans were cached);

measured interleaved in blocks (the variants alternate, so machine noise hits them
alike); and two parts no exact frozen tick can skip, timed alone in the same blocks:

* ``tree check``: the guard's check that the cached plan still fits the tree (every
  module alive with its type, and the keys and values of its parameter, buffer and
  submodule dictionaries: what a plan depends on, read in C-level passes);
* ``flips``: setting ``requires_grad=False`` and ``.grad = None`` on every frozen
  parameter and restoring the flag, in a plain loop (what freezing means).

``step ms`` is one forward + backward of the whole model at batch 2, 128x128, with
the backbone frozen, for scale: ``frozen / step`` is the guard's share of a step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _models import ResNet18Detector, ResNet50FPN
from torch import nn

from freezesched import FrozenStageGuard, Step
from freezesched.freezing._mechanism import _Signature  # the guard's own tree check
from freezesched.profiling import render_table


def one_call(guard: FrozenStageGuard, backbone: nn.Module, tick: int) -> float:
    start = time.perf_counter()
    with guard(backbone, tick):
        pass
    return time.perf_counter() - start


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flips(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad = False
        p.grad = None
    for p in params:
        p.requires_grad = True


def measure(model: nn.Module, backbone: nn.Module, calls: int, block: int = 50) -> dict:
    guard = FrozenStageGuard(Step(2))  # trainable on even ticks, frozen on odd ones
    times: dict[str, list[float]] = {
        "frozen": [], "trainable": [], "first": [], "check": [], "flips": []
    }  # fmt: skip
    signature = _Signature.of(list(backbone.modules()))
    assert signature is not None
    assert signature.alive() is not None
    params = list(backbone.parameters())
    for _ in range(20):  # warm-up: the plan is cached, code paths are hot
        one_call(guard, backbone, 1)
    for _ in range(max(1, calls // block)):
        times["frozen"] += [one_call(guard, backbone, 1) for _ in range(block)]
        times["trainable"] += [one_call(guard, backbone, 0) for _ in range(block)]
        times["first"] += [
            one_call(FrozenStageGuard(Step(2)), backbone, 1) for _ in range(max(1, block // 10))
        ]
        times["check"] += [timed(signature.alive) for _ in range(block)]
        times["flips"] += [timed(lambda: flips(params)) for _ in range(block)]
    x = torch.randn(2, 3, 128, 128)
    steps = []
    for i in range(6):
        start = time.perf_counter()
        with guard(backbone, 1):
            out = model(x)
            loss = sum(o.square().mean() for o in out) if isinstance(out, list) else out.mean()
            loss.backward()
        if i:
            steps.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    step = statistics.median(steps)
    return {
        "params": sum(1 for _ in backbone.parameters()),
        "batchnorms": sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()),
        **{f"{k}_us": round(1e6 * v, 1) for k, v in median.items()},
        "step_ms": round(1e3 * step, 1),
        "frozen_share_of_step": round(median["frozen"] / step, 5),
        "first_over_frozen": round(median["first"] / median["frozen"], 1),
        "floor_us": round(1e6 * (median["check"] + median["flips"]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per variant")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = {"ResNet-18": ResNet18Detector(), "ResNet-50-FPN": ResNet50FPN()}
    records = []
    for name, model in models.items():
        record = {"backbone": name, **measure(model, model.backbone, args.calls)}
        records.append(record)
    columns = [
        ("backbone", "backbone"), ("params", "params"), ("batchnorms", "BN layers"),
        ("frozen_us", "frozen µs"), ("trainable_us", "trainable µs"),
        ("first_us", "first (planning) µs"), ("first_over_frozen", "first / frozen"),
        ("check_us", "tree check µs"), ("flips_us", "flips µs"), ("floor_us", "check+flips µs"),
        ("step_ms", "step ms"), ("frozen_share_of_step", "frozen / step"),
    ]  # fmt: skip
    when = datetime.date.today().isoformat()
    print(f"# {when}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {args.calls} calls per variant")  # fmt: skip
    print(render_table(records, columns))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": when, "torch": torch.__version__, "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
