"""The demo: fine-tune a small pretrained CNN under six freezing policies, on the CPU.

The data are embedded: a fixed procedural generator of *oriented objects* (bright bars at
random positions and angles, like vehicles and ships in aerial images). A backbone is first
"pretrained" to classify the orientation into 4 coarse bins on clean images; it is then
fine-tuned to classify 8 fine bins in a shifted domain (dimmer objects on textured clutter),
once per policy, from the same pretrained weights, with the same data order:

* full training (ρ=1),
* frozen backbone (ρ=∞, Vasconcelos et al.),
* DBF (ρ=1 → ρ=5, the paper's Table I recipe at toy scale),
* a cosine schedule (the duty of trainable epochs anneals from 1 to 0),
* plateau: after the same warm-up as DBF, freeze the backbone for good once the loss on
  a held-out *monitor* split stops improving (adaptive, :class:`Plateau`),
* gradient: freeze the backbone's three stages front to back once their gradient norms
  stop changing (adaptive, AutoFreeze-style :class:`GradientFreeze`).

Accuracy is measured on a test split that no policy sees while training. Run it with
``python -m freezesched demo``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TextIO

import numpy as np
import torch
from torch import nn

from freezesched.freezing import FrozenStageGuard, GradientSignal
from freezesched.profiling import FlopAccountant, RunCost, render_runs
from freezesched.schedules import (
    Cosine,
    GradientFreeze,
    Plateau,
    Schedule,
    Step,
    WarmupThenFreeze,
    timeline,
)

__all__ = ["format_table", "make_oriented_objects", "policies", "run_demo", "to_json"]

IMAGE = 24
#: The backbone's stages, by name, for per-stage schedules.
STAGES = ("backbone.0", "backbone.1", "backbone.2")


def make_oriented_objects(
    n: int, classes: int, *, seed: int, shifted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` images of one bar each; the label is the bar's angle bin.

    Args:
        n: Number of images.
        classes: Number of equal angle bins over ``[0, π)``.
        seed: Seed of the generator (the data are a pure function of the arguments).
        shifted: The target domain: dimmer, thinner objects on textured clutter.

    Returns:
        Images of shape ``(n, 1, 24, 24)`` and integer labels of shape ``(n,)``.

    Examples:
        >>> x, y = make_oriented_objects(8, 4, seed=0, shifted=False)
        >>> tuple(x.shape), int(y.max()) < 4
        ((8, 1, 24, 24), True)
    """
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.0, math.pi, n)
    centre = rng.uniform(7.0, IMAGE - 7.0, (n, 2))
    length = rng.uniform(11.0, 16.0, n)
    width = rng.uniform(2.0, 3.0, n) if shifted else rng.uniform(3.0, 4.5, n)
    grid = np.arange(IMAGE, dtype=np.float64) + 0.5
    gx = grid[None, None, :] - centre[:, 0, None, None]
    gy = grid[None, :, None] - centre[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    along = gx * cos + gy * sin
    across = -gx * sin + gy * cos

    def soft_box(d: np.ndarray, half: np.ndarray) -> np.ndarray:
        return np.asarray(1.0 / (1.0 + np.exp(4.0 * (np.abs(d) - half[:, None, None]))))

    bar = soft_box(along, length / 2) * soft_box(across, width / 2)
    noise = rng.normal(0.0, 0.25 if shifted else 0.1, (n, IMAGE, IMAGE))
    if shifted:  # low-frequency clutter: sums of random stripes
        freq = rng.uniform(0.2, 0.6, (n, 2))
        phase = rng.uniform(0, 2 * math.pi, n)[:, None, None]
        clutter = np.sin(freq[:, 0, None, None] * gx + freq[:, 1, None, None] * gy + phase)
        images = 0.6 * bar + 0.3 * clutter + noise
    else:
        images = bar + noise
    labels = np.minimum((theta / math.pi * classes).astype(np.int64), classes - 1)
    return torch.from_numpy(images[:, None].astype(np.float32)), torch.from_numpy(labels)


class DemoNet(nn.Module):
    """A 3-stage CNN backbone (with BatchNorm) and a small convolutional head."""

    def __init__(self, classes: int) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.backbone = nn.Sequential(stage(1, 16, 1), stage(16, 32, 2), stage(32, 64, 2))
        self.head = nn.Sequential(
            nn.Conv2d(64, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone(x))
        return logits


def policies(epochs: int) -> dict[str, Schedule]:
    """The demo's six policies for a run of ``epochs`` epochs (tick = epoch).

    The last two are adaptive: new objects each call, which decide while the demo runs
    (``plateau`` observes the monitor split's loss after each epoch, ``gradient`` the
    mean gradient norm of each backbone stage over the epoch). Before that, only their
    first ticks are decided.

    Examples:
        >>> plan = policies(15)
        >>> {name: int(s.timeline(15).sum()) for name, s in list(plan.items())[:4]}
        {'full (ρ=1)': 0, 'frozen (ρ=∞)': 15, 'DBF (ρ=1 → ρ=5)': 9, 'cosine': 7}
        >>> plan["plateau"].horizon, plan["gradient"].horizon  # decided so far
        (4, 1)
    """
    warmup = max(1, epochs // 5)
    return {
        "full (ρ=1)": Step(1),
        "frozen (ρ=∞)": Step(math.inf),
        "DBF (ρ=1 → ρ=5)": WarmupThenFreeze(warmup, then=Step(5)),
        "cosine": Cosine(begin=0, end=epochs),
        "plateau": WarmupThenFreeze(warmup, then=Plateau(patience=1, threshold=0.01)),
        "gradient": GradientFreeze(len(STAGES), threshold=0.1, every=1),
    }


class _Progress:
    """A one-line progress bar on a terminal; one line per finished policy elsewhere."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.live = stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.live:
            width = 30
            filled = int(width * self.done / self.total)
            bar = "█" * filled + "·" * (width - filled)
            self.stream.write(f"\r{bar} {self.done}/{self.total} {label[:40]:<40}")
            self.stream.flush()

    def note(self, line: str) -> None:
        if not self.live:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return float(correct) / len(y)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    model.train()
    return loss


def _pretrain(samples: int, epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    x, y = make_oriented_objects(samples, 4, seed=seed, shifted=False)
    model = DemoNet(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(samples, generator=gen), 32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            torch.autograd.backward(loss)
            opt.step()
    return model.backbone


def run_demo(
    *,
    epochs: int = 15,
    samples: int = 768,
    pretrain_epochs: int = 4,
    seed: int = 0,
    stream: TextIO | None = None,
    plan: Mapping[str, Schedule] | None = None,
) -> list[RunCost]:
    """Pretrain once, fine-tune under each policy, and return one record per policy.

    Each record has the test accuracy (``metrics["val acc %"]``), the measured FLOPs per
    epoch (``curve``), time, FLOPs in both conventions and the bytes autograd kept for
    backward in a frozen and a trainable step. Adaptive policies decide as they train:
    a metric-driven one observes the loss on a monitor split after each epoch, a
    gradient-driven one the per-stage gradient norms averaged over the epoch; afterwards
    their schedules hold what they decided (for timelines and plots).

    Args:
        epochs: Fine-tuning epochs per policy (the tick of every schedule).
        samples: Training images for fine-tuning (and pretraining).
        pretrain_epochs: Epochs of source-task pretraining.
        seed: Seed of data, initialisation and data order.
        stream: Where the progress bar goes (default: standard error).
        plan: The policies, by name (default: :func:`policies`); binary schedules freeze
            the backbone, per-stage ones its stages (:data:`STAGES`).

    Returns:
        One :class:`~freezesched.profiling.RunCost` per policy, in the order of
        ``plan``.
    """
    stream = sys.stderr if stream is None else stream
    pretrained = _pretrain(samples, pretrain_epochs, seed)
    x, y = make_oriented_objects(samples, 8, seed=seed + 1, shifted=True)
    x_val, y_val = make_oriented_objects(max(256, samples // 3), 8, seed=seed + 2, shifted=True)
    x_mon, y_mon = make_oriented_objects(max(128, samples // 6), 8, seed=seed + 5, shifted=True)
    plan = policies(epochs) if plan is None else plan
    progress = _Progress(len(plan) * epochs, stream)
    results = []
    for name, schedule in plan.items():
        torch.manual_seed(seed + 3)
        model = DemoNet(8)
        model.backbone = copy.deepcopy(pretrained)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
        per_stage = schedule.num_stages > 1
        guard = FrozenStageGuard(schedule, list(STAGES) if per_stage else None)
        target = model if per_stage else model.backbone
        signals = schedule.signals
        gradients = (
            GradientSignal([model.get_submodule(n) for n in STAGES])
            if "gradient_norm" in signals
            else None
        )
        accountant = FlopAccountant(model, samples_per_state=1)
        gen = torch.Generator().manual_seed(seed + 4)
        start = time.perf_counter()
        model.train()
        curve = []
        for epoch in range(epochs):
            for idx in torch.split(torch.randperm(samples, generator=gen), 32):
                with (
                    guard(target, epoch) as region,
                    accountant.step(region, batch_size=len(idx)),
                ):
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    torch.autograd.backward(loss)
                if gradients is not None:
                    gradients.record()
                opt.step()
                opt.zero_grad()
            curve.append(accountant.totals().flops_measured)
            if gradients is not None:
                schedule.observe(epoch, gradients.take())
            if "metric" in signals:
                schedule.observe(epoch, _loss(model, x_mon, y_mon))
            progress.step(f"{name} epoch {epoch + 1}/{epochs}")
        seconds = time.perf_counter() - start
        progress.note(f"  {name}: done in {seconds:.1f} s")
        run = accountant.totals(name, schedule=schedule.summary())
        results.append(
            replace(
                run,
                ticks=epochs,
                frozen_ticks=float(timeline(schedule, epochs).mean(axis=1).sum()),
                curve=tuple(curve),
                metrics={"val acc %": round(100 * _accuracy(model, x_val, y_val), 1)},
            )
        )
    progress.close()
    return results


def format_table(results: Sequence[RunCost]) -> str:
    """The demo's records as an aligned text table (:func:`render_runs`).

    "frozen" counts frozen epochs (for a per-stage policy, the fraction of the backbone's
    stages frozen, summed over epochs); FLOPs are totals over the run, ``TFLOPs = 1e12``
    FLOPs; ΔTFLOPs is measured (what autograd ran) against the full-training run, and
    "(2x)" in the DBF paper's convention (backward = 2 x forward of trainable layers);
    "saved MiB" is what autograd keeps for backward in a frozen / trainable step.
    """
    return render_runs(results)


def to_json(results: Sequence[RunCost]) -> str:
    """The records as a JSON list, one object per policy (:meth:`RunCost.to_dict`)."""
    return json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False)
