"""FrozenStageGuard: invariants, equivalence, memory, policies, exceptions, restoration."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from helpers import (
    batch,
    bitwise_equal,
    changed,
    flags,
    loss_fn,
    make_net,
    runs_in_eval,
    saved_bytes,
    tensors,
)
from torch import nn

from freezesched import (
    Constant,
    FreezeController,
    FrozenStageGuard,
    Layerwise,
    Step,
    WarmupThenFreeze,
    freeze,
    is_frozen,
)

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=1e-2),
}
VARIANTS = ["plain", "zero-grad-keep", "clip", "autocast-bf16", "train-inside", "all"]


def _train_step(model, opt, guard, tick, step, variant):
    on = {variant} if variant != "all" else set(VARIANTS)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if "autocast-bf16" in on
        else contextlib.nullcontext()
    )
    with guard(model.backbone, tick):
        if "train-inside" in on:
            model.train()  # e.g. a loop that calls model.train() every step
        with autocast:
            loss = loss_fn(model, step)
        loss.backward()
    if "clip" in on:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    opt.step()
    opt.zero_grad(set_to_none="zero-grad-keep" not in on)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_backbone_is_bitwise_unchanged_while_the_rest_trains(opt_name, variant):
    model = make_net()
    model.train()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    guard = FrozenStageGuard(Step(3))  # trainable at ticks 0 and 3, frozen at 1 and 2
    step = 0
    for _ in range(2):  # build momentum / moments and leave grads behind
        _train_step(model, opt, guard, 0, step, variant)
        step += 1
    backbone_before, rest_before = tensors(model.backbone), tensors(model.head)
    for tick in (1, 2):
        for _ in range(2):
            _train_step(model, opt, guard, tick, step, variant)
            step += 1
    assert bitwise_equal(tensors(model.backbone), backbone_before), changed(
        tensors(model.backbone), backbone_before
    )
    assert changed(tensors(model.head), rest_before)
    _train_step(model, opt, guard, 3, step, variant)
    assert changed(tensors(model.backbone), backbone_before)  # unfrozen again: it moves


@pytest.mark.parametrize("approach", ["requires_grad_only", "paper_detach"])
def test_negative_control_naive_freezing_moves_weights(approach):
    # Shows that the invariant test can fail: with zero_grad(set_to_none=False), weight
    # decay and momentum move "frozen" weights unless their .grad is None.
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    for step in range(2):
        loss_fn(model, step).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    before = tensors(model.backbone)
    for step in range(2, 4):
        x, y = batch(step)
        if approach == "requires_grad_only":
            model.backbone.requires_grad_(False)
            out = model(x)
        else:
            feats = model.backbone(x).detach()
            out = model.head(model.neck(feats).mean(dim=(2, 3)))
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert changed(tensors(model.backbone), before)


def test_inside_a_frozen_region_params_have_no_grad_and_forward_builds_no_graph():
    model = make_net()
    loss_fn(model, 0).backward()  # leave gradients behind
    with FrozenStageGuard(Constant(True))(model.backbone, 0) as region:
        assert region.frozen == (True,)
        for p in model.backbone.parameters():
            assert p.requires_grad is False and p.grad is None and is_frozen(p)
        feats = model.backbone(batch(0)[0])
        assert feats.grad_fn is None and not feats.requires_grad
        loss_fn(model, 1).backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is not None for p in model.head.parameters())


def test_unfrozen_region_changes_nothing():
    model = make_net()
    before = flags(model)
    with FrozenStageGuard(Step(2))(model.backbone, 0) as region:
        assert region.frozen == (False,)
        assert flags(model) == before
        assert model.backbone(batch(0)[0]).grad_fn is not None


# --- equivalence -------------------------------------------------------------------------


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_frozen_guard_gradients_equal_a_hand_written_no_grad_backbone():
    ours, ref = make_net(), make_net()
    x, y = batch(0)
    torch.manual_seed(5)
    with FrozenStageGuard(Constant(True))(ours.backbone, 0):
        nn.functional.cross_entropy(ours(x), y).backward()
    torch.manual_seed(5)
    ref.backbone.eval()  # the guard's default policy: BN and dropout in eval
    with torch.no_grad():
        feats = ref.backbone(x)
    out = ref.head(ref.neck(feats).mean(dim=(2, 3)))
    nn.functional.cross_entropy(out, y).backward()
    ours_g, ref_g = _grads(ours), _grads(ref)
    assert ours_g.keys() == ref_g.keys() == {"neck.weight", "neck.bias", "head.weight", "head.bias"}
    assert all(torch.equal(ours_g[k], ref_g[k]) for k in ref_g)


def test_unfrozen_guard_gradients_equal_plain_training():
    ours, ref = make_net(), make_net()
    torch.manual_seed(7)
    with FrozenStageGuard(Step(2))(ours.backbone, 4):
        loss_fn(ours, 0).backward()
    torch.manual_seed(7)
    loss_fn(ref, 0).backward()
    ours_g, ref_g = _grads(ours), _grads(ref)
    assert ours_g.keys() == ref_g.keys() == {k for k, _ in ref.named_parameters()}
    assert all(torch.equal(ours_g[k], ref_g[k]) for k in ref_g)


def test_frozen_middle_stage_passes_input_gradients_but_computes_no_weight_gradients():
    ours, ref = make_net(dropout=0.0), make_net(dropout=0.0)
    middle = ours.backbone[1]
    with FrozenStageGuard(Constant(True), bn="train")(middle, 0):
        loss_fn(ours, 0).backward()
    loss_fn(ref, 0).backward()
    assert all(p.grad is None for p in middle.parameters())
    ours_g, ref_g = _grads(ours), _grads(ref)
    trainable = {k for k in ref_g if not k.startswith("backbone.1.")}
    assert ours_g.keys() == trainable
    # The stage in front of the frozen one gets exactly the gradients of full training.
    assert all(torch.equal(ours_g[k], ref_g[k]) for k in trainable)


# --- memory ------------------------------------------------------------------------------------


def test_saved_tensor_bytes_frozen_guard_vs_no_grad_reference_vs_paper_detach():
    model = make_net()
    x, y = batch(0)
    model.train()

    def head_loss(feats):
        return nn.functional.cross_entropy(model.head(model.neck(feats).mean(dim=(2, 3))), y)

    def guarded():
        with FrozenStageGuard(Constant(True))(model.backbone, 0):
            return head_loss(model.backbone(x))

    def no_grad_reference():
        with torch.no_grad():
            feats = model.backbone(x)
        return head_loss(feats)

    def paper_detach():
        return head_loss(model.backbone(x).detach())

    ours, ideal, detach = (
        saved_bytes(guarded),
        saved_bytes(no_grad_reference),
        saved_bytes(paper_detach),
    )
    assert ours <= ideal
    assert ours < detach
    assert detach > 2 * ideal  # the detached backbone graph is kept alive until backward


# --- BatchNorm and dropout policies -------------------------------------------------------------


def test_bn_eval_policy_survives_model_train_and_restores_mode():
    model = make_net()
    bn = model.backbone[0][1]
    before = tensors(model.backbone)
    with FrozenStageGuard(Constant(True))(model.backbone, 0):
        model.train()
        assert runs_in_eval(bn) and bn.training is True and model.training is True
        model.backbone(batch(0)[0])
        assert bitwise_equal(tensors(model.backbone), before)
        bn.training = True  # set by hand, as Lightning does when it restores modes
        assert runs_in_eval(bn)
    assert bn.training is True and not runs_in_eval(bn)
    assert not bn._forward_hooks and not bn._forward_pre_hooks


def test_modes_restored_by_assignment_are_honoured_after_unfreezing():
    # Lightning captures every module's .training before validation and assigns the
    # values back afterwards, without calling train(); the BN must train after unfreezing.
    model = make_net()
    model.train()
    bn = model.backbone[0][1]
    with FrozenStageGuard(Constant(True))(model.backbone, 0):
        captured = {name: m.training for name, m in model.named_modules()}
        model.eval()
        for name, m in model.named_modules():
            m.training = captured[name]
        assert runs_in_eval(bn)
    assert bn.training is True and not runs_in_eval(bn)


def test_a_forward_that_raises_leaves_the_pinned_mode_flag_intact():
    model = make_net()
    bn = model.backbone[0][1]
    with FrozenStageGuard(Constant(True))(model.backbone, 0):
        with pytest.raises(RuntimeError):
            bn(torch.randn(2, bn.num_features + 1, 3, 3))
        assert bn.training is True and runs_in_eval(bn)
    assert not runs_in_eval(bn)


def test_bn_train_policy_updates_running_stats_but_not_parameters():
    model = make_net()
    params_before = {k: v.clone() for k, v in model.backbone.named_parameters()}
    buffers_before = tensors(model.backbone)
    with FrozenStageGuard(Constant(True), bn="train")(model.backbone, 0):
        model.backbone(batch(0)[0])
    assert all(
        torch.equal(v, dict(model.backbone.named_parameters())[k]) for k, v in params_before.items()
    )
    assert "b:0.1.running_mean" in changed(tensors(model.backbone), buffers_before)


def test_mode_requested_inside_the_region_is_applied_on_exit():
    model = make_net()
    with FrozenStageGuard(Constant(True))(model.backbone, 0):
        model.eval()  # e.g. a validation pass inside the region
    assert all(not m.training for m in model.modules())


@pytest.mark.parametrize(("policy", "deterministic"), [("eval", True), ("train", False)])
def test_dropout_policy(policy, deterministic):
    model = make_net(dropout=0.5)
    model.train()
    x = batch(0)[0]
    with FrozenStageGuard(Constant(True), dropout=policy, bn="train")(model.backbone, 0):
        a, b = model.backbone(x), model.backbone(x)
    assert torch.equal(a, b) is deterministic


class FunctionalDropoutAttention(nn.Module):
    """timm / Hugging Face style: attention dropout drawn functionally, gated by the
    module's own ``training`` flag (its ``nn.Dropout`` child is never called)."""

    def __init__(self, by: str) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        if by == "child":
            self.attn_drop = nn.Dropout(0.5)
        else:
            self.dropout_prob = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        p = self.attn_drop.p if hasattr(self, "attn_drop") else self.dropout_prob
        return nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=p if self.training else 0.0
        )


def _attention(kind: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    if kind == "encoder-layer":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        return layer, layer
    if kind == "multihead":
        mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
        return mha, lambda x: mha(x, x, x)[0]
    if kind == "rrelu":  # random slopes in training mode: noise like dropout
        rrelu = nn.Sequential(nn.Linear(8, 8), nn.RReLU())
        return rrelu, rrelu
    if kind == "scripted-encoder-layer":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        scripted = torch.jit.script(layer)
        return scripted, scripted
    module = FunctionalDropoutAttention(kind)
    return module, module


@pytest.mark.parametrize(
    "kind", ["encoder-layer", "multihead", "scripted-encoder-layer", "child", "float", "rrelu"]
)
@pytest.mark.parametrize(("policy", "deterministic"), [("eval", True), ("train", False)])
def test_dropout_drawn_functionally_by_attention_follows_the_dropout_policy(
    kind, policy, deterministic
):
    torch.manual_seed(0)
    module, run = _attention(kind)
    module.train()
    flags = [m.training for m in module.modules()]
    x = torch.randn(2, 5, 8)
    with freeze(module, dropout=policy):
        a, b = run(x), run(x)
    assert torch.equal(a, b) is deterministic
    if deterministic:
        with torch.no_grad():
            torch.testing.assert_close(a, run_in_eval(module, run, x))
    assert [m.training for m in module.modules()] == flags  # nothing left changed


def run_in_eval(
    module: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    module.eval()
    try:
        return run(x)
    finally:
        module.train()


# --- trainable exceptions -------------------------------------------------------------------


def test_adapter_exception_stays_trainable_with_correct_gradients():
    ours, ref = make_net(adapter=True), make_net(adapter=True)
    guard = FrozenStageGuard(Constant(True), trainable=["*adapter*", "1.adapter", "1.adapter.up"])
    with guard(ours.backbone, 0):
        adapter = ours.backbone[1][4]
        assert all(p.requires_grad for p in adapter.parameters())
        loss_fn(ours, 0).backward()
    # Reference: hand-frozen weights, adapter trainable, BN and dropout in eval.
    for name, p in ref.backbone.named_parameters():
        p.requires_grad_(name.startswith("1.adapter."))
    for m in ref.backbone.modules():
        if isinstance(m, nn.BatchNorm2d | nn.Dropout):
            m.eval()
    loss_fn(ref, 0).backward()
    ours_g, ref_g = _grads(ours), _grads(ref)
    assert {k for k in ours_g if k.startswith("backbone.")} == {
        "backbone.1.adapter.down.weight",
        "backbone.1.adapter.down.bias",
        "backbone.1.adapter.up.weight",
        "backbone.1.adapter.up.bias",
    }
    assert ours_g.keys() == ref_g.keys()
    assert all(torch.equal(ours_g[k], ref_g[k]) for k in ref_g)


def test_module_type_and_parameter_name_exceptions():
    model = make_net()
    with FrozenStageGuard(Constant(True), trainable=[nn.BatchNorm2d, "*.bias"])(model.backbone, 0):
        trainable = {k for k, p in model.backbone.named_parameters() if p.requires_grad}
        # BN is exempt as a whole: trainable, and left in training mode.
        assert model.backbone[0][1].training
    assert trainable == {
        "0.0.bias", "0.1.weight", "0.1.bias",
        "1.0.bias", "1.1.weight", "1.1.bias",
        "2.0.bias", "2.1.weight", "2.1.bias",
    }  # fmt: skip


def test_exception_keeps_a_user_frozen_parameter_frozen():
    model = make_net(adapter=True)
    model.backbone[1][4].up.weight.requires_grad_(False)
    before = flags(model)
    with FrozenStageGuard(Constant(True), trainable=["*.adapter"])(model.backbone, 0):
        assert model.backbone[1][4].up.weight.requires_grad is False
        assert model.backbone[1][4].down.weight.requires_grad is True
    assert flags(model) == before


# --- restoration, faults, nesting ---------------------------------------------------------------


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in backward")


@pytest.mark.parametrize("where", ["forward", "backward", "body"])
def test_exceptions_leave_everything_restored(where):
    model = make_net(adapter=True)
    model.train()
    model.head.register_forward_hook(lambda m, i, o: _Boom.apply(o) if where == "backward" else o)
    if where == "forward":
        model.neck.register_forward_pre_hook(lambda m, i: 1 / 0)
    before_flags, before_tensors = flags(model), tensors(model)
    guard = FrozenStageGuard(Constant(True), trainable=["*adapter*"])
    with pytest.raises((RuntimeError, ZeroDivisionError, KeyError)), guard(model.backbone, 0):
        loss = loss_fn(model, 0)
        if where == "body":
            raise KeyError("user code failed")
        loss.backward()
    assert flags(model) == before_flags
    assert bitwise_equal(tensors(model), before_tensors)
    assert not any(is_frozen(p) for p in model.parameters())


def test_nested_overlapping_regions_freeze_the_union_and_restore_exactly():
    model = make_net()
    before = flags(model)
    guard = FrozenStageGuard(Constant(True))
    with guard(model.backbone, 0):
        with guard(model.backbone[0], 0):
            assert not any(p.requires_grad for p in model.backbone.parameters())
        assert not any(p.requires_grad for p in model.backbone.parameters())  # outer holds
        assert runs_in_eval(model.backbone[0][1])
    assert flags(model) == before


def test_overlapping_regions_exited_out_of_order_restore_exactly():
    model = make_net()
    before = flags(model)
    guard = FrozenStageGuard(Constant(True))
    outer, inner = guard(model.backbone, 0), guard(model.backbone[0], 0)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # not LIFO
    assert not any(p.requires_grad for p in model.backbone[0].parameters())
    assert all(p.requires_grad for p in model.backbone[1].parameters())
    assert runs_in_eval(model.backbone[0][1]) and not runs_in_eval(model.backbone[1][1])
    inner.__exit__(None, None, None)
    assert flags(model) == before


def test_guard_inside_a_controller_freeze():
    model = make_net()
    before = flags(model)
    ctrl = FreezeController(model, {"backbone": Constant(True)})
    ctrl.apply(0)
    with (
        FrozenStageGuard(Step(1))(model.backbone, 0),
        FrozenStageGuard(Constant(True))(model.backbone[2], 0),
    ):
        pass
    assert not any(p.requires_grad for p in model.backbone.parameters())
    ctrl.release()
    assert flags(model) == before


def test_user_frozen_parameters_stay_frozen_after_exit():
    model = make_net()
    model.backbone[0].requires_grad_(False)
    before = flags(model)
    with FrozenStageGuard(Constant(True))(model.backbone, 0):
        pass
    assert flags(model) == before


def test_region_can_only_be_entered_once():
    model = make_net()
    region = FrozenStageGuard(Constant(True))(model.backbone, 0)
    with region, pytest.raises(RuntimeError, match="already entered"), region:
        pass


def test_constructing_and_calling_a_guard_touches_nothing():
    model = make_net(adapter=True)
    before_flags, before_tensors = flags(model), tensors(model)
    guard = FrozenStageGuard(Constant(True), bn="eval", trainable=["*adapter*"])
    region = guard(model.backbone, 3)
    assert region.frozen == (True,)
    assert flags(model) == before_flags and bitwise_equal(tensors(model), before_tensors)


# --- per-stage and callable schedules ---------------------------------------------------------


def test_layerwise_schedule_freezes_each_stage_by_its_own_decision():
    model = make_net()
    stages = list(model.backbone)
    guard = FrozenStageGuard(Layerwise.progressive(3, first=1, last=5))  # freeze at 1, 3, 5
    for tick, expected in [(0, (0, 0, 0)), (1, (1, 0, 0)), (3, (1, 1, 0)), (5, (1, 1, 1))]:
        with guard(stages, tick) as region:
            assert region.frozen == tuple(map(bool, expected))
            for stage, frozen in zip(stages, expected, strict=True):
                assert all(p.requires_grad is not bool(frozen) for p in stage.parameters())
            loss_fn(model, tick).backward()
            for stage, frozen in zip(stages, expected, strict=True):
                assert all((p.grad is None) == bool(frozen) for p in stage.parameters())
        model.zero_grad()


def test_binary_schedule_applies_to_every_module_given():
    model = make_net()
    with FrozenStageGuard(Constant(True))([model.backbone[0], model.neck], 0) as region:
        assert region.frozen == (True, True)
        assert not model.neck.weight.requires_grad
        assert model.backbone[1][0].weight.requires_grad


def test_a_plain_function_is_a_schedule():
    def freezing_scheduler(epoch: int) -> bool:  # the DBF paper's Fig. 3 with rho = 5
        return epoch % 5 != 0

    guard = FrozenStageGuard(freezing_scheduler)
    assert [guard.decide(e)[0] for e in range(6)] == [Step(5)(e) for e in range(6)]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda m: FrozenStageGuard(5), TypeError, "schedule must be a freezesched Schedule"),
        (lambda m: FrozenStageGuard(Step(2), bn="frozen"), ValueError,
         "bn must be one of ['eval', 'train'], got 'frozen' (str)"),
        (lambda m: FrozenStageGuard(Step(2), dropout="off"), ValueError, "dropout must be"),
        (lambda m: FrozenStageGuard(Step(2), trainable=[3]), TypeError, "trainable[0] must be"),
        (lambda m: FrozenStageGuard(Step(2), trainable="adapter"), TypeError,
         "trainable must be a sequence"),
        (lambda m: FrozenStageGuard(Step(2), policy="eval"), TypeError,
         "policy must be a FreezePolicy, a dict or None, got 'eval' (str)"),
        (lambda m: FrozenStageGuard(Step(2), policy={"bm": "eval"}), TypeError,
         "policy has unknown fields ['bm']"),
        (lambda m: FrozenStageGuard(Step(2))("backbone", 1), ValueError,
         "is the name 'backbone', which needs a model to be looked up in"),
        (lambda m: FrozenStageGuard(Step(2), modules="backbone")(m.backbone, 1), ValueError,
         "must name a submodule of the Sequential; it has none called 'backbone'"),
        (lambda m: FrozenStageGuard(Step(2), modules="backbon")(m, 1), ValueError,
         "did you mean ['backbone"),
        (lambda m: FrozenStageGuard(Step(2))([m.backbone, 3], 1), TypeError,
         "target[1] must be a module, a dotted name, or a non-empty list of them"),
        (lambda m: FrozenStageGuard(Step(2))([m.backbone, [m.neck, m.backbone]], 1), ValueError,
         "target[0] and target[1][1] are the same module"),
        (lambda m: FrozenStageGuard(Step(2))(m.backbone, -1), ValueError,
         "tick must be an int in [0, 2**53 - 1], got -1"),
        (lambda m: FrozenStageGuard(Step(2))(m.backbone, 1.0), TypeError, "tick must be an int"),
        (lambda m: FrozenStageGuard(Layerwise.gradual_unfreeze(3))(m.backbone, 1), ValueError,
         "the schedule decides for 3 stages at tick 1, but 1 targets were given"),
        (lambda m: FrozenStageGuard(lambda t: 1)(m.backbone, 1), TypeError,
         "a schedule must return a bool or a non-empty tuple of bools"),
        (lambda m: FrozenStageGuard(lambda t: (True,))(list(m.backbone), 1), ValueError,
         "the schedule decides for 1 stages at tick 1, but 3 targets were given"),
        (lambda m: FrozenStageGuard(Constant(True), trainable=["*lora*"])(m.backbone, 0)
         .__enter__(), ValueError, "these matched nothing: ['*lora*']"),
    ],
)  # fmt: skip
def test_bad_input_raises_clearly_and_leaves_the_model_untouched(make, error, fragment):
    model = make_net()
    before_flags, before_tensors = flags(model), tensors(model)
    with pytest.raises(error) as info:
        make(model)
    assert fragment in str(info.value)
    assert flags(model) == before_flags
    assert bitwise_equal(tensors(model), before_tensors)
    assert not any(is_frozen(p) for p in model.parameters())


# --- copies taken while frozen ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_taken_while_frozen_is_an_independent_plain_module(how):
    import copy
    import io

    model = make_net()
    x = batch(0)[0]
    with FrozenStageGuard(Constant(True))(model.backbone, 0):
        if how == "deepcopy":
            twin = copy.deepcopy(model)
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            twin = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        twin.backbone[0][0].weight.mul_(3.0)
    model.eval()
    twin.eval()
    # The copy runs its own weights, not the original's ...
    assert not torch.equal(twin(x), model(x))
    # ... and its layers are not pinned: train() switches them, and returns the copy.
    bn = twin.backbone[0][1]
    assert bn.train() is bn and bn.training is True
    twin.train()
    assert all(m.training for m in twin.modules())
    assert not any(is_frozen(p) for p in twin.parameters())


def test_ema_created_while_frozen_tracks_its_own_weights():
    from torch.optim.swa_utils import AveragedModel

    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = FreezeController(model, {"backbone": Step(2)})
    ctrl.apply(1)  # frozen
    ema = AveragedModel(model)  # deep-copies the model while the backbone is frozen
    ctrl.apply(2)  # trainable: the live backbone moves, the EMA only by averaging
    for step in range(3):
        loss_fn(model, step).backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
    x = batch(9)[0]
    model.eval()
    ema.eval()
    expected = make_net()
    expected.load_state_dict(ema.module.state_dict())
    expected.eval()
    assert torch.equal(ema(x), expected(x))
    assert not torch.equal(ema(x), model(x))
    ctrl.release()


def test_ema_through_a_frozen_phase_converges_geometrically_to_the_frozen_weights():
    # Documented behaviour (docs/concepts.md, "EMA"): nothing special happens. The EMA
    # keeps averaging; a frozen part's live weights and BN statistics are constant, so
    # its EMA closes the gap by the decay factor each step: e' - w = d (e - w).
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    decay = 0.5
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ctrl = FreezeController(model, {"backbone": WarmupThenFreeze(2)})
    gaps = []
    for step in range(5):
        ctrl.apply(step)
        loss_fn(model, step).backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
        live = tensors(model.backbone)
        averaged = tensors(ema.module.backbone)
        gaps.append(
            {k: averaged[k].double() - live[k].double() for k in live if "num_batches" not in k}
        )
    for before, after in itertools.pairwise(gaps[2:]):  # steps 2..4: backbone frozen
        for k in before:
            torch.testing.assert_close(after[k], decay * before[k], rtol=1e-5, atol=1e-7)
    assert any(bool(g.abs().max() > 0) for g in gaps[-1].values())  # not trivially zero
    ctrl.release()


# --- torch.compile --------------------------------------------------------------------------


def test_inductor_compiled_training_across_switches_matches_eager_and_keeps_frozen_still():
    # The real compiler (C++ codegen on CPU): fused kernels round differently from eager,
    # so parameters agree to float tolerance; frozen steps must still be bitwise still.
    def run(compiled: bool) -> tuple[dict[str, torch.Tensor], list[bool]]:
        torch._dynamo.reset()
        model = make_net(dropout=0.0)
        forward = torch.compile(model, backend="inductor") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = FrozenStageGuard(Step(2))
        moved = []
        for tick in range(3):  # trainable, frozen, trainable
            before = tensors(model.backbone)
            for step in range(2):
                x, y = batch(10 * tick + step)
                with guard(model.backbone, tick):
                    nn.functional.cross_entropy(forward(x), y).backward()
                opt.step()
                opt.zero_grad()
            moved.append(not bitwise_equal(tensors(model.backbone), before))
        return tensors(model), moved

    (compiled, moved), (eager, _) = run(True), run(False)
    assert moved == [True, False, True]
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("face", ["guard per step", "controller per epoch"])
def test_compiled_model_compiles_once_per_freeze_state_not_per_switch(face):
    # Each freeze state needs its own graph; switching back to a state seen before must
    # reuse it. (Before the guard cached its forward wrapper per module, every frozen
    # step recompiled, until dynamo's recompile limit silently fell back to eager.)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = make_net(dropout=0.0)
    forward = torch.compile(model, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = FrozenStageGuard(Step(2))
    ctrl = FreezeController(model, {"backbone": Step(2)}) if face.startswith("controller") else None
    frames = []
    for epoch in range(6):
        if ctrl is not None:
            ctrl.apply(epoch)
        for step in range(3):
            x, y = batch(10 * epoch + step)
            if ctrl is None:
                with guard(model.backbone, epoch):
                    nn.functional.cross_entropy(forward(x), y).backward()
            else:
                nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
            opt.zero_grad()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] > frames[0]  # one graph per state ...
    assert frames[1:] == [frames[1]] * 5  # ... and none after both states were seen
    if ctrl is not None:
        ctrl.release()


def test_compiled_model_across_freeze_unfreeze_freeze_matches_eager():
    # Dynamo must notice the guard's changes (requires_grad, the forward wrapper) and not
    # reuse a stale graph (pytorch#139476). aot_eager traces like inductor, without a C++
    # compiler, which keeps the test fast.
    def run(compiled: bool) -> dict[str, torch.Tensor]:
        torch._dynamo.reset()
        model = make_net(dropout=0.0)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = FrozenStageGuard(Step(2))
        for tick in range(5):  # trainable, frozen, trainable, frozen, trainable
            for step in range(2):
                x, y = batch(10 * tick + step)
                with guard(model.backbone, tick):
                    nn.functional.cross_entropy(forward(x), y).backward()
                opt.step()
                opt.zero_grad()
        return tensors(model)

    eager, compiled = run(False), run(True)
    assert bitwise_equal(compiled, eager), changed(compiled, eager)


class AuxNet(nn.Module):
    """GoogLeNet / distilled-ViT style: the root's flag picks the output structure."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.dropout = nn.Dropout(0.5)
        self.aux = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        h = self.dropout(self.body(x))
        return (h, self.aux(h)) if self.training else h


class HeadRateNet(nn.Module):
    """timm classifier style: the root draws dropout from its own rate in its head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.drop_rate = 0.5
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(self.body(x), p=self.drop_rate, training=self.training)
        return self.fc(h)


def test_a_container_holding_its_own_dropout_rate_is_deterministic_while_frozen():
    torch.manual_seed(0)
    net = HeadRateNet().train()
    x = torch.randn(16, 4)
    with freeze(net):
        a, b = net(x), net(x)
    assert torch.equal(a, b)


def test_a_container_with_a_dropout_child_keeps_its_training_branches():
    net = AuxNet().train()
    with freeze(net, trainable=["aux"]):
        out = net(torch.randn(3, 4))
    assert isinstance(out, tuple)  # the aux output of training mode is still there
    out[1].sum().backward()
    assert net.aux.weight.grad is not None


class NumpyRateCell(nn.Module):
    def __init__(self, rate: object) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.attn_drop_rate = rate  # e.g. np.linspace(0, p, depth)[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        p = float(self.attn_drop_rate) if self.training else 0.0  # type: ignore[arg-type]
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)


class ScriptedRateCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn_drop = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.proj(x), self.attn_drop, self.training)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NumpyRateCell(np.float64(0.5)),
        lambda: NumpyRateCell(np.float32(0.5)),
        lambda: torch.jit.script(ScriptedRateCell()),
        lambda: torch.jit.script(
            nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8, num_layers=2, dropout=0.5))
        ),
    ],
    ids=["numpy-float64", "numpy-float32", "scripted-float-rate", "scripted-lstm"],
)
def test_functional_dropout_is_recognised_with_numpy_rates_and_in_torchscript(make):
    torch.manual_seed(0)
    module = make().train()
    x = torch.randn(2, 5, 8)

    def run() -> torch.Tensor:
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    with freeze(module):
        a, b = run(), run()
    assert torch.equal(a, b)


def test_an_exempt_dropout_child_keeps_its_attention_noise():
    torch.manual_seed(0)
    module = FunctionalDropoutAttention("child").train()
    x = torch.randn(2, 5, 8)
    with freeze(module, trainable=["attn_drop"]):  # dropout stays a training behaviour
        a, b = module(x), module(x)
    assert not torch.equal(a, b)


class BufferedAttention(FunctionalDropoutAttention):
    """Swin style: an index buffer beside functional attention dropout."""

    def __init__(self) -> None:
        super().__init__("float")
        self.register_buffer("index", torch.arange(5))


@pytest.mark.parametrize(("policy", "deterministic"), [("eval", True), ("train", False)])
def test_a_buffer_owner_drawing_dropout_follows_the_dropout_policy(policy, deterministic):
    torch.manual_seed(0)
    module = BufferedAttention().train()
    x = torch.randn(2, 5, 8)
    with freeze(module, dropout=policy):
        a, b = module(x), module(x)
    assert torch.equal(a, b) is deterministic
    assert torch.equal(module.index, torch.arange(5))
