"""timm backbones out of the box (issue 16, point 3): block stages by name, gradient
checkpointing, layer-decay parameter groups, peft-wrapped timm models.

Runs where timm is installed (``scripts/other_torch.sh newest``); skipped elsewhere.
"""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from helpers import bitwise_equal, tensors  # noqa: E402
from torch import nn  # noqa: E402

from freezesched import (  # noqa: E402
    Constant,
    FreezeController,
    FrozenStageGuard,
    Layerwise,
    LRRamp,
    Step,
)
from freezesched.integrations.timm import timm_stages  # noqa: E402


def vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args)


def test_stages_name_the_blocks_of_vit_swin_resnet_and_convnext():
    assert timm_stages(vit(depth=12)) == [(f"blocks.{i}",) for i in range(11)] + [
        ("blocks.11", "norm")
    ]
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1))
    assert timm_stages(swin) == [("layers.0",), ("layers.1",), ("layers.2",), ("layers.3",)]
    resnet = timm.create_model("resnet18")
    assert timm_stages(resnet, stem=True) == [
        ("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)
    ]  # fmt: skip
    convnext = timm.create_model("convnext_atto")
    assert timm_stages(convnext) == [(f"stages.{i}",) for i in range(4)]


def test_a_vit_stem_with_trainable_position_embedding_is_refused_then_accepted():
    model = vit(depth=2)
    with pytest.raises(ValueError, match=r"\['cls_token', 'pos_embed'\]"):
        timm_stages(model, stem=True)
    model.cls_token.requires_grad_(False)
    model.pos_embed.requires_grad_(False)
    assert timm_stages(model, stem=True)[0] == ("patch_embed",)


def test_stages_of_a_wrapped_timm_model_are_prefixed_and_bad_input_is_named():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(vit(depth=2), peft.LoraConfig(r=2, target_modules=["qkv"]))
    assert timm_stages(model) == [
        ("base_model.model.blocks.0",), ("base_model.model.blocks.1", "base_model.model.norm")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="contain\\) a timm model"):
        timm_stages(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        timm_stages("vit")  # type: ignore[arg-type]


def block_changes(before: dict, after: dict, depth: int) -> list[bool]:
    return [
        any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"p:blocks.{i}."))
        for i in range(depth)
    ]


def test_layerwise_progressive_freezing_addresses_vit_blocks_by_name():
    depth = 4
    model = vit(depth=depth, drop_path_rate=0.2)
    model.cls_token.requires_grad_(False)
    model.pos_embed.requires_grad_(False)
    stages = timm_stages(model, stem=True)  # stem + 4 blocks
    schedule = Layerwise.progressive(len(stages), first=1, last=4)
    # Stage i is frozen from tick 1 + floor(3 * i / 4) (linear spacing), by hand:
    freeze_at = [1, 1, 2, 3, 4]
    guard = FrozenStageGuard(schedule, modules=stages)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    trained = []
    for tick in range(6):
        x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2,), generator=g)
        before = tensors(model)
        with guard(model, tick) as region:
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trained.append(block_changes(before, tensors(model), depth))
        assert region.frozen == tuple(tick >= f for f in freeze_at)
    # Block i is stage i + 1: it trains before its stage freezes and never after.
    assert trained == [[tick < freeze_at[i + 1] for i in range(depth)] for tick in range(6)]


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_grad_checkpointing_with_frozen_blocks_gives_the_same_gradients(drop_path):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = vit(depth=4, drop_path_rate=drop_path)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        guard = FrozenStageGuard(Constant(True), modules=[["patch_embed", "blocks.0", "blocks.1"]])
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the DropPath draws of the trainable blocks
        with guard(model, 0):
            model(x).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert not any(k.startswith(("blocks.0.", "blocks.1.", "patch_embed.")) for k in plain)
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_layer_decay_parameter_groups_with_a_controller_and_an_lr_ramp():
    from timm.optim import create_optimizer_v2

    depth = 3
    model = vit(depth=depth)
    opt = create_optimizer_v2(model, "adamw", lr=1e-2, layer_decay=0.7)
    assert len({g["lr_scale"] for g in opt.param_groups}) > depth  # one scale per layer
    lrs = [g["lr"] for g in opt.param_groups]
    stages = timm_stages(model)
    ctrl = FreezeController(
        model, {tuple(stages): Step(2)}, optimizers=opt, unfreeze_lr=LRRamp(0.5, 2)
    )  # groups never mix blocks: accepted
    g = torch.Generator().manual_seed(0)
    with ctrl:
        for tick in range(4):
            ctrl.apply(tick)
            before = tensors(model)
            x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            assert block_changes(before, tensors(model), depth) == [tick % 2 == 0] * depth
            assert [g["lr"] for g in opt.param_groups] == lrs  # the ramp restores exactly
    # One group for everything mixes blocks with the head: the ramp cannot apply.
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="parameter groups of their own"):
        FreezeController(model, {tuple(stages): Step(2)}, optimizers=plain, unfreeze_lr=LRRamp())


def test_swin_under_the_guard_keeps_its_frozen_stages_bitwise():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1),
        img_size=64, window_size=2, num_classes=3, drop_path_rate=0.2,
    )  # fmt: skip
    stages = timm_stages(model, stem=True)
    guard = FrozenStageGuard(Constant(True), modules=[[n for s in stages[:3] for n in s]])
    frozen = {k: v for k, v in tensors(model).items() if k.split(":")[1].startswith(
        ("patch_embed", "layers.0", "layers.1"))}  # fmt: skip
    last = model.layers[3].blocks[0].mlp.fc1.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        with guard(model, step):
            model(torch.randn(2, 3, 64, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    after = {k: v for k, v in tensors(model).items() if k in frozen}
    assert bitwise_equal(frozen, after)
    assert not torch.equal(model.layers[3].blocks[0].mlp.fc1.weight, last)  # trains
