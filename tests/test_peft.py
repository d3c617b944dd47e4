"""LoRA through peft under the guard and the controller (issue 16, point 1).

Runs where peft is installed (``scripts/other_torch.sh newest``); skipped elsewhere.
"""

from __future__ import annotations

import copy

import pytest

peft = pytest.importorskip("peft")

import torch  # noqa: E402
from helpers import bitwise_equal, saved_bytes, tensors  # noqa: E402
from peft import LoraConfig, get_peft_model, inject_adapter_in_model  # noqa: E402
from torch import nn  # noqa: E402

from freezesched import (  # noqa: E402
    Constant,
    FreezeController,
    FrozenStageGuard,
    Sequential,
    Step,
    UnfreezeAt,
    freeze,
)
from freezesched.integrations.peft import PeftAdapters, adapter_names, make_trainable  # noqa: E402
from freezesched.profiling import SavedTensorMeter  # noqa: E402

RANK = 2


class ConvNet(nn.Module):
    """A small CNN with BatchNorm and dropout: stem, two stages, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3)
        )
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x))).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def lora_net(seed: int = 0, **config) -> nn.Module:
    torch.manual_seed(seed)
    cfg = {"r": RANK, "lora_alpha": 4, "target_modules": ["stage1.0", "stage2.0", "fc"]}
    cfg.update(config)
    model = get_peft_model(ConvNet(), LoraConfig(**cfg))
    # LoRA's B starts at zero; give it values so that every adapter gets a gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def batch(step: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def split(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights and buffers, adapter weights), cloned."""
    state = tensors(model)
    trained = ("lora_", "modules_to_save", "head.")
    adapters = {k: v for k, v in state.items() if any(t in k for t in trained)}
    return {k: v for k, v in state.items() if k not in adapters}, adapters


# --- base frozen bitwise, LoRA trains --------------------------------------------------


def test_peft_alone_lets_batchnorm_statistics_of_the_frozen_base_drift():
    """The contrast: what the guard adds to peft (the next test)."""
    model = lora_net()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    base, _ = split(model)
    train_step(model, opt, 0)
    drifted = [k for k, v in split(model)[0].items() if not torch.equal(v, base[k])]
    assert drifted and all("running" in k or "num_batches" in k for k in drifted)


@pytest.mark.parametrize("how", ["get_peft_model", "inject_adapter_in_model"])
def test_guard_keeps_the_base_bitwise_and_trains_the_adapters(how):
    if how == "get_peft_model":
        model = lora_net()
    else:
        torch.manual_seed(0)
        model = inject_adapter_in_model(
            LoraConfig(r=RANK, target_modules=["stage1.0", "stage2.0", "fc"]), ConvNet()
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.requires_grad_(False)  # inject_adapter_in_model leaves the base trainable...
        for name in adapter_names(model):
            model.get_submodule(name).requires_grad_(True)  # ...so freeze it as peft would
        model.head.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    guard = FrozenStageGuard(Constant(True), trainable=[PeftAdapters(), "*head*"])
    base, adapters = split(model)
    for step in range(3):
        with guard(model, step):
            model.train()
            train_step(model, opt, step)
    base_after, adapters_after = split(model)
    assert bitwise_equal(base, base_after)  # weights and BatchNorm statistics
    lora = [k for k in adapters if "lora_A" in k or "lora_B" in k]
    assert lora and all(not torch.equal(adapters[k], adapters_after[k]) for k in lora)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # peft's own


def test_batchnorm_and_layernorm_policy_as_configured():
    model = lora_net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    bn = model.base_model.model.stem[1]
    stats = bn.running_mean.clone()
    with freeze(model, trainable=[PeftAdapters()], bn="train"):
        train_step(model, opt, 0)
    assert not torch.equal(bn.running_mean, stats)  # bn="train": statistics update

    torch.manual_seed(0)
    vit_like = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2))
    vit_like = get_peft_model(vit_like, LoraConfig(r=RANK, target_modules=["0"]))
    with freeze(vit_like, trainable=[PeftAdapters(), nn.LayerNorm]):
        trainable = sorted(n for n, p in vit_like.named_parameters() if p.requires_grad)
    # The LayerNorm is trainable inside the frozen region only if peft left it trainable:
    # an exception keeps its own flag, and peft froze it.
    assert trainable == [
        "base_model.model.0.lora_A.default.weight",
        "base_model.model.0.lora_B.default.weight",
    ]
    make_trainable(vit_like, "base_model.model.1")
    with freeze(vit_like, trainable=[PeftAdapters(), nn.LayerNorm]):
        trainable = sorted(n for n, p in vit_like.named_parameters() if p.requires_grad)
    assert (
        "base_model.model.1.weight" in trainable
        and "base_model.model.0.base_layer.weight" not in trainable
    )


def test_modules_to_save_copies_train_and_the_originals_stay_frozen():
    model = lora_net(modules_to_save=["head"])
    wrapper = model.base_model.model.head
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    original = wrapper.original_module.weight.clone()
    copy_before = wrapper.modules_to_save["default"].weight.clone()
    with freeze(model, trainable=[PeftAdapters()]):
        train_step(model, opt, 0)
    assert torch.equal(wrapper.original_module.weight, original)
    assert not torch.equal(wrapper.modules_to_save["default"].weight, copy_before)


# --- no activation kept that the LoRA gradients do not need -----------------------------


class HandLoRA(nn.Module):
    """The reference: a hand-written LoRA layer on a frozen base (y = Wx + s·B(A(drop(x))))."""

    def __init__(self, base: nn.Module, a: nn.Module, b: nn.Module, scale: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x)) * self.scale


def hand_written_reference(model: nn.Module) -> nn.Module:
    """ConvNet with the same weights, LoRA written by hand, the base frozen and in eval."""
    net = copy.deepcopy(model.base_model.model)
    ref = ConvNet()
    ref.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
    )
    ref.requires_grad_(False)
    ref.eval()
    for name in ("stage1.0", "stage2.0", "fc"):
        layer = net.get_submodule(name)
        parent, child = name.rsplit(".", 1) if "." in name else ("", name)
        owner = ref.get_submodule(parent) if parent else ref
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        hand = HandLoRA(getattr(owner, child), a, b, layer.scaling["default"])
        setattr(owner, child, hand)
    return ref


def test_lora_under_the_guard_keeps_exactly_what_a_hand_written_lora_keeps():
    model = lora_net()
    ref = hand_written_reference(model)
    x, y = batch(0)
    guard = FrozenStageGuard(Constant(True), trainable=[PeftAdapters()])

    def guarded():
        with guard(model, 0):
            return nn.functional.cross_entropy(model(x), y)

    model.train()
    guarded_bytes = saved_bytes(guarded)
    reference_bytes = saved_bytes(lambda: nn.functional.cross_entropy(ref(x), y))
    assert guarded_bytes == reference_bytes
    # Same function, too: the outputs agree (the base in eval mode in both).
    with guard(model, 0):
        assert torch.allclose(model(x), ref(x), atol=1e-6)
    # peft alone keeps more: its BatchNorm computes batch statistics and its dropout
    # draws a mask for backward.
    assert saved_bytes(lambda: nn.functional.cross_entropy(model(x), y)) > guarded_bytes


def test_the_frozen_stem_before_the_first_adapter_keeps_nothing():
    model = lora_net()
    net = model.base_model.model
    x, _ = batch(0)
    with freeze(model, trainable=[PeftAdapters()]), SavedTensorMeter() as meter:
        features = net.stem(x)
    assert meter.bytes == 0 and not features.requires_grad
    with freeze(model, trainable=[PeftAdapters()]), SavedTensorMeter() as meter:
        out = net.stage1(features)
    # stage1 = LoRA conv (base 3x3 8->8, lora_A 3x3 8->2, lora_B 1x1 2->8), BatchNorm,
    # ReLU, Dropout. Counted by hand, in bytes (float32, batch 4, 8x8): what the adapters'
    # gradients and the gradient flowing back to them need, and nothing for the base
    # convolution's weight, no batch statistics and no dropout mask.
    act = 4 * 8 * 8 * 8 * 4  # one 8-channel activation
    expected = {
        "lora_A input (the stage input)": act,
        "lora_A weight": 2 * 8 * 3 * 3 * 4,
        "lora_A output (lora_B input)": 4 * RANK * 8 * 8 * 4,
        "lora_B weight": 8 * RANK * 4,
        # PyTorch's eval-mode batch-norm formula keeps its input even when only the input
        # gradient is needed: a limit of the formula, the same in the hand-written
        # reference above (test_lora_under_the_guard_keeps_exactly_...).
        "BatchNorm input": act,
        "BatchNorm weight, running mean and variance": 3 * 8 * 4,
        "ReLU output": act,
    }
    assert out.requires_grad
    assert meter.bytes == sum(expected.values())


# --- schedules drive the adapters and blocks of the base --------------------------------


def changed_groups(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    groups = set()
    for k in before:
        if torch.equal(before[k], after[k]):
            continue
        if "lora_" in k:
            groups.add("adapters")
        elif ".fc.base_layer" in k:
            groups.add("fc")
        elif ".head." in k:
            groups.add("head" if "modules_to_save" in k else f"other:{k}")
        else:
            groups.add(f"other:{k}")
    return groups


def test_warm_up_the_adapters_then_unfreeze_a_base_block_on_a_dbf_step_schedule():
    model = lora_net(modules_to_save=["head"])
    net = "base_model.model"
    switched = make_trainable(model, f"{net}.fc")
    assert switched == [f"{net}.fc.base_layer.weight", f"{net}.fc.base_layer.bias"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    warmup = 2
    ctrl = FreezeController(
        model,
        {
            tuple(adapter_names(model)): UnfreezeAt(1),  # head only at tick 0
            f"{net}.fc": Sequential([Constant(True), Step(2)], [warmup]),  # DBF after warm-up
        },
        trainable=[PeftAdapters()],
        optimizers=opt,
    )
    seen = []
    with ctrl:
        for tick in range(6):
            ctrl.apply(tick)
            before = tensors(model)
            model.train()
            train_step(model, opt, tick)
            seen.append(changed_groups(before, tensors(model)))
    # Expected, tick by tick: the head (modules_to_save) always; adapters from tick 1;
    # fc's base weights at ticks 2 and 4 (Step(2) counted from the warm-up's end). The
    # rest of the base never moves (BatchNorm statistics do: nothing pins them here).
    trained = [{g for g in s if not g.startswith("other:")} for s in seen]
    others = {g for s in seen for g in s if g.startswith("other:")}
    assert others and all("running" in g or "num_batches" in g for g in others)
    assert trained == [
        {"head"},
        {"head", "adapters"},
        {"head", "adapters", "fc"},
        {"head", "adapters"},
        {"head", "adapters", "fc"},
        {"head", "adapters"},
    ]
    assert all(p.requires_grad for p in model.base_model.model.fc.parameters())


def test_scheduling_a_base_block_peft_froze_is_refused_not_silently_idle():
    model = lora_net()
    ctrl = FreezeController(model, {"base_model.model.fc": Step(2)}, trainable=[PeftAdapters()])
    with pytest.raises(ValueError, match=r"base_model\.model\.fc.*peft freezes"):
        ctrl.apply(0)
    assert not model.base_model.model.fc.base_layer.weight.requires_grad


def test_make_trainable_leaves_replaced_originals_and_inactive_adapters_alone():
    model = lora_net(modules_to_save=["head"])
    model.add_adapter("other", LoraConfig(r=RANK, target_modules=["fc"]))
    net = "base_model.model"
    switched = make_trainable(model, [f"{net}.fc", f"{net}.head"])
    assert switched == [f"{net}.fc.base_layer.weight", f"{net}.fc.base_layer.bias"]
    assert not model.base_model.model.head.original_module.weight.requires_grad
    assert not model.base_model.model.fc.lora_A["other"].weight.requires_grad
    with pytest.raises(ValueError, match=r"names\[0\].*'nope'"):
        make_trainable(model, ["nope"])
    with pytest.raises(TypeError, match="names must be"):
        make_trainable(model, [1])


def test_adapter_names_and_the_rule_on_models_without_adapters():
    with pytest.raises(ValueError, match="has none"):
        adapter_names(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"matched nothing: \[PeftAdapters\(\)\]"):
        freeze(nn.Sequential(nn.Linear(2, 2)), trainable=[PeftAdapters()]).__enter__()


def test_an_inactive_adapter_stays_frozen_inside_the_region_and_after():
    model = lora_net()
    model.add_adapter("other", LoraConfig(r=RANK, target_modules=["fc"]))
    fc = model.base_model.model.fc
    assert fc.lora_A["default"].weight.requires_grad
    assert not fc.lora_A["other"].weight.requires_grad
    with freeze(model, trainable=[PeftAdapters()]):
        assert fc.lora_A["default"].weight.requires_grad
        assert not fc.lora_A["other"].weight.requires_grad
    assert not fc.lora_A["other"].weight.requires_grad
