"""Training memory and step time of PEFT on a frozen backbone, as ratios to full fine-tuning.

    python benchmarks/peft_memory.py [--quick] [--models vit_b16,swin_t,r50_fpn] [--json PATH]

Needs torch, torchvision, timm and peft (random init; nothing is downloaded). For each
model, in one process, every variant trains with AdamW on synthetic data:

1. full          full fine-tuning
2. frozen        the backbone frozen by freezesched's guard (neck and head train)
3. lora          LoRA through peft (rank 8; the base frozen by peft), without the guard
4. lora+guard    the same under the guard with ``trainable=[PeftAdapters()]``
5. side          an EST-style side network reading four intermediate features of the
                 frozen backbone (forward hooks), with the head on the side network
6. dbf5          DBF with ρ=5: one trainable step in five, from rows 1 and 2 of the
                 same run (memory: the larger of the two, since the backbone's
                 optimizer state lives through frozen phases; time: (full + 4 frozen) / 5)

Memory is counted, not sampled from an allocator: parameters + gradients (those that
exist after backward) + optimizer state (every tensor in ``opt.state``) + activations
saved for backward (:class:`~freezesched.profiling.SavedTensorMeter`, the model's
parameters excluded), all in bytes. Time is the median of the timed steps (forward,
backward, optimizer step), variants interleaved round-robin so that drift of a shared
machine hits every variant alike. Models: ViT-B/16 (timm) and Swin-T (timm) at 224²
with a 10-class head, batch 2; a dense detector (torchvision's ResNet-50-FPN backbone and
a two-conv, 128-channel head on every level) at 512², batch 2.

``--json PATH`` writes a list of ``{"model", "variant", "memory_ratio_to_full",
"time_ratio_to_full"}``. ``--quick`` runs Swin-T only, one timed step per variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import peft
import timm
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from freezesched import Constant, FrozenStageGuard
from freezesched.integrations.peft import PeftAdapters
from freezesched.profiling import SavedTensorMeter

VARIANTS = ("full", "frozen", "lora", "lora+guard", "side")


# --- models: (backbone, rest) with a loss ------------------------------------------------


class Classifier(nn.Module):
    """A timm backbone (its own head removed) with a linear head on pooled features."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0)
        self.head = nn.Linear(self.backbone.num_features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DenseHead(nn.Module):
    """A two-conv tower shared over levels, then class and box convolutions."""

    def __init__(self, channels: int, width: int = 128, classes: int = 15) -> None:
        super().__init__()
        self.tower = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(16, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(16, width), nn.ReLU(),
        )  # fmt: skip
        self.cls = nn.Conv2d(width, classes, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        loss = torch.zeros(())
        for f in features:
            t = self.tower(f)
            loss = loss + self.cls(t).sigmoid().mean() + self.box(t).abs().mean()
        return loss


class Detector(nn.Module):
    """torchvision's ResNet-50-FPN backbone (``backbone.body`` + ``backbone.fpn``) and a
    dense head; the "backbone" that freezing targets is the ResNet-50 body."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, trainable_layers=5
        )
        self.head = DenseHead(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(list(self.backbone(x).values()))


@dataclass
class Spec:
    build: Callable[[], nn.Module]
    size: int
    batch: int
    frozen: str  # the part that freezing targets
    lora_targets: str | list[str]  # peft target_modules, relative to the model
    taps: list[str]  # four intermediate outputs the side network reads
    layout: str  # of the tapped features: "nchw", "nhwc" or "tokens"


SPECS = {
    "vit_b16": Spec(
        lambda: Classifier("vit_base_patch16_224"), 224, 2, "backbone", ["qkv"],
        [f"backbone.blocks.{i}" for i in (2, 5, 8, 11)], "tokens",
    ),
    "swin_t": Spec(
        lambda: Classifier("swin_tiny_patch4_window7_224"), 224, 2, "backbone", ["qkv"],
        [f"backbone.layers.{i}" for i in range(4)], "nhwc",
    ),
    "r50_fpn": Spec(
        Detector, 512, 2, "backbone.body", r"backbone\.body\.layer\d\.\d+\.conv2",
        [f"backbone.body.layer{i}" for i in range(1, 5)], "nchw",
    ),
}  # fmt: skip


# --- the side network ---------------------------------------------------------------------


class SideNetwork(nn.Module):
    """EST-like: per tapped level a 1x1 lateral convolution to ``width`` channels, fused
    top-down with a depthwise 3x3 and a pointwise convolution; the task head reads it."""

    def __init__(self, channels: list[int], width: int, head: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width),
                          nn.Conv2d(width, width, 1), nn.ReLU())
            for _ in channels
        )  # fmt: skip
        self.head, self.pooled = head, pooled

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        h: torch.Tensor | None = None
        for f, lateral, fuse in reversed(list(zip(features, self.lateral, self.fuse, strict=True))):
            x = lateral(f)
            if h is not None:
                x = x + nn.functional.interpolate(h, size=x.shape[-2:])
            h = fuse(x)
            outs.append(h)
        if self.pooled:
            return self.head(outs[-1].mean(dim=(2, 3)))
        return self.head(outs)


def to_nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout == "tokens":  # (B, 1 + HW, C), class token first
        b, n, c = t.shape
        side = int((n - 1) ** 0.5)
        return t[:, 1:].transpose(1, 2).reshape(b, c, side, side)
    return t


# --- one variant: its model, optimizer and a step -----------------------------------------


@dataclass
class Variant:
    model: nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]  # runs forward, returns the loss
    extra: list[nn.Module]  # modules outside ``model`` that train (the side network)


def build(spec: Spec, variant: str, x: torch.Tensor) -> Variant:
    torch.manual_seed(0)
    model = spec.build()
    model.train()
    classify = not isinstance(model, Detector)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean() if classify else out

    if variant == "full":
        return Variant(model, torch.optim.AdamW(model.parameters()), lambda: loss(model(x)), [])
    frozen = model.get_submodule(spec.frozen)
    guard = FrozenStageGuard(Constant(True))
    if variant == "frozen":

        def frozen_step() -> torch.Tensor:
            with guard(frozen, 0):
                return loss(model(x))

        return Variant(model, torch.optim.AdamW(model.parameters()), frozen_step, [])
    if variant in ("lora", "lora+guard"):
        # Everything outside the frozen part (neck, head) trains fully, as in the others.
        rest = [n for n, _ in model.named_children() if n != spec.frozen.split(".")[0]]
        if spec.frozen == "backbone.body":
            rest.append("backbone.fpn")
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=spec.lora_targets,
                                 modules_to_save=rest)  # fmt: skip
        model = peft.get_peft_model(model, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        if variant == "lora":
            return Variant(model, opt, lambda: loss(model(x)), [])
        inner = model.get_submodule(f"base_model.model.{spec.frozen}")
        lora_guard = FrozenStageGuard(Constant(True), trainable=[PeftAdapters()])

        def lora_step() -> torch.Tensor:
            with lora_guard(inner, 0):
                return loss(model(x))

        return Variant(model, opt, lora_step, [])
    # side: hooks take the tapped outputs; the backbone's own head is not run.
    taken: list[torch.Tensor] = []
    for name in spec.taps:
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out: taken.append(to_nchw(out, spec.layout))
        )
    with torch.no_grad():
        taken.clear()
        frozen(x)
        channels = [t.shape[1] for t in taken]
    if classify:
        side = SideNetwork(channels, 64, nn.Linear(64, 10), pooled=True)
    else:
        side = SideNetwork(channels, 128, DenseHead(128), pooled=False)

    def side_step() -> torch.Tensor:
        taken.clear()
        with guard(frozen, 0):
            frozen(x)
            return loss(side(list(taken)))

    return Variant(model, torch.optim.AdamW(side.parameters()), side_step, [side])


# --- measuring ----------------------------------------------------------------------------


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_step(v: Variant) -> tuple[float, int]:
    """One training step; its time and the bytes it saved for backward (no parameters)."""
    params = [p for m in (v.model, *v.extra) for p in m.parameters()]
    start = time.perf_counter()
    with SavedTensorMeter(exclude=params) as meter:
        loss = v.step()
    loss.backward()
    v.opt.step()
    seconds = time.perf_counter() - start
    return seconds, meter.bytes


def memory(v: Variant, saved: int) -> dict[str, int]:
    """Parameters, gradients and optimizer state after a step (before zero_grad)."""
    params = list({id(p): p for m in (v.model, *v.extra) for p in m.parameters()}.values())
    state = [t for s in v.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": tensor_bytes(state),
        "activations": saved,
    }


def measure(name: str, reps: int) -> list[dict]:
    spec = SPECS[name]
    x = torch.randn(spec.batch, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    variants = {v: build(spec, v, x) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    mem: dict[str, dict[str, int]] = {}
    for v, var in variants.items():  # one untimed step each: allocations, kernel choice
        _, saved = run_step(var)
        mem[v] = memory(var, saved)
        var.opt.zero_grad()
    for _ in range(reps):
        for v, var in variants.items():
            seconds, _ = run_step(var)
            var.opt.zero_grad()
            times[v].append(seconds)
    med = {v: statistics.median(t) for v, t in times.items()}
    total = {v: sum(m.values()) for v, m in mem.items()}
    rows = []
    for v in VARIANTS:
        rows.append({"model": name, "variant": v, "bytes": mem[v], "total": total[v],
                     "seconds": med[v]})  # fmt: skip
    dbf_mem = dict(mem["full"])  # the peak state: a trainable tick of full training
    rows.append({"model": name, "variant": "dbf5", "bytes": dbf_mem,
                 "total": max(total["full"], total["frozen"]),
                 "seconds": (med["full"] + 4 * med["frozen"]) / 5})  # fmt: skip
    for r in rows:
        r["memory_ratio_to_full"] = r["total"] / total["full"]
        r["time_ratio_to_full"] = r["seconds"] / med["full"]
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(SPECS))
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="Swin-T only, one timed step")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    names = ["swin_t"] if args.quick else args.models.split(",")
    reps = 1 if args.quick else args.reps
    torch.set_num_threads(torch.get_num_threads())
    cpu = platform.processor() or platform.machine()
    print(f"{datetime.date.today()}, {cpu}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, timm {timm.__version__}, peft {peft.__version__}; "
          f"median of {reps} timed step(s) per variant")  # fmt: skip
    records = []
    header = (
        f"{'model':8} {'variant':11} {'params':>9} {'grads':>9} {'optim':>9} {'activ.':>9} "
        f"{'total MiB':>9}  {'x full':>6}  {'s/step':>7}  {'x full':>6}"
    )
    print(header)
    for name in names:
        for r in measure(name, reps):
            b = r["bytes"]
            print(f"{r['model']:8} {r['variant']:11} {mib(b['params'])} {mib(b['grads'])} "
                  f"{mib(b['optimizer'])} {mib(b['activations'])} {mib(r['total'])}  "
                  f"{r['memory_ratio_to_full']:6.3f}  {r['seconds']:7.3f}  "
                  f"{r['time_ratio_to_full']:6.3f}")  # fmt: skip
            keys = ("model", "variant", "memory_ratio_to_full", "time_ratio_to_full")
            records.append({k: r[k] for k in keys})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
