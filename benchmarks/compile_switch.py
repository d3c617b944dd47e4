"""What a freeze/unfreeze switch costs a `torch.compile`d model, and whether it stays exact.

    python benchmarks/compile_switch.py [--backend inductor] [--epochs 6] [--quick] [--json PATH]

A ResNet-18 detector (CPU, batch 8) is compiled once and trained under DBF's Step(2)
schedule (trainable, frozen, trainable, ... one "epoch" of `--epoch-steps` steps each).
Dynamo guards on `requires_grad` and on the guard's forward wrapper, so each freeze
state gets its own graph the first time it is seen (a recompile), and later switches
back to a seen state reuse the cached graph (no recompile). Reported per epoch: the
first step's time (compile included), the median of the others, the number of graphs
compiled so far, and at the end the largest parameter difference from the same run in
eager mode. The 2-step run in tests/test_guard.py checks the same with aot_eager
(bitwise) and inductor (close).
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


def train(compiled: bool, args: argparse.Namespace) -> tuple[list[dict[str, float]], dict]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = ResNet18Detector()
    forward = torch.compile(model, backend=args.backend) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    guard = FrozenStageGuard(Step(2))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for epoch in range(args.epochs):
        times = []
        for _ in range(args.epoch_steps):
            x = torch.randn(8, 3, args.size, args.size, generator=gen)
            start = time.perf_counter()
            with guard(model.backbone, epoch):
                forward(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiled else 0
        rows.append({
            "epoch": epoch,
            "frozen": bool(Step(2)(epoch)),
            "first_step_s": times[0],
            "median_other_steps_s": statistics.median(times[1:]),
            "graphs_compiled_so_far": graphs,
        })  # fmt: skip
    return rows, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--epoch-steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="aot_eager, 4 epochs of 3 steps")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.quick:
        args.backend, args.epochs, args.epoch_steps, args.size = "aot_eager", 4, 3, 64
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, compiled_state = train(True, args)
    _, eager_state = train(False, args)
    max_diff = max(
        (compiled_state[k].double() - eager_state[k].double()).abs().max().item()
        for k in eager_state
        if compiled_state[k].is_floating_point()
    )
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, backend {args.backend}, {cpu}, "
          f"{torch.get_num_threads()} threads, batch 8 at {args.size}x{args.size}")  # fmt: skip
    print(f"{'epoch':>5} {'state':>9} {'first step s':>13} {'other steps s':>14} {'graphs':>7}")
    for r in rows:
        state = "frozen" if r["frozen"] else "trainable"
        print(f"{r['epoch']:>5} {state:>9} {r['first_step_s']:>13.3f} "
              f"{r['median_other_steps_s']:>14.3f} {r['graphs_compiled_so_far']:>7}")  # fmt: skip
    print(f"largest |compiled - eager| parameter/buffer difference after training: {max_diff:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "rows": rows, "max_abs_diff_vs_eager": max_diff}, f,
                      indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
