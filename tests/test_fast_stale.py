"""Fast frozen mode never serves a stale twin (third review): changes torch does not record
(fused optimizers, collectives, a storage replaced at the same address), parameters assigned
into ``None`` slots, state held outside ``_parameters``/``_buffers``/``_modules``, inputs of
another rank or dtype, and Python attributes the forward reads."""

from __future__ import annotations

import types
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from freezesched import FreezePolicy, freeze
from freezesched.freezing import FastFrozen, FastModeWarning, drop_fast, fast_report

FAST = FreezePolicy(fast=FastFrozen())
TOL = FastFrozen().tolerance(torch.float32)


def close(fast: torch.Tensor, plain: torch.Tensor, tolerance: tuple[float, float] = TOL) -> bool:
    """The documented rule: same dtype and shape, max|d| <= atol + rtol * max|plain|."""
    if fast.dtype != plain.dtype or fast.shape != plain.shape:
        return False
    rtol, atol = tolerance
    d = (fast.double() - plain.double()).abs().max().item()
    return d <= atol + rtol * plain.double().abs().max().item()


@pytest.fixture(autouse=True)
def _dropped():
    """Each test's twins go with it, also when it fails."""
    yield
    drop_fast()


def plain_of(net: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with freeze(net):
        return net(*args)


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].running_mean.uniform_(-1.0, 1.0)
    return net


# --- writes torch does not record, seen when the next region starts ---------------------------


def test_a_fused_optimizer_step_between_frozen_regions_rebuilds_the_twin():
    torch.manual_seed(0)
    # GroupNorm: no running statistics whose updates would bump versions and hide the step.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
    opt = torch.optim.Adam(net.parameters(), lr=0.05, fused=True)
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x), net(x)  # built, then served by the twin
    versions = [p._version for p in net.parameters()]
    for _ in range(3):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert versions == [p._version for p in net.parameters()]  # torch records nothing
    with freeze(net, policy=FAST):
        fast = net(x)
        fast_again = net(x)
    plain = plain_of(net, x)
    assert close(fast, plain) and close(fast_again, plain)
    report = fast_report(net)
    assert report is not None and report.builds == 2
    drop_fast(net)


def test_a_write_through_data_between_frozen_regions_rebuilds_the_twin():
    # What torch.distributed's broadcast / all_reduce do: write in place, no version bump.
    net = conv_net()
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x), net(x)
    new = conv_net(1)
    for mine, theirs in zip(net.state_dict().values(), new.state_dict().values(), strict=True):
        mine.data.copy_(theirs)
    with freeze(net, policy=FAST):
        net(x)
        fast = net(x)
    assert close(fast, plain_of(new, x))
    report = fast_report(net)
    assert report is not None and report.builds == 2
    drop_fast(net)


def test_the_sampled_check_does_not_rebuild_an_unchanged_module():
    net = conv_net()
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        with freeze(net, policy=FAST):
            net(x), net(x)
    report = fast_report(net)
    assert report is not None and report.builds == 1 and report.fast_calls == 5
    drop_fast(net)


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_a_dtype_round_trip_inside_a_region_rebuilds_the_twin(cast):
    # .to() replaces p.data and keeps p._version; the allocator may hand the new storage the
    # old address. The fingerprint keeps the old storage alive, so it cannot.
    for h in (64, 128, 256, 512):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(h, h, bias=False))
        x = torch.randn(4, h)
        with freeze(net, policy=FAST):
            net(x), net(x)
            getattr(net, cast)().float()
            fast = net(x)
        assert close(fast, plain_of(net, x)), h
        report = fast_report(net)
        assert report is not None and report.builds == 2
        drop_fast(net)


# --- what the fingerprint covers ------------------------------------------------------------


def test_a_parameter_assigned_into_a_none_slot_rebuilds_the_twin():
    net = conv_net().eval()
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x), net(x)
        net[0].bias = nn.Parameter(torch.full((4,), 5.0), requires_grad=False)
        fast = net(x)
        net[1].register_buffer("extra", None)  # a None buffer slot: recorded too
        net(x)
        net[1].extra = torch.ones(1)  # then a tensor assigned into it
        net(x)
    assert close(fast, plain_of(net, x))
    report = fast_report(net)
    assert report is not None and report.builds == 4
    drop_fast(net)


class WithTensorAttr(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = torch.ones(1, 4, 1, 1)  # a plain attribute, not a buffer
        self.shifts = [torch.zeros(1, 4, 1, 1)]  # inside a list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale + self.shifts[0]


class WithListedModule(nn.Module):
    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self._shared = [shared]  # deliberately not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared[0](self.conv(x))


def test_tensors_held_as_plain_attributes_are_part_of_the_fingerprint():
    torch.manual_seed(0)
    net = WithTensorAttr()
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST), warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)  # rebuilt often: on purpose
        net(x), net(x)
        with torch.no_grad():
            net.scale.mul_(3.0)  # in place
        assert close(net(x), type(net).forward(net, x))
        net.shifts[0] = torch.full((1, 4, 1, 1), 2.0)  # replaced inside the list
        assert close(net(x), type(net).forward(net, x))
        net.scale = torch.full((1, 4, 1, 1), -1.0)  # reassigned
        assert close(net(x), type(net).forward(net, x))
        report = fast_report(net)
    assert report is not None and report.builds == 4
    drop_fast(net)


def test_a_module_held_in_a_plain_list_is_part_of_the_fingerprint():
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 1)  # trained elsewhere
    net = WithListedModule(shared)
    opt = torch.optim.SGD(shared.parameters(), lr=1.0)
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x)  # builds (the plain output)
        with pytest.warns(FastModeWarning, match="require grad"):
            out = net(x)  # its trainable weights reach the forward: plain, with gradients
        out.sum().backward()
    assert shared.weight.grad is not None
    opt.step()
    opt.zero_grad()
    shared.requires_grad_(False)
    with freeze(net, policy=FAST), warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)  # its forward is not traced
        net(x), net(x)
        with torch.no_grad():
            shared.weight.mul_(-2.0)
        fast = net(x)
    assert close(fast, plain_of(net, x))
    report = fast_report(net)
    assert report is not None and report.builds == 3 and report.fast_calls == 1
    drop_fast(net)


# --- one twin per kind of input -------------------------------------------------------------


def test_a_linear_bn1d_fold_is_not_served_to_3d_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        net[1].running_mean.uniform_(-2, 2)
        net[1].running_var.uniform_(0.1, 3)
        net[1].weight.uniform_(0.5, 2)
        net[1].bias.uniform_(-1, 1)
    x2, x3 = torch.randn(4, 8), torch.randn(4, 8, 8)
    with freeze(net, policy=FAST), warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)  # the 3-D twin may not fold
        net(x2), net(x2)
        fast3 = [net(x3) for _ in range(2)]
        fast2 = net(x2)
    assert all(close(f, plain_of(net, x3)) for f in fast3)
    assert close(fast2, plain_of(net, x2))
    report = fast_report(net)
    assert report is not None and report.builds == 2
    drop_fast(net)


class Fp64LayerNorm(nn.LayerNorm):
    """Computes in float64 and returns the input's dtype (the CLIP LayerNorm pattern)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.double(), self.bias.double()
        out = nn.functional.layer_norm(x.double(), self.normalized_shape, w, b, self.eps)
        return out.to(x.dtype)


def test_inputs_of_another_dtype_get_their_own_twin_and_dtype():
    torch.manual_seed(0)
    net = nn.Sequential(Fp64LayerNorm(16))
    x32, x64 = torch.randn(4, 16), torch.randn(4, 16, dtype=torch.float64)
    x16 = torch.randn(4, 16).half()
    with freeze(net, policy=FAST):
        net(x32), net(x32)
        fast = [net(x) for x in (x64, x64, x16, x16)]
    plain = [plain_of(net, x) for x in (x64, x64, x16, x16)]
    tolerances = [FastFrozen().tolerance(x.dtype) for x in (x64, x64, x16, x16)]
    assert all(close(f, p, t) for f, p, t in zip(fast, plain, tolerances, strict=True))
    report = fast_report(net)
    assert report is not None and report.builds == 3
    drop_fast(net)


# --- Python attributes the forward reads, seen when the next region starts ------------------


def _eps(net: nn.Module) -> None:
    net[1].eps = 1.0


def _stride(net: nn.Module) -> None:
    net[0].stride = (2, 2)


def _forward(net: nn.Module) -> None:
    net[2].forward = types.MethodType(lambda self, x: x.tanh(), net[2])


def _class(net: nn.Module) -> None:
    net[2].__class__ = nn.Tanh  # swaps the implementation; no attribute changes


@pytest.mark.parametrize("change", [_eps, _stride, _forward, _class])
def test_a_python_attribute_changed_between_regions_rebuilds_the_twin(change):
    net = conv_net()
    with torch.no_grad():
        net[1].running_var.fill_(1e-3)  # eps matters
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x), net(x)
    change(net)
    with freeze(net, policy=FAST):
        net(x)
        fast = net(x)
    assert close(fast, plain_of(net, x))
    report = fast_report(net)
    assert report is not None and report.builds == 2
    drop_fast(net)


@pytest.mark.parametrize("change", [_eps, _stride, _forward, _class])
def test_a_python_attribute_changed_inside_a_region_rebuilds_the_twin_before_the_next_call(
    change,
):
    net = conv_net()
    with torch.no_grad():
        net[1].running_var.fill_(1e-3)  # eps matters
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x), net(x)  # built, checked, then served by the twin
        change(net)
        fast = net(x)
        report = fast_report(net)
    assert close(fast, plain_of(net, x))  # (a changed stride changes the shape too)
    assert report is not None and report.builds == 2
    drop_fast(net)


# --- complex outputs (second review) ------------------------------------------------------------


class Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.re, self.im = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.complex(self.re(x), self.im(x))


def test_the_check_compares_the_imaginary_part_of_a_complex_output():
    from freezesched.freezing import FastMismatchError

    torch.manual_seed(0)
    net, x = Spectral(), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        with freeze(net, policy=FreezePolicy(fast=FastFrozen(verify_every=2))):
            net(x)  # builds; the complex twin matches
            served = net(x)  # served by the twin
            net.im.weight.data.mul_(-3.0)  # not recorded; changes the imaginary part only
            with pytest.raises(FastMismatchError, match="periodic check of Spectral"):
                net(x)  # the periodic check
    assert served.is_complex() and fast_report(net).fast_calls == 1  # type: ignore[union-attr]
    drop_fast(net)


# --- scalar attributes that are NaN or become arrays (second review) ----------------------------


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale: Any = 1.0
        self.limit = float("nan")  # an optional clamp, disabled with NaN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * self.scale
        return y if self.limit != self.limit else y.clamp(max=self.limit)


def test_a_nan_scalar_attribute_does_not_rebuild_the_twin_on_every_call():
    torch.manual_seed(0)
    net, x = Scaled(), torch.randn(3, 2)
    with freeze(net, policy=FAST):
        for _ in range(6):
            net(x)
        net.limit = float("nan")  # another NaN object: the same value
        net(x)
    report = fast_report(net)
    assert report is not None and report.builds == 1 and report.fast_calls == 6
    drop_fast(net)


@pytest.mark.parametrize("kind", ["tensor", "ndarray", "int"])
def test_a_scalar_attribute_replaced_by_an_array_or_another_type_rebuilds_without_raising(kind):
    torch.manual_seed(0)
    net, x = Scaled(), torch.randn(3, 2)
    if kind == "ndarray":
        new: Any = pytest.importorskip("numpy").array([1.0, 2.0], dtype="float32")
    else:
        new = torch.tensor([1.0, 2.0]) if kind == "tensor" else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        with freeze(net, policy=FAST):
            net(x), net(x)
            net.scale = new
            fast = net(x)
            net(x)
    assert close(fast, plain_of(net, x))
    report = fast_report(net)
    assert report is not None and report.builds == 2
    drop_fast(net)


# --- tensors without storage (second review) ----------------------------------------------------


class GraphConv(nn.Module):
    def __init__(self, sparse_out: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("adj", (torch.eye(5) + torch.eye(5).roll(1, 0)).to_sparse())
        self.sparse_out = sparse_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self.adj, self.lin(x))
        return y.to_sparse() if self.sparse_out else y


def test_a_sparse_buffer_is_tracked_by_version_and_a_sparse_output_runs_plainly():
    torch.manual_seed(0)
    net, x = GraphConv(), torch.randn(5, 4)
    with freeze(net, policy=FAST):
        net(x), net(x)
        with torch.no_grad():
            net.adj.mul_(2.0)  # an in-place write to the sparse buffer
        fast = net(x)
        net(x)
    assert close(fast, plain_of(net, x))
    report = fast_report(net)
    assert report is not None and report.builds == 2 and report.fast_calls >= 2
    drop_fast(net)

    out_sparse = GraphConv(sparse_out=True)
    with warnings.catch_warnings(record=True) as caught, freeze(out_sparse, policy=FAST):
        warnings.simplefilter("always")
        results = [out_sparse(x) for _ in range(2)]
    assert all(torch.equal(r.to_dense(), results[0].to_dense()) for r in results)
    assert any("sparse" in str(w.message) and "plainly" in str(w.message) for w in caught)
    report = fast_report(out_sparse)
    assert report is not None and report.fast_calls == 0
    drop_fast(out_sparse)


# --- the feature cache's second input in one block (second review) ------------------------------


@pytest.mark.parametrize("second", ["clone", "view"])
def test_an_equal_second_input_with_nans_is_served_by_the_cache(second: str):
    from freezesched.freezing import FeatureCache, sample_keys

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")  # a missing value in one sample
    with freeze(net, policy=FreezePolicy(fast=FastFrozen(cache=FeatureCache()))):
        with sample_keys([0, 1, 2]):
            first = net(x)
            again = net(x.clone() if second == "clone" else x[:, :])
        with sample_keys([0, 1, 2]), pytest.raises(ValueError, match="different inputs"):
            net(x), net(x + 1.0)  # still refused: other values
    assert torch.equal(first.isnan(), again.isnan())
    assert torch.equal(first.nan_to_num(), again.nan_to_num())
    drop_fast(net)
