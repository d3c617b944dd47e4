"""Small models and snapshot helpers shared by the freezing tests."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from freezesched.profiling import SavedTensorMeter


class Adapter(nn.Module):
    """A residual bottleneck adapter, zero-initialised up-projection excluded."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, 2, 1)
        self.up = nn.Conv2d(2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class Net(nn.Module):
    """A detector in miniature: conv backbone (BN, dropout, adapter), neck, head."""

    def __init__(self, *, dropout: float = 0.2, adapter: bool = False) -> None:
        super().__init__()
        stages = [
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1, stride=2),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Dropout(dropout),
            ),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU()),
        ]
        if adapter:
            stages[1].add_module("adapter", Adapter(8))
        self.backbone = nn.Sequential(*stages)
        self.neck = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.neck(self.backbone(x))
        return self.head(feats.mean(dim=(2, 3)))


def make_net(seed: int = 0, *, dropout: float = 0.2, adapter: bool = False) -> Net:
    torch.manual_seed(seed)
    return Net(dropout=dropout, adapter=adapter)


def batch(step: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x), y)


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    state = {f"p:{k}": v.detach().clone() for k, v in module.named_parameters()}
    state.update({f"b:{k}": v.detach().clone() for k, v in module.named_buffers()})
    return state


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def flags(model: nn.Module) -> dict[str, object]:
    """Everything the guard may touch, other than values: flags, modes, instance attrs."""
    out: dict[str, object] = {}
    for name, p in model.named_parameters():
        out[f"requires_grad:{name}"] = p.requires_grad
    for name, m in model.named_modules():
        out[f"training:{name}"] = m.training
        out[f"own_attrs:{name}"] = sorted(k for k in ("forward", "train") if k in m.__dict__)
        out[f"hooks:{name}"] = (len(m._forward_hooks), len(m._forward_pre_hooks))
    return out


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn``."""
    with SavedTensorMeter() as meter:
        fn()
    return meter.bytes


def runs_in_eval(bn: nn.Module) -> bool:
    """Whether a BatchNorm layer's forward currently behaves as in eval mode.

    In train mode a forward updates the running statistics; in eval mode it does not.
    The layer's ``.training`` flag is left as it was.
    """
    flag = bn.training
    before = bn.running_mean.clone()
    with torch.no_grad():
        bn(torch.randn(4, bn.num_features, 3, 3))
    after = bn.running_mean.clone()
    bn.running_mean.copy_(before)
    assert bn.training is flag
    return torch.equal(before, after)


def run_ranks(target: Callable[..., None], world: int, timeout: float, *args: Any) -> dict:
    """Spawn ``target(rank, world, *args, results)`` per rank; the payload each rank put.

    Each worker puts ``(rank, "ok" | "error", payload_or_traceback)`` on ``results``. A rank
    that hangs or dies fails the test after ``timeout`` seconds instead of the CI run.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(rank, world, *args, results)) for rank in range(world)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        for _ in range(world):
            rank, status, payload = results.get(timeout=timeout)
            outcomes[rank] = (status, payload)
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert len(outcomes) == world, f"a rank hung or died: got {sorted(outcomes)}"
    for rank, (status, payload) in outcomes.items():
        assert status == "ok", f"rank {rank} failed:\n{payload}"
    return {rank: payload for rank, (_, payload) in outcomes.items()}


def tiny_backbone_and_head(classes: int = 3) -> tuple[nn.Sequential, nn.Sequential]:
    """The small conv backbone (with BatchNorm) and head the integration tests train."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    )  # fmt: skip
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
    return backbone, head
