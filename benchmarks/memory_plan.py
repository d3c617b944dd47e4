"""The memory plan: validated on CPU, then applied to ViT-B/L/H and a 1.1 B ViT at 1024x1024.

1. Planned vs measured peak (``PeakMemoryMeter``: the CPU allocator's own events over two
   training steps, model and optimizer built inside) for small ViTs, trainable and
   frozen-backbone phases.
2. The plan for ViT detectors at DOTA's 1024x1024 input (models built on the meta device),
   per rank: AdamW, bf16 autocast, batch 2 per rank; one GPU, DDP and FSDP over 8 ranks.
3. Checkpoint size of ``freezesched.distributed.save`` with and without
   ``only_trained=True`` for a ViT-B detector whose backbone stays frozen.

    python benchmarks/memory_plan.py [--quick] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import VIT_SIZES, ViTBackbone, ViTDetector, vit_detector

from freezesched import FreezeController, freeze
from freezesched.profiling import PeakMemoryMeter, plan_memory, render_memory


class ViTTokens(nn.Module):
    """A ViT backbone with a token-wise MLP head (no convolution in the head)."""

    def __init__(self, image: int, dim: int, depth: int) -> None:
        super().__init__()
        self.backbone = ViTBackbone(image, 8, dim, depth, 4)
        self.head = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(2).transpose(1, 2))


def measured(build, shape, frozen, autocast: bool) -> int:  # type: ignore[no-untyped-def]
    with PeakMemoryMeter() as meter:
        torch.manual_seed(0)
        model = build()
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
        x = torch.randn(shape)
        with freeze(model, frozen) if frozen else torch.enable_grad():
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(x).float().sum()
                loss.backward()
                opt.step()
                opt.zero_grad()
    return meter.peak


def validate(quick: bool) -> list[str]:
    cases = [
        ("ViT tokens d96x4", lambda: ViTTokens(64, 96, 4), 2, "fp32"),
        ("ViT tokens d96x4", lambda: ViTTokens(64, 96, 4), 16, "fp32"),
        ("ViT tokens d192x6", lambda: ViTTokens(64, 192, 6), 16, "fp32"),
        ("ViT tokens d192x6", lambda: ViTTokens(64, 192, 6), 16, "bf16-mixed"),
        ("ViT tokens d192x6", lambda: ViTTokens(64, 192, 6), 64, "fp32"),
        ("ViT det d96x4 (conv head)", lambda: ViTDetector(64, 8, 96, 4, 4), 2, "fp32"),
        ("ViT det d96x4 (conv head)", lambda: ViTDetector(64, 8, 96, 4, 4), 64, "fp32"),
    ]
    if quick:
        cases = cases[:1]
    lines = [
        "| model | batch | precision | phase | planned MiB | measured MiB | planned / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, build, b, precision in cases:
        with torch.device("meta"):
            meta = build()
        shape = (b, 3, 64, 64)
        plan = plan_memory(meta, shape, ["backbone"], precision=precision)  # type: ignore[arg-type]
        for phase, frozen in zip(plan.phases, ([], ["backbone"]), strict=True):
            got = measured(build, shape, frozen, precision == "bf16-mixed")
            cells = [label, b, precision, phase.label, f"{phase.peak / 2**20:.1f}",
                     f"{got / 2**20:.1f}", f"{phase.peak / got:.3f}"]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def big_table(quick: bool) -> list[str]:
    sizes = ["ViT-B"] if quick else list(VIT_SIZES)
    lines = [
        "| backbone | params | ranks, sharding | phase | weights | grads | optimizer | "
        "activations | buffers | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        with torch.device("meta"):
            model = vit_detector(size, image=1024)
        params = sum(p.numel() for p in model.parameters())
        for world, sharding in ((1, "none"), (8, "ddp"), (8, "fsdp")):
            start = time.perf_counter()
            plan = plan_memory(model, (2, 3, 1024, 1024), ["backbone"], precision="bf16-mixed",
                               sharding=sharding, world_size=world, label=size)  # type: ignore[arg-type]  # fmt: skip
            seconds = time.perf_counter() - start
            for p in plan.phases:
                gib = [x / 2**30 for x in (p.weights, p.gradients, p.optimizer, p.activations,
                                          p.buffers, p.peak)]  # fmt: skip
                lines.append(
                    f"| {size} | {params / 1e6:,.0f} M | {world}, {sharding} | {p.label} | "
                    + " | ".join(f"{v:.2f}" for v in gib)
                    + " |"
                )
            print(
                f"# planned {size} ({params / 1e9:.2f} B), {sharding}: {seconds:.1f} s",
                file=sys.stderr,
            )
    return lines


def checkpoint_sizes() -> list[str]:
    import torch.distributed as dist

    from freezesched import Step
    from freezesched.distributed import save

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = vit_detector("ViT-B", image=224)
            opt = torch.optim.AdamW(model.parameters())
            ctrl = FreezeController(model, {"backbone": Step(float("inf"))}, optimizers=opt)
            ctrl.apply(0)
            model(torch.randn(1, 3, 224, 224)).float().sum().backward()
            opt.step()
            opt.zero_grad()
            sizes = {}
            for only in (False, True):
                path = Path(tmp) / f"ckpt-{only}"
                meta = save(path, model, opt, ctrl, only_trained=only)
                sizes[only] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            ctrl.release()
        finally:
            dist.destroy_process_group()
    return [
        "| checkpoint | bytes | ratio |",
        "|---|---|---|",
        f"| full (model + AdamW + controller) | {sizes[False]:,} | 1.000 |",
        f"| only_trained=True ({len(meta['skipped'])} frozen tensors referenced) | "
        f"{sizes[True]:,} | {sizes[True] / sizes[False]:.4f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args()
    header = (f"<!-- {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
              f"python benchmarks/memory_plan.py -->")  # fmt: skip
    sections = [header, "## Planned vs measured peak (CPU)", *validate(args.quick), "",
                "## ViT detectors at 1024x1024, AdamW, bf16 autocast, batch 2 per rank",
                *big_table(args.quick), ""]  # fmt: skip
    if not args.quick:
        sections += ["## Checkpoint size, ViT-B detector, backbone frozen throughout",
                     *checkpoint_sizes(), ""]  # fmt: skip
    text = "\n".join(sections)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    if args.quick:
        with torch.device("meta"):
            model = vit_detector("ViT-B", image=1024)
        print(render_memory(plan_memory(model, (2, 3, 1024, 1024), ["backbone"])))


if __name__ == "__main__":
    main()
