"""FLOP counting: exact counts worked out by hand, torch's errors corrected, phases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import make_net
from torch import nn

from freezesched import Constant, Cosine, FrozenStageGuard, Layerwise, Step, WarmupThenFreeze
from freezesched.profiling import (
    FlopCount,
    FlopProfiler,
    UncountedOpsWarning,
    count_flops,
    measure_state_cost,
    project,
    project_policies,
)

# --- exact counts for small nets ----------------------------------------------------------


def test_linear_forward_and_backward_exact():
    layer = nn.Linear(8, 4)
    x = torch.randn(16, 8, requires_grad=True)
    c = count_flops(lambda: layer(x).sum().backward()).total
    # forward: addmm 2*16*8*4 = 1024 (bias additions are not counted)
    # backward: grad_x = g @ W (2*16*4*8) and grad_W = g^T @ x (2*4*16*8), both mm
    assert c == FlopCount(forward=1024, backward_unsplit=2048)
    assert c.macs == 1536


def test_linear_without_input_grad_only_computes_the_weight_gradient():
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8)  # an input that needs no gradient: one mm in backward
    assert count_flops(lambda: layer(x).sum().backward()).total == FlopCount(1024, 0, 0, 1024)


def test_conv_exact_with_input_and_weight_gradients_split():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    c = count_flops(lambda: conv(x).sum().backward()).total
    forward = 2 * (2 * 10 * 10) * 8 * 3 * 9  # 2 * output positions * c_out * c_in * k*k
    assert forward == 86400
    assert c == FlopCount(forward=forward, input_grad=forward, weight_grad=forward)


def test_first_conv_needs_no_input_gradient():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 10, 10)
    assert count_flops(lambda: conv(x).sum().backward()).total == FlopCount(86400, 0, 86400)


@pytest.mark.parametrize("groups", [1, 4, 64])
def test_grouped_and_depthwise_conv_backward_is_twice_the_forward(groups):
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    c = count_flops(lambda: conv(x).sum().backward()).total
    forward = 2 * (2 * 8 * 8) * 64 * (64 // groups) * 9
    assert c.forward == forward
    assert (c.input_grad, c.weight_grad) == (forward, forward)
    assert c.backward == 2 * forward  # torch's own formula says (1 + groups) * forward


def test_torch_alone_overcounts_depthwise_backward():
    # The bug we correct, pinned so that we notice when torch fixes it.
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        y = conv(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    assert bwd.get_total_flops() == 65 * fwd.get_total_flops()


def test_cpu_attention_is_counted_exactly():
    b, h, lq, lk, e = 2, 4, 16, 12, 8
    q = torch.randn(b, h, lq, e, requires_grad=True)
    k = torch.randn(b, h, lk, e, requires_grad=True)
    v = torch.randn(b, h, lk, e, requires_grad=True)

    def step():
        nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    c = count_flops(step).total
    # forward: Q K^T and P V, each 2 * b*h*lq*lk*e
    assert c.forward == 2 * (2 * b * h * lq * lk * e) == 49152
    # backward of the flash kernel (the CPU one too): it keeps only the log-sum-exp, so it
    # recomputes S = Q K^T, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q
    assert c.input_grad == 5 * (2 * b * h * lq * lk * e) == 122880
    assert c.weight_grad == c.backward_unsplit == 0


def test_uncounted_ops_that_matter_warn_instead_of_counting_zero_silently():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with pytest.warns(UncountedOpsWarning, match=r"upsample_bilinear2d"):
        result = count_flops(
            lambda: nn.functional.interpolate(x, scale_factor=2, mode="bilinear").sum().backward()
        )
    assert any("upsample_bilinear2d" in op for op in result.uncounted)


def test_ops_without_cost_do_not_warn():
    x = torch.randn(4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count_flops(lambda: torch.relu(x * 2).sum().backward())


# --- per module, frozen parts, exceptions ----------------------------------------------------


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),  # "0"
        nn.Conv2d(4, 4, 3, padding=1, bias=False),  # "1"
        nn.Conv2d(4, 2, 1, bias=False),  # "2"
    )


F0, F1, F2 = (2 * 36 * 4 * 3 * 9, 2 * 36 * 4 * 4 * 9, 2 * 36 * 2 * 4 * 1)  # batch 1, 6x6


def _count(model, frozen: list[str], **guard_kwargs):
    x = torch.randn(1, 3, 6, 6)
    guard = FrozenStageGuard(Constant(True), **guard_kwargs)
    modules = [model.get_submodule(n) for n in frozen]
    with guard(modules, 0) if modules else FrozenStageGuard(Step(1))(model, 0):
        return count_flops(lambda: model(x).sum().backward(), model)


def test_per_module_counts_full_training():
    result = _count(_conv_net(), [])
    assert result.modules["0"] == FlopCount(F0, 0, F0)  # stem: no input gradient
    assert result.modules["1"] == FlopCount(F1, F1, F1)
    assert result.modules["2"] == FlopCount(F2, F2, F2)
    assert result.modules[""] == result.total
    assert result.total.backward == 2 * (F0 + F1 + F2) - F0


def test_modules_without_counted_ops_are_listed_with_zero():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    result = count_flops(lambda: model(torch.randn(1, 3, 5, 5)).sum().backward(), model)
    assert result.modules["1"] == result.modules["2"] == FlopCount()
    assert result.forward_of(["0", "1"]) == result.modules["0"].forward > 0
    with pytest.raises(KeyError, match=r"no FLOPs were recorded for modules \['9'\]"):
        result.forward_of(["9"])


def test_frozen_prefix_costs_forward_only():
    result = _count(_conv_net(), ["0", "1"])
    assert result.modules["0"] == FlopCount(forward=F0)
    assert result.modules["1"] == FlopCount(forward=F1)
    assert result.modules["2"] == FlopCount(F2, 0, F2)  # its input needs no gradient now
    assert result.total == FlopCount(F0 + F1 + F2, 0, F2)


def test_frozen_middle_stage_costs_input_gradient_only():
    result = _count(_conv_net(), ["1"])
    assert result.modules["0"] == FlopCount(F0, 0, F0)
    assert result.modules["1"] == FlopCount(F1, F1, 0)  # gradient flows through, no weights
    assert result.modules["2"] == FlopCount(F2, F2, F2)


def test_trainable_exception_inside_a_frozen_module_is_counted():
    model = nn.Sequential(_conv_net(), nn.Conv2d(2, 2, 1, bias=False))
    adapter = 2 * 36 * 2 * 2
    result = _count(model, ["0"], trainable=["2"])  # the 1x1 conv "0.2" stays trainable
    assert result.modules["0.0"] == FlopCount(forward=F0)
    assert result.modules["0.1"] == FlopCount(forward=F1)
    assert result.modules["0.2"] == FlopCount(F2, 0, F2)  # weight gradient of the exception
    assert result.modules["1"] == FlopCount(adapter, adapter, adapter)
    assert result.forward_of(["0", "0.1"]) == F0 + F1 + F2


# --- a real architecture: ResNet-50 on the meta device -----------------------------------------


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


def resnet50() -> nn.Module:
    layers, cin = [], 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        stage = []
        for i in range(blocks):
            stage.append(_Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
        layers.append(nn.Sequential(*stage))
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1), *layers,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000),
    )  # fmt: skip


def test_resnet50_full_step_backward_is_1_971_times_forward():
    cost = measure_state_cost(resnet50(), (1, 3, 224, 224), ["0"], (False,))
    forward = cost.flops.forward
    assert forward == 2 * 4_089_184_256  # the published ResNet-50 count, 4.089 GMACs
    stem = 2 * 112 * 112 * 64 * 3 * 49
    assert cost.flops.backward == 2 * forward - stem
    assert round(cost.flops.backward / forward, 3) == 1.971


# --- projection arithmetic equals the closed form -----------------------------------------------


@pytest.fixture(scope="module")
def costs():
    net = make_net()
    return {
        s: measure_state_cost(net, (2, 3, 16, 16), ["backbone"], s) for s in [(False,), (True,)]
    }


@pytest.mark.parametrize(
    ("schedule", "frozen_epochs"),
    [
        (Step(1), 0),
        (Step(2), 75),
        (Step(5), 120),
        (Step(10), 135),
        (Step(math.inf), 150),
        (WarmupThenFreeze(30, then=Step(5)), 96),
        (Cosine(begin=0, end=150), 75),
    ],
)
def test_projection_equals_closed_form(costs, schedule, frozen_epochs):
    epochs, n = 150, 1000
    row = project(costs, schedule, epochs=epochs, samples_per_epoch=n, num_modules=1)
    full, frozen = costs[(False,)], costs[(True,)]
    assert row.frozen_ticks == frozen_epochs
    expected_paper = n * (
        (epochs - frozen_epochs) * full.flops_2x + frozen_epochs * frozen.flops_2x
    )
    assert row.flops_2x == expected_paper
    # Paper convention: each frozen epoch saves 2 x the backbone's forward per sample.
    assert row.delta_flops_2x == -frozen_epochs * n * 2 * frozen.frozen_forward
    saving = full.measured - frozen.measured
    assert row.delta_flops_measured == -frozen_epochs * n * saving


def test_layerwise_projection_equals_closed_form():
    net = make_net()
    names = ["backbone.0", "backbone.1", "backbone.2"]
    schedule = Layerwise.progressive(3, first=10, last=30)  # stage i frozen from 10, 20, 30
    rows = project_policies(net, (2, 3, 16, 16), names, {"prog": schedule}, epochs=40,
                            samples_per_epoch=10)  # fmt: skip
    cost = {
        s: measure_state_cost(net, (2, 3, 16, 16), names, s)
        for s in [(False,) * 3, (True, False, False), (True, True, False), (True,) * 3]
    }
    expected = 10 * sum(10 * cost[s].flops_2x for s in cost)  # 10 epochs in each state
    assert rows[0].flops_2x == expected
    assert rows[0].frozen_ticks == pytest.approx((10 * 1 + 10 * 2 + 10 * 3) / 3)


def test_projection_of_1600_epochs_is_arithmetic_only(costs):
    row = project(costs, WarmupThenFreeze(400, then=Step(10)), epochs=1600,
                  samples_per_epoch=11725, num_modules=1)  # fmt: skip
    assert row.frozen_ticks == 1080


def test_projection_needs_every_visited_state(costs):
    with pytest.raises(KeyError, match=r"no per-sample cost for freeze states \[\(True, True\)\]"):
        project({(False, False): costs[(False,)]}, Step(math.inf), epochs=3,
                samples_per_epoch=1, num_modules=2)  # fmt: skip


def test_measuring_leaves_the_model_untouched():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    measure_state_cost(net, (2, 3, 16, 16), ["backbone"], (True,), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.device.type == "cpu" and p.grad is None for p in net.parameters())


def test_profiler_result_only_after_exit_and_type_checks():
    prof = FlopProfiler()
    with pytest.raises(RuntimeError, match=r"after the with-block exits"):
        _ = prof.result
    with pytest.raises(TypeError, match=r"model must be an nn\.Module or None, got 'net' \(str\)"):
        FlopProfiler("net")


def test_a_custom_op_named_like_a_negligible_one_is_reported_uncounted():
    # The negligible list names torch's own ops; "myops::norm" doing a matmul is not one.
    for name in ("norm", "heavy"):

        @torch.library.custom_op(f"freezesched_test::{name}", mutates_args=())
        def op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x @ w

        @op.register_fake
        def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x.new_empty(x.shape[0], w.shape[1])

        x, w = torch.randn(8, 8), torch.randn(8, 8)
        with pytest.warns(UncountedOpsWarning, match=f"freezesched_test.{name}"):
            result = count_flops(lambda op=op, x=x, w=w: op(x, w))
        assert dict(result.uncounted) == {f"freezesched_test.{name}": 1}


def test_in_place_matmuls_count_like_their_functional_forms():
    # mmcv's DeformConv2d accumulates with addmm_; it was reported uncounted.
    a, b, c = torch.randn(8, 6), torch.randn(6, 4), torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncountedOpsWarning)
        inplace = count_flops(lambda: c.clone().addmm_(a, b)).total.total
    assert inplace == count_flops(lambda: torch.addmm(c, a, b)).total.total == 2 * 8 * 6 * 4
