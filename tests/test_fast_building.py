"""Fast frozen mode: what building and checking a twin must not get wrong.

A twin is a traced copy: it cannot write the module's attributes, torch.fx does not record
autocast regions, and the building and checking calls run the forward twice. Each test
here is a case where that used to be silently wrong or crashed.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import warnings

import pytest
import torch
from torch import nn

from freezesched import FreezePolicy, freeze
from freezesched.freezing import FastFrozen, FastModeWarning, _twin, drop_fast, fast_report

FAST = FreezePolicy(fast=FastFrozen())


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    block = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
    with torch.no_grad():
        block[1].running_mean.uniform_(-0.5, 0.5)
        block[1].running_var.uniform_(0.5, 2.0)
    return block


def messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FastModeWarning)]


# --- f04: a forward that sets attributes on the module -----------------------------------------


class Tapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.body = conv_bn(4, 4)
        self.stem_features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        self.stem_features = s  # tapped by an auxiliary head
        return self.body(s)


def test_a_forward_that_sets_an_attribute_runs_plainly_and_the_attribute_stays_current():
    torch.manual_seed(0)
    net = Tapped()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with freeze(net):
        expected = []
        for x in batches:
            net(x)
            assert net.stem_features is not None
            expected.append(net.stem_features.clone())
    with freeze(net, policy=FAST), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, want in zip(batches, expected, strict=True):
            net(x)
            assert net.stem_features is not None
            assert torch.equal(net.stem_features, want)  # each batch's own features
    assert any("stem_features" in m for m in messages(caught))
    report = fast_report(net)
    assert report is not None and report.fast_calls == 0
    drop_fast(net)


class WritesInside(nn.Module):
    """A forward that writes inside what it holds: identity and length stay the same."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.body = conv_bn(3, 4)
        self.feats: dict[str, torch.Tensor | None] = {"body": None}  # an existing key
        self.slot: list[torch.Tensor | None] = [None]  # a preallocated slot
        self.meter = types.SimpleNamespace(calls=0, last=None)  # a plain object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.how == "dict":
            self.feats["body"] = h
        elif self.how == "list":
            self.slot[0] = h
        else:
            self.meter.calls += 1
        return h.relu()


@pytest.mark.parametrize(
    ("how", "attribute"), [("dict", "feats"), ("list", "slot"), ("object", "meter")]
)
def test_a_forward_writing_inside_a_held_dict_list_or_object_runs_plainly(how: str, attribute: str):
    torch.manual_seed(0)
    net = WritesInside(how)
    with freeze(net, policy=FAST), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            out = net(torch.full((1, 3, 4, 4), float(i)))
            if how == "dict":
                assert torch.equal(net.feats["body"].relu(), out)  # type: ignore[union-attr]
            elif how == "list":
                assert torch.equal(net.slot[0].relu(), out)  # type: ignore[union-attr]
    if how == "object":
        assert net.meter.calls == 3
    assert any(repr(attribute) in m and "plainly" in m for m in messages(caught))
    report = fast_report(net)
    assert report is not None and report.fast_calls == 0
    drop_fast(net)


def test_the_feature_cache_refuses_a_forward_that_writes_an_attribute():
    from freezesched.freezing import FeatureCache, sample_keys

    torch.manual_seed(0)
    net = Tapped()
    data = torch.randn(4, 3, 8, 8)
    policy = FreezePolicy(fast=FastFrozen(cache=FeatureCache()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        with freeze(net, policy=policy):
            for _ in range(2):  # the first call builds (and sees the write); hits follow
                with sample_keys([0, 1, 2, 3]), pytest.raises(ValueError, match="stem_features"):
                    net(data)
    report = fast_report(net)
    assert report is not None and report.cache_hits == 0
    drop_fast(net)


# --- f10: autocast regions inside the forward --------------------------------------------------


class Precise(nn.Module):
    """Keeps a cancellation-prone difference in float32 under the caller's autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(3, 4)
        self.diff = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.diff.weight.copy_(torch.tensor([[1.0, -1.0, 0, 0], [0, 0, 1.0, -1.0]]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.block(x)
        with torch.autocast("cpu", enabled=False):
            d = self.diff(y.float())
        return h, d


def test_an_autocast_region_in_the_forward_keeps_its_precision_in_the_twin():
    torch.manual_seed(0)
    net = Precise()
    x = torch.randn(2, 3, 8, 8)
    benign, shifted = torch.randn(8, 4), torch.randn(8, 4) + 300.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with freeze(net):
            plain = net(x, shifted)[1]
        with freeze(net, policy=FAST), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net(x, benign)  # builds and checks on a batch where the precision does not show
            fast = net(x, shifted)[1]
    assert torch.equal(fast, plain)  # the float32 region ran in float32
    assert any("autocast" in m for m in messages(caught))
    report = fast_report(net)
    assert report is not None and report.fast_calls == 1
    assert any("autocast" in reason for _, reason in report.untraced)
    drop_fast(net)


class PreciseChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.diff = nn.Linear(4, 2, bias=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.diff(y.float())


def test_an_autocast_region_in_a_submodule_keeps_only_that_submodule_untraced():
    torch.manual_seed(0)
    net = nn.Sequential(conv_bn(3, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), PreciseChild())
    x = torch.randn(2, 3, 8, 8)
    enter = torch.amp.autocast_mode.autocast.__dict__["__enter__"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        with freeze(net, policy=FAST):
            net(x)
    report = fast_report(net)
    assert report is not None
    assert report.folded == ("0.0 + 0.1",)  # the rest of the module is still folded
    assert [name for name, _ in report.untraced] == ["3"]
    assert torch.amp.autocast_mode.autocast.__dict__["__enter__"] is enter  # restored
    drop_fast(net)


# --- f07: a twin first built under inference mode ----------------------------------------------


def test_a_twin_built_under_inference_mode_passes_gradients_back_later():
    torch.manual_seed(0)
    pre = nn.Conv2d(3, 3, 1)  # trains, before the frozen stage
    mid = nn.Sequential(conv_bn(3, 4), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for policy in (FreezePolicy(), FAST):
        pre.zero_grad(set_to_none=True)
        with freeze(mid, policy=policy):
            with torch.inference_mode():
                mid(x)
                mid(x)  # builds the twin, then runs it
            mid(pre(x)).square().sum().backward()  # the same twin, with autograd
        assert pre.weight.grad is not None
        grads.append(pre.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)
    report = fast_report(mid)
    assert report is not None and report.fast_calls == 2 and report.builds == 1
    drop_fast(mid)


# --- f09: grouped ConvTranspose -> BatchNorm ---------------------------------------------------


@pytest.mark.parametrize(("groups", "cout"), [(2, 4), (8, 8)])
def test_a_grouped_conv_transpose_is_left_unfolded_and_the_rest_still_folds(groups, cout):
    torch.manual_seed(0)
    up = nn.Sequential(
        nn.ConvTranspose2d(8, cout, 2, stride=2, groups=groups), nn.BatchNorm2d(cout)
    )
    net = nn.Sequential(conv_bn(3, 8), nn.ReLU(), up)
    x = torch.randn(2, 3, 8, 8)
    with freeze(net):
        plain = net(x)
    with freeze(net, policy=FAST), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(x)
        fast = net(x)
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)
    report = fast_report(net)
    assert report is not None and report.fast_calls == 1
    assert report.folded == ("0.0 + 0.1",)
    assert report.not_folded == (("2.1", "it follows a grouped ConvTranspose (groups > 1)"),)
    assert not any("could not be built" in m or "failed" in m for m in messages(caught))
    drop_fast(net)


def test_a_pair_whose_fold_fails_is_left_unfolded_and_reported(monkeypatch):
    real = _twin._fused

    def fused(layer: nn.Module, norm: nn.Module) -> nn.Module:
        if layer.out_channels == 6:
            raise RuntimeError("simulated")
        return real(layer, norm)

    monkeypatch.setattr(_twin, "_fused", fused)
    torch.manual_seed(0)
    net = nn.Sequential(conv_bn(3, 4), nn.ReLU(), conv_bn(4, 6))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        with freeze(net, policy=FAST):
            net(x)
            net(x)
    report = fast_report(net)
    assert report is not None and report.fast_calls == 1
    assert report.folded == ("0.0 + 0.1",)
    assert report.not_folded == (("2.1", "folding it failed (RuntimeError: simulated)"),)
    drop_fast(net)


# --- f06: a forward that writes its input in place ---------------------------------------------


class Normalising(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.block = conv_bn(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.sub_(self.mean))  # in place, on the caller's tensor


@pytest.mark.parametrize("verify_every", [0, 2])
def test_a_forward_writing_its_input_in_place_is_checked_on_the_unwritten_input(verify_every):
    torch.manual_seed(0)
    net = Normalising()
    inputs = [torch.rand(2, 3, 8, 8) for _ in range(3)]
    plain_x = [x.clone() for x in inputs]
    with freeze(net):
        plain = [net(x) for x in plain_x]
    fast_x = [x.clone() for x in inputs]
    policy = FreezePolicy(fast=FastFrozen(verify_every=verify_every))
    with freeze(net, policy=policy), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = [net(x) for x in fast_x]  # build, fast, (periodic check at the third call)
    assert messages(caught) == []
    for p, f, px, fx in zip(plain, fast, plain_x, fast_x, strict=True):
        assert torch.allclose(f, p, rtol=1e-4, atol=1e-6)
        assert torch.equal(fx, px)  # the caller's tensor written exactly once
    report = fast_report(net)
    assert report is not None and report.fast_calls == (2 if verify_every == 0 else 1)
    drop_fast(net)


def test_a_forward_writing_its_input_runs_plainly_when_the_twin_copies_the_input():
    torch.manual_seed(0)
    net = Normalising()
    x = torch.rand(2, 3, 8, 8)
    xa, xb = x.clone(), x.clone()
    with freeze(net):
        net(xa)
        net(xa)
    policy = FreezePolicy(fast=FastFrozen(channels_last=True))
    with freeze(net, policy=policy), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(xb)
        net(xb)
    assert torch.equal(xa, xb)
    assert any("writes its input in place" in m for m in messages(caught))
    report = fast_report(net)
    assert report is not None and report.fast_calls == 0
    drop_fast(net)


# --- f11: outputs fast mode cannot compare -----------------------------------------------------


@dataclasses.dataclass
class Out:
    features: torch.Tensor
    logits: torch.Tensor


class Opaque:
    def __init__(self, features: torch.Tensor) -> None:
        self.features = features


class Returning(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.block = conv_bn(3, 4)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Out | Opaque:
        f = self.block(x)
        return Out(f, f.mean((2, 3))) if self.kind == "Out" else Opaque(f)


@pytest.mark.parametrize("kind", ["Out", "Opaque"])
def test_an_output_fast_mode_cannot_compare_runs_plainly_with_a_warning(kind):
    torch.manual_seed(0)
    net = Returning(kind)
    x = torch.randn(2, 3, 8, 8)
    with freeze(net):
        plain = net(x).features
    with freeze(net, policy=FAST), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [net(x).features for _ in range(2)]
    assert all(torch.equal(o, plain) for o in outs)
    assert any(f"its output type {kind} is not" in m for m in messages(caught))
    report = fast_report(net)
    assert report is not None and report.fast_calls == 0
    drop_fast(net)


# --- f12: torch.fx tracing patches torch process-wide ------------------------------------------


class WaitsWhileTraced(nn.Module):
    """While torch.fx traces it, it signals ``tracing`` and waits for ``until``."""

    def __init__(self, tracing: threading.Event, until: threading.Event) -> None:
        super().__init__()
        self.tracing, self.until = tracing, until

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tracing.set()
        self.until.wait(0.5)
        return x * 2


def test_two_twin_traces_never_overlap():
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    a_tracing, b_tracing, a_done = threading.Event(), threading.Event(), threading.Event()
    a = WaitsWhileTraced(a_tracing, b_tracing)
    b = WaitsWhileTraced(b_tracing, a_done)
    errors: list[BaseException] = []

    def trace_a() -> None:
        try:
            _twin._trace(a)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        a_done.set()

    def trace_b() -> None:
        a_tracing.wait(5)
        try:
            _twin._trace(b)
        except BaseException as error:  # pragma: no cover
            errors.append(error)

    threads = [threading.Thread(target=trace_a), threading.Thread(target=trace_b)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        # Overlapping traces restore each other's patches in the wrong order.
        assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
        assert not torch.fx._symbolic_trace.is_fx_tracing()
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, getattr_  # type: ignore[method-assign]
        torch.fx._symbolic_trace._is_fx_tracing_flag = False


# --- grad-mode switches inside a forward (torch.fx drops them too) ------------------------------


class CutsASkip(nn.Module):
    """A frozen middle stage whose skip branch is computed without autograd."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.block = conv_bn(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "no_grad":
            with torch.no_grad():
                skip = x * 2.0
        elif self.how == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                skip = x * 2.0
        else:  # the function form switches the mode at once
            previous = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
            skip = x * 2.0
            torch.set_grad_enabled(previous)
        return self.block(x) + skip


@pytest.mark.parametrize("how", ["no_grad", "set_grad_enabled", "set_grad_enabled_call"])
def test_a_grad_mode_switch_in_a_frozen_middle_stage_keeps_the_input_gradient_exact(how: str):
    torch.manual_seed(0)
    stem, middle = nn.Conv2d(3, 4, 1), CutsASkip(how)
    x = torch.randn(2, 3, 8, 8)

    def input_gradient(policy: FreezePolicy | None) -> torch.Tensor:
        stem.zero_grad(set_to_none=True)
        region = freeze(middle, policy=policy) if policy else freeze(middle)
        with region:
            for _ in range(3):  # build and check, then served by the twin
                stem.zero_grad(set_to_none=True)
                middle(stem(x)).square().sum().backward()
        assert stem.weight.grad is not None
        return stem.weight.grad.clone()

    plain = input_gradient(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = input_gradient(FAST)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert any("torch.fx does not record" in m for m in messages(caught))
    report = fast_report(middle)
    assert report is not None and report.fast_calls >= 1
    assert any("does not record" in reason for _, reason in report.untraced)
    for cls, attr in [(torch.autograd.grad_mode.no_grad, "__enter__"),
                      (torch.autograd.grad_mode.set_grad_enabled, "__init__")]:  # fmt: skip
        assert getattr(cls.__dict__[attr], "__wrapped__", None) is None  # restored
    drop_fast(middle)


# --- custom autograd Functions and function-form mode switches (second review) -----------------


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return -g


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g


class UsesFunction(nn.Module):
    """A middle stage whose inner block calls a custom autograd Function."""

    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.inner = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.fn.apply(x)))


class SwitchesByFunction(nn.Module):
    """A middle stage that switches grad mode or autocast with a module-level function."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "_set_grad_enabled":
            previous = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            skip = x * 2.0
            torch._C._set_grad_enabled(previous)
        else:
            torch.set_autocast_dtype("cpu", torch.bfloat16)
            torch.set_autocast_enabled("cpu", True)
            skip = self.lin(x).float()
            torch.set_autocast_enabled("cpu", False)
        return self.lin(x) + skip


def _middle_stage_gradient(middle: nn.Module, policy: FreezePolicy | None) -> torch.Tensor:
    torch.manual_seed(1)
    stem = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    region = freeze(middle, policy=policy) if policy else freeze(middle)
    with region:
        for _ in range(3):  # build and check, then served by the twin
            stem.zero_grad(set_to_none=True)
            middle(stem(x)).square().sum().backward()
    assert stem.weight.grad is not None
    return stem.weight.grad.clone()


@pytest.mark.parametrize(
    "how", ["grad_reverse", "straight_through", "_set_grad_enabled", "set_autocast_enabled"]
)
def test_a_custom_function_or_a_mode_switching_function_keeps_the_gradient_exact(how: str):
    torch.manual_seed(0)
    functions = {"grad_reverse": GradReverse, "straight_through": StraightThrough}
    middle = UsesFunction(functions[how]) if how in functions else SwitchesByFunction(how)
    for m in middle.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
    plain = _middle_stage_gradient(middle, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = _middle_stage_gradient(middle, FAST)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert any("torch.fx does not record" in m for m in messages(caught))
    report = fast_report(middle)
    assert report is not None and report.fast_calls >= 1
    assert any("does not record" in reason for _, reason in report.untraced)
    apply = torch.autograd.Function.__dict__["apply"]  # a Python or a C classmethod
    assert getattr(getattr(apply, "__func__", apply), "__wrapped__", None) is None  # restored
    assert getattr(torch._C._set_grad_enabled, "__wrapped__", None) is None
    assert getattr(torch.set_autocast_enabled, "__wrapped__", None) is None
    drop_fast(middle)


def test_torch_layers_alone_are_still_traced_and_folded():
    torch.manual_seed(0)
    net = nn.Sequential(
        conv_bn(3, 4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 4), nn.Sigmoid()
    )
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x)
        net(x)
    report = fast_report(net)
    assert report is not None
    assert report.untraced == () and len(report.folded) == 1 and report.fast_calls == 1
    drop_fast(net)
