"""The memory plan (issue 14, point 7): byte counts by hand, and peaks measured on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from freezesched import freeze
from freezesched.__main__ import main
from freezesched.profiling import PeakMemoryMeter, plan_memory, render_memory


def _tiny() -> nn.Sequential:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))


# Frozen phase of _tiny() with "0" frozen: T = 22 trainable elements (layer 2: 20 + 2), F = 110
# frozen (layer 0: 100 + 10); fp32 AdamW: 4-byte weights and grads, 8 bytes of moments per
# element plus a 4-byte step per trainable tensor. 4 ranks. ZeRO shards flat: ceil(22/4) = 6,
# ceil(110/4) = 28. FSDP shards each tensor on dim 0: (2,10) -> 1 row = 10, (2,) -> 1,
# (10,10) -> 3 rows = 30, (10,) -> 3. Units: the Sequential's children; the largest holds
# 110 elements (22 trainable): gathered 2 x 110 x 4 + 22 x 4 = 968.
EXPECTED = {
    # sharding: (weights, gradients, optimizer, buffers)
    "ddp": (132 * 4, 22 * 4, 22 * 8 + 2 * 4, 22 * 4),
    "zero1": (132 * 4, 22 * 4, 6 * 8 + 2 * 4, 22 * 4),
    "zero2": (132 * 4, 6 * 4, 6 * 8 + 2 * 4, 22 * 4),
    "zero3": ((6 + 28) * 4, 6 * 4, 6 * 8 + 2 * 4, 968),
    "fsdp": ((11 + 33) * 4, 11 * 4, 11 * 8 + 2 * 4, 968),
}


@pytest.mark.parametrize("sharding", sorted(EXPECTED))
def test_bytes_per_rank_follow_the_sharding(sharding):
    plan = plan_memory(_tiny(), (4, 10), ["0"], sharding=sharding, world_size=4)
    trainable, frozen = plan.phases
    assert (frozen.trainable_elements, frozen.frozen_elements) == (22, 110)
    assert (trainable.trainable_elements, trainable.frozen_elements) == (132, 0)
    got = (frozen.weights, frozen.gradients, frozen.optimizer, frozen.buffers)
    assert got == EXPECTED[sharding]


def test_unsharded_fp32_and_bf16_with_master_weights():
    trainable, frozen = plan_memory(_tiny(), (4, 10), ["0"]).phases
    assert (trainable.weights, trainable.gradients, trainable.optimizer) == (528, 528, 1072)
    assert (frozen.gradients, frozen.buffers) == (88, 0)
    # bf16 weights and grads (2 bytes), fp32 master (4) and moments (2 x 4) per element
    trainable, frozen = plan_memory(_tiny(), (4, 10), ["0"], precision="bf16-master").phases
    assert (trainable.weights, trainable.gradients, trainable.optimizer) == (
        264, 264, 132 * 12 + 16,
    )  # fmt: skip
    # SGD keeps no state; with momentum one buffer per element
    _, frozen = plan_memory(_tiny(), (4, 10), ["0"], optimizer="sgd").phases
    assert frozen.optimizer == 0
    _, frozen = plan_memory(_tiny(), (4, 10), ["0"], optimizer="sgd-momentum").phases
    assert frozen.optimizer == 22 * 4


def test_layerwise_stages_give_one_phase_per_prefix():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    plan = plan_memory(net, (2, 4), ["0", ["1"], "2"])
    assert [p.label for p in plan.phases] == [
        "trainable", "stage 1 frozen", "stages 1-2 frozen", "stages 1-3 frozen",
    ]  # fmt: skip
    assert [p.trainable_elements for p in plan.phases] == [50, 30, 10, 0]
    assert plan.phases[-1].activations == 0  # nothing trains: nothing saved


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sharding": "zero4"}, "sharding must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"optimizer": "lamb"}, "optimizer must be one of"),
        ({"sharding": "none", "world_size": 2}, "world_size must be 1 with sharding='none'"),
        ({"world_size": 0, "sharding": "fsdp"}, "world_size must be an int in [1,"),
    ],
)
def test_bad_arguments_name_argument_rule_and_value(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        plan_memory(_tiny(), (4, 10), ["0"], **kwargs)
    assert fragment in str(info.value)


def test_an_unknown_module_is_an_error():
    with pytest.raises(ValueError, match="none called 'backbone'"):
        plan_memory(_tiny(), (4, 10), ["backbone"])


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, dim))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


class SmallViT(nn.Module):
    """A ViT with a token-wise head: patch embedding, 4 blocks, an MLP head."""

    def __init__(self, dim: int = 96) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.embed = nn.Conv2d(3, dim, 8, 8)
        self.backbone.blocks = nn.ModuleList(_Block(dim) for _ in range(4))
        self.head = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.embed(x).flatten(2).transpose(1, 2)
        for block in self.backbone.blocks:
            h = block(h)
        return self.head(h)


def _measured_peak(batch: int, frozen: list[str], autocast: bool) -> int:
    """Peak CPU tensor bytes of two training steps, model and optimizer built inside."""
    with PeakMemoryMeter() as meter:
        torch.manual_seed(0)
        model = SmallViT()
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
        x = torch.randn(batch, 3, 64, 64)
        with freeze(model, frozen) if frozen else torch.enable_grad():
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(x).float().sum()
                loss.backward()
                opt.step()
                opt.zero_grad()
    return meter.peak


@pytest.mark.parametrize(("batch", "precision"), [(2, "fp32"), (16, "fp32"), (16, "bf16-mixed")])
def test_the_planned_peak_is_within_10_percent_of_the_measured_cpu_peak(batch, precision):
    with torch.device("meta"):
        model = SmallViT()
    plan = plan_memory(model, (batch, 3, 64, 64), ["backbone"], precision=precision)
    for phase, frozen in zip(plan.phases, ([], ["backbone"]), strict=True):
        measured = _measured_peak(batch, frozen, precision == "bf16-mixed")
        assert abs(phase.peak / measured - 1) < 0.10, (phase.label, phase.peak, measured)


def test_plan_memory_on_the_command_line(capsys):
    argv = ["plan-memory", "--model", "helpers:make_net", "--input-shape", "2,3,32,32",
            "--module", "backbone", "--sharding", "fsdp", "--world-size", "2"]  # fmt: skip
    assert main([*argv, "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in plan["phases"]] == ["trainable", "frozen"]
    assert plan["sharding"] == "fsdp" and plan["world_size"] == 2
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:3] == ["phase", "frozen", "trainable"]
    assert main([*argv[:-2], "--world-size", "0"]) == 2
    assert "world_size must be an int" in capsys.readouterr().err


def test_render_memory_keeps_bytes_in_csv():
    plan = plan_memory(_tiny(), (4, 10), ["0"])
    rows = render_memory(plan, "csv").splitlines()
    assert rows[0].startswith("phase,frozen,trainable,weights,gradients")
    assert rows[2].split(",")[3] == "528"
