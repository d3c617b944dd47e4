"""The profiler is exact where the paper's numbers come from: under wrappers, per module,
for ops torch's counter does not know, on the meta device, and for compiled models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import batch, make_net
from test_profiling_flops import resnet50
from torch import nn

from freezesched import FrozenStageGuard, Step, freeze
from freezesched.__main__ import main
from freezesched.profiling import (
    OUTSIDE,
    FlopAccountant,
    FlopCount,
    FlopProfiler,
    UncountedOpsWarning,
    count_flops,
    measure_state_cost,
)

# --- 1. wrappers ------------------------------------------------------------------------------


class Outer(nn.Module):
    """A user's wrapper: its forward calls the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 2


def _frozen_step(call, model) -> tuple[FlopCount, int]:
    x, y = batch(0)
    with freeze(model.backbone), FlopProfiler(model) as prof:
        F.cross_entropy(call(x), y).backward()
    return prof.result.total, prof.result.forward_of(["backbone"])


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "data-parallel", "outer", "compiled"])
def test_wrappers_do_not_change_what_is_attributed_to_the_frozen_part(wrapper, request):
    model = make_net(dropout=0.0)
    expected_total, expected_frozen = _frozen_step(model, model)
    assert expected_frozen > 0
    if wrapper == "ddp":
        request.getfixturevalue("group")
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    elif wrapper == "data-parallel":
        wrapped = nn.DataParallel(model)
    elif wrapper == "outer":
        wrapped = Outer(model)
    else:
        torch._dynamo.reset()
        wrapped = torch.compile(model, backend="aot_eager")
    total, frozen = _frozen_step(wrapped, model)
    assert frozen == expected_frozen  # was 0 under every wrapper: the 2x ΔF came out 0
    assert total.forward == expected_total.forward


def test_the_accountant_under_a_wrapper_gives_the_unwrapped_savings():
    model = make_net(dropout=0.0)
    runs = []
    for call in (model, Outer(model)):
        acct = FlopAccountant(model, samples_per_state=1)
        for tick in range(2):
            x, y = batch(tick)
            region = FrozenStageGuard(Step(2))(model.backbone, tick)
            with region, acct.step(region, batch_size=4):
                F.cross_entropy(call(x), y).backward()
        runs.append(acct.totals())
    assert runs[0].delta_flops_2x == runs[1].delta_flops_2x < 0


# --- 2. backward attribution --------------------------------------------------------------------


def test_per_module_counts_add_up_exactly_and_residual_branches_get_only_their_own():
    model = resnet50()
    x = torch.empty(1, 3, 224, 224, device="meta")
    step = count_flops(lambda: model.to("meta")(x).sum().backward(), model)
    total = step.total
    own = step.exclusive
    summed = sum(own.values(), FlopCount())
    assert summed == total  # forward and backward, kind by kind
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    # Every convolution's backward is exactly its weight gradient plus (except for the
    # stem, whose input is the image) its input gradient: each equal to its forward.
    for name in convs:
        counted = step.modules[name]
        expected = counted.forward * (1 if name == "0" else 2)
        assert counted.backward == expected, name
    conv_backward = sum(step.modules[n].backward for n in convs)
    conv_forward = sum(step.modules[n].forward for n in convs)
    assert conv_backward == 2 * conv_forward - step.modules["0"].forward
    # With the classifier's 8.19 MFLOPs, the step's whole backward: per-module sums used to
    # come to 20.07 GFLOPs, residual downsample branches being charged their siblings' work.
    assert round(total.backward / 1e9, 2) == 16.12
    assert total.backward == conv_backward + step.modules["10"].backward  # + the classifier
    assert OUTSIDE not in own or own[OUTSIDE].forward == 0


# --- 3. no silent zeros ---------------------------------------------------------------------------


def test_mv_dot_addmv_are_counted_forward_and_backward():
    w = torch.randn(6, 5, requires_grad=True)
    v = torch.randn(5, requires_grad=True)
    c = count_flops(lambda: (w @ v).sum().backward()).total
    # forward 2mn; backward: input gradient (an mv, 2mn) and weight gradient (an outer
    # product, mn multiplies)
    assert c == FlopCount(forward=60, input_grad=60, weight_grad=30)
    a, b = torch.randn(7, requires_grad=True), torch.randn(7, requires_grad=True)
    assert count_flops(lambda: torch.dot(a, b).backward()).total == FlopCount(14, 0, 0, 14)
    bias = torch.randn(6)
    c = count_flops(lambda: torch.addmv(bias, w, v).sum().backward()).total
    assert c == FlopCount(forward=60, input_grad=60, weight_grad=30)


def test_cdist_and_bilinear_are_counted():
    x1 = torch.randn(2, 30, 8, requires_grad=True)
    x2 = torch.randn(2, 40, 8, requires_grad=True)
    c = count_flops(lambda: torch.cdist(x1, x2).sum().backward()).total
    per_call = 2 * 2 * 30 * 40 * 8  # one multiply-add per (pair of points, coordinate)
    assert c.forward == per_call and c.backward == 2 * per_call
    bilinear = nn.Bilinear(3, 4, 5, bias=False)
    a, b = torch.randn(6, 3, requires_grad=True), torch.randn(6, 4)
    c = count_flops(lambda: bilinear(a, b).sum().backward()).total
    assert c.forward == 2 * 6 * 5 * 3 * 4
    assert c.backward == 2 * c.forward  # the input's and the weight's gradients


class _Upsampler(nn.Module):
    """A decoder in miniature: bilinear upsampling (no FLOP formula) between convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.interpolate(self.a(x), scale_factor=2.0, mode="bilinear"))


def test_every_uncounted_op_is_reported_by_name_and_count():
    model = _Upsampler()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(
        UncountedOpsWarning, match=r"upsample_bilinear2d x1.*upsample_bilinear2d_backward x1"
    ):
        step = count_flops(lambda: model(x).sum().backward(), model)
    assert step.uncounted == {
        "aten.upsample_bilinear2d": 1,
        "aten.upsample_bilinear2d_backward": 1,
    }
    with pytest.warns(UncountedOpsWarning, match=r"aten.\w*fft\w* x1"):
        count_flops(
            lambda: torch.fft.rfft(torch.randn(16, requires_grad=True)).abs().sum().backward()
        )


def test_ops_negligible_by_convention_are_not_reported():
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncountedOpsWarning)
        step = count_flops(lambda: F.cross_entropy(net(batch(0)[0]), batch(0)[1]).backward(), net)
    assert step.uncounted == {}


def test_an_fpn_and_a_detector_loss_count_without_noise():
    # What every FPN detector runs: nearest-neighbour upsampling (a gather: 0 FLOPs),
    # new_full for targets, a BCE loss, and profiler markers. Nothing is uncounted, and
    # the convolutions are counted in full.
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)

    def step() -> None:
        with torch.autograd.profiler.record_function("head"):
            up = F.interpolate(conv(x), scale_factor=2.0, mode="nearest")
            target = up.new_full(up.shape, 0.5)
            F.binary_cross_entropy_with_logits(up, target).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("error", UncountedOpsWarning)
        counted = count_flops(step, conv)
    assert counted.uncounted == {}
    assert counted.total.forward == 2 * 2 * 4 * 8 * 8 * 3 * 3 * 3  # 2 x MACs of the conv


def test_the_accountant_warns_once_not_on_every_counted_step():
    model = _Upsampler()
    acct = FlopAccountant(model, samples_per_state=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            with acct.step(batch_size=1):
                model(torch.randn(1, 3, 8, 8)).sum().backward()
    assert len([w for w in caught if w.category is UncountedOpsWarning]) == 1
    assert acct.totals().uncounted == {
        "aten.upsample_bilinear2d": 3,
        "aten.upsample_bilinear2d_backward": 3,
    }  # from the 3 counted steps, in the record


# --- 4. the meta device counts what the CPU runs ------------------------------------------------


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))


@pytest.mark.parametrize("module", ["sdpa", "multi-head"])
def test_attention_counts_the_same_on_meta_and_cpu(module):
    torch.manual_seed(0)
    model = _Attention() if module == "sdpa" else nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    shape = (2, 10, 16)
    cpu = measure_state_cost(model, shape, ["" if module == "sdpa" else "linear1"], (False,),
                             device="cpu")  # fmt: skip
    meta = measure_state_cost(model, shape, ["" if module == "sdpa" else "linear1"], (False,))
    assert meta.flops == cpu.flops
    if module == "sdpa":
        # the fused kernel's backward recomputes QK^T: 5 products against 2 forward
        # Per sample: products of 2*heads*10*10*8 FLOPs; the fused kernel's backward
        # recomputes QK^T, so 5 of them, all input gradients.
        product = 2 * 2 * 10 * 10 * 8
        assert cpu.flops.input_grad == 5 * product


def test_attention_on_plain_meta_tensors_says_what_it_counted():
    q = torch.empty(2, 2, 10, 8, device="meta", requires_grad=True)
    step = count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert len(step.notes) == 1 and "math fallback" in step.notes[0]


# --- 8. a per-module table that adds up, and compiled models ------------------------------------


def test_the_cli_per_module_table_adds_up_to_the_total(capsys):
    argv = ["flops", "--model", "helpers:make_net", "--input-shape", "2,3,16,16",
            "--freeze", "backbone.0", "--format", "json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    total = rows[-1]
    assert total["module"] == "total"
    for key in ("forward", "input_grad", "weight_grad", "backward_unsplit", "total"):
        assert sum(r[key] for r in rows[:-1]) == total[key]
    frozen = next(r for r in rows if r["module"] == "backbone.0.0")
    assert frozen["weight_grad"] == 0 and frozen["input_grad"] == 0  # a frozen prefix
    assert main([*argv[:-2], "--depth", "1"]) == 0
    assert "backbone " in capsys.readouterr().out


def test_a_compiled_graph_runs_exactly_the_counted_flops():
    """Count the FLOPs of the forward and backward graphs AOT autograd hands the compiler,
    and compare with counting the eager step: the compiled graph runs the same products."""
    from torch._dynamo.backends.common import aot_autograd

    from freezesched.profiling._flops import _Counter

    model = make_net(dropout=0.0)
    x, y = batch(0)
    with freeze(model.backbone):
        eager = count_flops(lambda: F.cross_entropy(model(x), y).backward(), model).total
    counted: list[FlopCount] = []

    def counting(gm, example_inputs):
        def run(*args):
            counter = _Counter({}, named=True)
            with counter:
                out = gm(*args)
            kinds: dict[str, int] = {}
            for stack_kinds in counter.counts.values():
                for k, v in stack_kinds.items():
                    kinds[k] = kinds.get(k, 0) + v
            counted.append(FlopCount(**kinds))
            return out

        return run

    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend=aot_autograd(fw_compiler=counting, bw_compiler=counting)
    )
    with freeze(model.backbone):
        F.cross_entropy(compiled(x), y).backward()
    forward_graph, backward_graph = counted
    assert forward_graph == FlopCount(forward=eager.forward)
    assert backward_graph.forward == 0 and backward_graph.backward == eager.backward
