"""Fast frozen mode (issue 17): outputs and gradients match the plain frozen forward within
the documented tolerance, twins are never stale, originals are never written, and what
cannot be fast runs plainly (reported) or is refused up front."""

from __future__ import annotations

import copy
import io
import pickle
import threading
import warnings

import pytest
import torch
from fast_models import ConvBN, Gate, Head, random_net, randomize_norm
from torch import nn

from freezesched import Constant, FreezeController, FreezePolicy, FrozenStageGuard, Step, freeze
from freezesched.freezing import (
    FastFrozen,
    FastMismatchError,
    FastModeWarning,
    FeatureCache,
    FeatureCacheMismatchError,
    drop_fast,
    fast_report,
    resolve_policy,
    sample_keys,
)

FAST = FreezePolicy(fast=FastFrozen())


def within(fast: torch.Tensor, plain: torch.Tensor, tolerance: tuple[float, float]) -> bool:
    """The documented rule, written out independently: max|d| <= atol + rtol * max|plain|."""
    rtol, atol = tolerance
    d = (fast.double() - plain.double()).abs().max().item()
    return d <= atol + rtol * plain.double().abs().max().item()


def plain_and_fast(model: nn.Module, x: torch.Tensor, spec: FastFrozen, calls: int = 2):
    with freeze(model):
        plain = model(x)
    with freeze(model, policy=FreezePolicy(fast=spec)):
        outs = [model(x) for _ in range(calls)]  # the first builds (returns plain), then twin
    return plain, outs


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(ConvBN(3, 8, 3, 1, 1, False, True), ConvBN(8, 8, 3, 2, 1, True, True),
                        ConvBN(8, 8, 1, 1, 1, False, True))  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_norm(m, torch.Generator().manual_seed(seed))
    return net


# --- outputs: random models, and what was folded ----------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_nets_match_the_plain_frozen_forward_and_fold_exactly_the_foldable_pairs(seed):
    net, foldable = random_net(seed)
    x = torch.randn(3, 3, 12, 12)
    spec = FastFrozen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)  # partial folds are reported
        plain, (first, fast) = plain_and_fast(net, x, spec)
    assert torch.equal(first, plain)  # the building call returns the plain output
    assert within(fast, plain, spec.tolerance(torch.float32))
    report = fast_report(net)
    assert report is not None and len(report.folded) == foldable
    assert report.fast_calls == 1 and report.builds == 1
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert len(report.folded) + len(report.not_folded) == norms
    drop_fast(net)


@pytest.mark.parametrize(
    "spec",
    [
        FastFrozen(channels_last=True),
        FastFrozen(dtype="bfloat16"),
        FastFrozen(dtype="float16", channels_last=True),
        FastFrozen(fold_bn=False, channels_last=True),
    ],
    ids=["channels_last", "bf16", "fp16-cl", "no-fold-cl"],
)
def test_representations_stay_within_their_documented_tolerance(spec):
    net = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    plain, (_, fast) = plain_and_fast(net, x, spec)
    assert fast.dtype == plain.dtype == torch.float32  # cast back
    assert fast.is_contiguous()  # in the plain output's memory format
    assert within(fast, plain, spec.tolerance(torch.float32))
    report = fast_report(net)
    assert report is not None and report.max_abs_diff is not None
    assert (
        report.max_abs_diff
        <= spec.tolerance(torch.float32)[1]
        + spec.tolerance(torch.float32)[0] * plain.abs().max().item()
    )
    drop_fast(net)


def test_a_channels_last_input_gets_a_channels_last_output_as_plainly():
    net = small_cnn()
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    plain, (_, fast) = plain_and_fast(net, x, FastFrozen(channels_last=True))
    assert plain.is_contiguous(memory_format=torch.channels_last) == fast.is_contiguous(
        memory_format=torch.channels_last
    )
    drop_fast(net)


# --- gradients ----------------------------------------------------------------------------------


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 1, 1, False, True)
        self.backbone = small_cnn()
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(torch.relu(self.stem(x)[:, :3])))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_of_the_trainable_head_match_a_frozen_prefix():
    model = Detector()
    x = torch.randn(2, 3, 16, 16)
    spec = FastFrozen(channels_last=True, dtype="bfloat16")
    for policy in (FreezePolicy(), FreezePolicy(fast=spec), FreezePolicy(fast=spec)):
        model.zero_grad(set_to_none=True)
        with freeze(model, ["stem", "backbone"], policy=policy):
            model(x).square().sum().backward()
        got = grads(model)
        if policy.fast is None:
            reference = got
    assert set(got) == set(reference) and all(n.startswith("head") for n in got)
    for n in got:
        assert within(got[n], reference[n], spec.tolerance(torch.float32)), n
    drop_fast(model.stem)
    drop_fast(model.backbone)


def test_a_frozen_middle_stage_passes_input_gradients_back_through_the_folded_twin():
    model = Detector()
    x = torch.randn(2, 3, 16, 16)
    spec = FastFrozen(dtype="bfloat16", compile=False)
    results = []
    for policy in (FreezePolicy(), FreezePolicy(fast=spec), FreezePolicy(fast=spec)):
        model.zero_grad(set_to_none=True)
        with freeze(model.backbone, policy=policy), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model(x).square().sum().backward()
        results.append((grads(model), [str(i.message) for i in w]))
    reference = results[0][0]
    assert any("stem" in n for n in reference)  # the stem trains: a middle stage
    for got, _ in results[1:]:
        assert set(got) == set(reference)
        for n in got:  # the float32 folded twin is used, so float32's tolerance holds
            assert within(got[n], reference[n], FastFrozen().tolerance(torch.float32)), n
    assert any("requires grad (a frozen middle stage)" in m for m in results[1][1])
    report = fast_report(model.backbone)
    assert report is not None and report.fast_calls == 1  # second region: the twin ran
    drop_fast(model.backbone)


# --- never stale ----------------------------------------------------------------------------


def test_frozen_trainable_frozen_many_times_with_weights_changing_leaves_no_stale_fold():
    torch.manual_seed(0)
    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    spec = FastFrozen(channels_last=True)
    ctrl = FreezeController(model, {"backbone": Step(2)}, optimizers=opt,
                            policy=FreezePolicy(fast=spec))  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    for epoch in range(8):  # trainable on even epochs: the backbone's weights change
        ctrl.apply(epoch)
        for _ in range(3):
            out = model.backbone(x)
            if epoch % 2:  # frozen: compare with the plain frozen forward of *now*
                with freeze(model.backbone):
                    drop_fast_forward = type(model.backbone).forward(model.backbone, x)
                assert within(out, drop_fast_forward, spec.tolerance(torch.float32))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        if epoch % 2:
            report = fast_report(model.backbone)
            assert report is not None and report.builds == 1  # one twin per frozen phase
        else:
            assert fast_report(model.backbone) is None  # dropped when it became trainable
    ctrl.release()


def test_weights_loaded_or_replaced_inside_a_frozen_phase_rebuild_the_twin():
    net = small_cnn(0)
    other = small_cnn(1)
    x = torch.randn(2, 3, 16, 16)
    tol = FastFrozen().tolerance(torch.float32)
    with freeze(net, policy=FAST), warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)  # "rebuilt 4 times": on purpose
        net(x)
        before = net(x)
        net.load_state_dict(other.state_dict())  # copy_ under no_grad: versions change
        after = net(x)
        assert within(after, other.eval()(x), tol) and not within(before, after, (0, 1e-6))
        with torch.no_grad():
            net[0].bn.running_var.mul_(2.0)  # a buffer written in place
        assert within(net(x), type(net).forward(net, x), tol)
        weight = torch.zeros_like(net[1].conv.weight)
        net[1].conv.weight = nn.Parameter(weight, requires_grad=False)  # replaced
        assert within(net(x), type(net).forward(net, x), tol)
        net[2] = ConvBN(8, 8, 1, 1, 1, False, True).requires_grad_(False).eval()  # replaced
        assert within(net(x), type(net).forward(net, x), tol)
        report = fast_report(net)
        assert report is not None and report.builds == 5 and len(report.folded) == 3
        # A replacement that requires grad is trained by the plain frozen forward too:
        # it runs plainly, with its gradient.
        net[1].conv.weight = nn.Parameter(weight.clone())
        net(x).sum().backward()
        assert net[1].conv.weight.grad is not None
        report = fast_report(net)
    assert report is not None and report.plain_calls == (
        ("tensors that require grad reach it (functional_call?)", 1),
    )
    drop_fast(net)


def test_a_submodule_added_in_training_mode_inside_the_region_runs_plainly():
    net = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x)
        net[2] = ConvBN(8, 8, 1, 1, 1, False, True).requires_grad_(False)  # not pinned
        before = net[2].bn.running_mean.clone()
        with pytest.warns(FastModeWarning, match="BatchNorm2d with buffers runs in training"):
            net(x)
        # As without fast mode: the freeze pins what it planned, not what came later.
        assert not torch.equal(net[2].bn.running_mean, before)
    drop_fast(net)
    drop_fast(net)


def test_a_write_torch_does_not_record_is_caught_by_the_periodic_check():
    net = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    with freeze(net, policy=FreezePolicy(fast=FastFrozen(verify_every=3))):
        net(x)  # builds
        net(x)
        net[0].conv.weight.data.mul_(3.0)  # .data bypasses torch's version counter
        net(x)
        with pytest.raises(FastMismatchError, match=r"p\.data\.copy_"):
            net(x)  # the third fast call is checked
        net(x)  # rebuilt after the failure: correct again
        assert within(net(x), type(net).forward(net, x), FastFrozen().tolerance(torch.float32))
    drop_fast(net)


def test_the_originals_stay_bitwise_untouched_and_nothing_is_registered():
    net = small_cnn()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    versions = {k: v._version for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    names = [n for n, _ in net.named_modules()]
    x = torch.randn(2, 3, 16, 16)
    with freeze(net, policy=FreezePolicy(fast=FastFrozen(channels_last=True, dtype="bfloat16"))):
        for _ in range(3):
            net(x)
        assert [n for n, _ in net.named_modules()] == names  # the twin is not a submodule
        assert set(net.state_dict()) == set(state)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]) and v._version == versions[k], k
        assert v.stride() == state[k].stride() and v.dtype == state[k].dtype
    assert [m.training for m in net.modules()] == modes
    assert "forward" not in vars(net) and "__getstate__" not in vars(net)
    drop_fast(net)
    assert fast_report(net) is None


def test_validation_in_eval_mode_during_a_frozen_phase_is_correct_and_reuses_twins():
    model = Detector()
    x = torch.randn(2, 3, 16, 16)
    guard = FrozenStageGuard(Constant(True), policy=FAST)
    outs = {}
    for mode in ["train", "train", "eval", "train", "eval"]:
        model.train(mode == "train")
        with guard(model.backbone, 0):
            outs.setdefault(mode, []).append(model.backbone(x))
        with freeze(model.backbone):
            plain = model.backbone(x)
        assert within(outs[mode][-1], plain, FastFrozen().tolerance(torch.float32))
    report = fast_report(model.backbone)
    # Modes are part of a twin's key (a forward may branch on self.training): two twins,
    # each built once.
    assert report is not None and report.builds == 2
    drop_fast(model.backbone)


# --- compile --------------------------------------------------------------------------------


def test_compiled_twin_is_reused_across_regions_and_recompiled_only_for_new_weights():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    randomize_norm(net[1], torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8)
    guard = FrozenStageGuard(Step(4), policy=FreezePolicy(fast=FastFrozen(compile=True)))
    spec = FastFrozen(compile=True)
    compiles = []
    for tick in range(1, 8):  # frozen on 1, 2, 3, 5, 6, 7; trainable on 4
        with guard(net, tick) as region:
            out = net(x)
            out = net(x)
        if region.frozen[0]:
            with freeze(net):
                assert within(out, net(x), spec.tolerance(torch.float32))
            report = fast_report(net)
            assert report is not None and report.compiled
            compiles.append(report.compiles)
        else:
            with torch.no_grad():
                net[0].weight.add_(0.1)  # "training" changes the weights
    # One compile for the first frozen phase, reused by ticks 2 and 3; after the trainable
    # tick the twin was dropped and one new compile serves ticks 5 to 7.
    assert compiles == [1, 1, 1, 1, 1, 1]
    drop_fast(net)


# --- what runs plainly, and says so ---------------------------------------------------------


def test_hooks_on_a_submodule_make_it_run_plainly_with_the_hooks_and_their_gradients():
    net = small_cnn()
    adapter = nn.Conv2d(8, 8, 1)

    def add_adapter(module, args, output):
        return output + adapter(output)

    handle = net[1].conv.register_forward_hook(add_adapter)
    x = torch.randn(2, 3, 16, 16)
    try:
        with freeze(net, policy=FAST), pytest.warns(FastModeWarning, match="forward hook"):
            net(x).sum().backward()
    finally:
        handle.remove()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    report = fast_report(net)
    assert report is not None and report.fast_calls == 0 and report.plain_calls
    drop_fast(net)


def test_functional_call_with_trainable_tensors_gets_the_plain_forward_and_exact_gradients():
    net = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    weight = net[0].conv.weight.detach().clone().requires_grad_(True)
    with freeze(net, policy=FAST):
        net(x)  # a twin exists
        with pytest.warns(FastModeWarning, match="require grad"):
            out = torch.func.functional_call(net, {"0.conv.weight": weight}, (x,))
        out.sum().backward()
    reference = weight.detach().clone().requires_grad_(True)
    with freeze(net):
        torch.func.functional_call(net, {"0.conv.weight": reference}, (x,)).sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, reference.grad)
    drop_fast(net)


def test_keyword_arguments_run_plainly():
    net = small_cnn()
    with freeze(net, policy=FAST), pytest.warns(FastModeWarning, match="keyword"):
        net(input=torch.randn(1, 3, 8, 8))
    drop_fast(net)


def test_an_untraceable_forward_is_run_as_it_is_and_reported():
    torch.manual_seed(0)
    net = nn.Sequential(ConvBN(3, 4, 3, 1, 1, False, True), Gate(4), Head(4))
    x = torch.randn(3, 3, 8, 8)
    with pytest.warns(FastModeWarning, match="ran without tracing"):
        plain, (_, fast) = plain_and_fast(net, x, FastFrozen())
    assert within(fast, plain, FastFrozen().tolerance(torch.float32))
    report = fast_report(net)
    assert report is not None
    assert [n for n, _ in report.untraced] == ["1"]
    assert ("1.bn", "inside '1', which is run as it is (not traced)") in report.not_folded
    assert report.folded == ("0.conv + 0.bn", "2.fc + 2.bn")
    drop_fast(net)


class Flaky(nn.Module):
    """A forward with noise outside any dropout layer: no twin can match it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.rand_like(x)


def test_a_forward_that_is_not_deterministic_fails_its_check_and_runs_plainly():
    net = Flaky()
    x = torch.randn(1, 3, 4, 4)
    with freeze(net, policy=FAST):
        with pytest.warns(FastModeWarning, match="does not match"):
            net(x)
        for _ in range(2):
            net(x)
    report = fast_report(net)
    assert report is not None and report.fast_calls == 0 and report.builds == 1
    drop_fast(net)


def test_outer_torch_compile_traces_the_plain_forward():
    model = Detector()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="aot_eager")
    with freeze(model.backbone):
        plain = model(x)
    with freeze(model.backbone, policy=FAST):
        out = compiled(x)
    assert torch.equal(out, plain)
    drop_fast(model.backbone)


def test_autocast_runs_the_twin_within_the_autocast_precision():
    net = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, (_, fast) = plain_and_fast(net, x, FastFrozen())
    assert fast.dtype == plain.dtype
    assert within(fast.float(), plain.float(), FastFrozen().tolerance(torch.bfloat16))
    drop_fast(net)


def test_tied_weights_are_folded_per_use_without_touching_the_shared_weight():
    torch.manual_seed(0)
    a, b = ConvBN(4, 4, 3, 1, 1, False, True), ConvBN(4, 4, 3, 1, 1, False, True)
    b.conv.weight = a.conv.weight  # tied
    for m in (a.bn, b.bn):
        randomize_norm(m, torch.Generator().manual_seed(1))
    net = nn.Sequential(a, b)
    shared = a.conv.weight.detach().clone()
    x = torch.randn(2, 4, 8, 8)
    plain, (_, fast) = plain_and_fast(net, x, FastFrozen())
    assert within(fast, plain, FastFrozen().tolerance(torch.float32))
    assert torch.equal(a.conv.weight, shared) and b.conv.weight is a.conv.weight
    report = fast_report(net)
    assert report is not None and len(report.folded) == 2
    drop_fast(net)


def test_copies_and_pickles_taken_in_a_fast_region_are_plain_modules():
    net = small_cnn()
    x = torch.randn(1, 3, 8, 8)
    with freeze(net, policy=FAST):
        net(x)
        twin_copy = copy.deepcopy(net)
        buffer = io.BytesIO()
        torch.save(net, buffer)
        pickled = pickle.loads(pickle.dumps(net))
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (twin_copy, pickled, loaded):
        assert "forward" not in vars(other) and "__getstate__" not in vars(other)
        other.eval()
        assert torch.allclose(other(x), net.eval()(x))
    drop_fast(net)


def test_two_threads_share_one_twin():
    net = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with freeze(net):
        plain = net(x)
    results: list[torch.Tensor] = []

    def work() -> None:
        for _ in range(3):
            results.append(net(x))

    with freeze(net, policy=FAST):
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 6
    assert all(within(r, plain, FastFrozen().tolerance(torch.float32)) for r in results)
    report = fast_report(net)
    assert report is not None and report.builds == 1
    drop_fast(net)


def _replica(module: nn.Module) -> nn.Module:
    """What ``nn.parallel.replicate`` builds for a second device, on the CPU, with weights
    scaled by 2 so that a replica computing with the original's weights is told apart."""
    memo = {id(m): m._replicate_for_data_parallel() for m in module.modules()}
    for m in module.modules():
        replica = memo[id(m)]
        for name, child in m._modules.items():
            replica._modules[name] = None if child is None else memo[id(child)]
        for name, param in m._parameters.items():
            setattr(replica, name, None if param is None else param * 2.0)
    return memo[id(module)]


def test_data_parallel_replicas_compute_with_their_own_weights():
    net = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(net).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
    with freeze(net, policy=FAST):
        net(x)
        replica = _replica(net)
        with pytest.warns(FastModeWarning, match="replica"):
            out = replica(x)
    assert torch.equal(out, reference(x))
    drop_fast(net)


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"bn": "train"}, ValueError, r"fast needs bn='eval'.*got bn='train'"),
        ({"dropout": "train"}, ValueError, r"fast needs dropout='eval'"),
        ({"trainable": ("fc*",)}, ValueError, r"trainable exceptions.*'fc\*'"),
    ],
)
def test_policies_that_cannot_be_fast_are_refused(fields, error, match):
    with pytest.raises(error, match=match):
        FreezePolicy(fast=FastFrozen(), **fields)
    with pytest.raises(error, match=match):
        resolve_policy({"fast": {"channels_last": True}, **fields})


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"dtype": "int8"}, ValueError, r"dtype must be one of \['bfloat16', 'float16'\]"),
        ({"channels_last": 1}, TypeError, r"channels_last must be a bool, got 1 \(int\)"),
        ({"rtol": -1.0}, ValueError, r"rtol must be finite and >= 0, got -1\.0"),
        ({"verify_every": -1}, ValueError, r"verify_every must be an int"),
        ({"cache": {"max_bytes": 1}}, TypeError, r"cache must be a FeatureCache"),
    ],
)
def test_bad_fast_fields_are_refused_with_name_rule_and_value(fields, error, match):
    with pytest.raises(error, match=match):
        FastFrozen(**fields)


def test_fast_from_a_config_dict():
    policy = resolve_policy({"fast": {"channels_last": True, "cache": {"max_bytes": 1024}}})
    assert policy.fast == FastFrozen(channels_last=True, cache=FeatureCache(max_bytes=1024))
    assert resolve_policy({"fast": True}).fast == FastFrozen()
    assert resolve_policy(FAST, fast=False).fast is None
    with pytest.raises(TypeError, match=r"fast has unknown fields \['fold'\]"):
        resolve_policy({"fast": {"fold": True}})
    with pytest.raises(TypeError, match=r"fast must be a FastFrozen or None, got 'yes'"):
        FreezePolicy(fast="yes")  # type: ignore[arg-type]


def test_a_scripted_module_is_refused_before_anything_changes():
    net = torch.jit.script(small_cnn())
    with pytest.raises(ValueError, match="TorchScript"), freeze(net, policy=FAST):
        pass
    assert all(p.requires_grad for p in net.parameters())


def test_a_module_with_a_wrapper_forward_is_refused_before_anything_changes():
    net = small_cnn()
    net.forward = lambda x: x  # what accelerate's hooks do
    with pytest.raises(ValueError, match="instance attribute 'forward'"), freeze(net, policy=FAST):
        pass
    assert all(p.requires_grad for p in net.parameters())


def test_two_regions_with_different_fast_settings_on_one_module_are_refused():
    net = small_cnn()
    with freeze(net, policy=FAST):
        with (
            pytest.raises(ValueError, match="already frozen in fast mode"),
            freeze(net, policy=FreezePolicy(fast=FastFrozen(channels_last=True))),
        ):
            pass
        assert all(not p.requires_grad for p in net.parameters())  # the outer still holds
    assert all(p.requires_grad for p in net.parameters())
    drop_fast(net)


# --- the feature cache -------------------------------------------------------------------------


def cache_policy(**fields) -> FreezePolicy:
    return FreezePolicy(fast=FastFrozen(cache=FeatureCache(**fields)))


def test_feature_cache_serves_repeated_samples_from_the_second_epoch():
    net = small_cnn()
    data = torch.randn(6, 3, 8, 8)
    batches = [torch.arange(0, 3), torch.arange(3, 6)]
    with freeze(net):
        plain = net(data)
    policy = cache_policy(verify_fraction=0.0)
    for epoch in range(3):
        for idx in batches:
            with freeze(net, policy=policy), sample_keys(idx):
                out = net(data[idx])
            assert within(out, plain[idx], FastFrozen().tolerance(torch.float32))
        report = fast_report(net)
        assert report is not None
        assert (report.cache_misses, report.cache_hits) == (6, 6 * epoch)
    assert report.cache_bytes == plain.numel() * 4
    drop_fast(net)


def test_features_of_one_precision_are_never_served_to_another():
    net = small_cnn()
    data = torch.randn(3, 3, 8, 8)
    with freeze(net):
        plain = net(data)
    cache = FeatureCache(verify_fraction=0.0)
    low = FreezePolicy(fast=FastFrozen(dtype="bfloat16", cache=cache))
    with freeze(net, policy=low), sample_keys(range(3)):
        net(data)  # cached in bfloat16
    with freeze(net, policy=FreezePolicy(fast=FastFrozen(cache=cache))), sample_keys(range(3)):
        out = net(data)  # an equal cache, but float32: its own store, computed afresh
    assert within(out, plain, FastFrozen().tolerance(torch.float32))
    report = fast_report(net)
    assert report is not None and report.cache_hits == 0
    drop_fast(net)


def test_feature_cache_catches_augmentation_with_its_verification():
    net = small_cnn()
    data = torch.randn(4, 3, 8, 8)
    keys = [0, 1, 2, 3]
    policy = cache_policy(verify_fraction=1.0)
    with freeze(net, policy=policy):
        with sample_keys(keys):
            net(data)
        with sample_keys(keys), pytest.raises(FeatureCacheMismatchError, match="augmentation"):
            net(torch.flip(data, dims=[3]))  # a "random flip" of the same samples
    drop_fast(net)


def test_feature_cache_keeps_to_its_budget_and_spills_to_disk(tmp_path):
    net = small_cnn()
    data = torch.randn(4, 3, 8, 8)
    with freeze(net):
        row_bytes = net(data[:1]).numel() * 4
    policy = cache_policy(max_bytes=2 * row_bytes, directory=str(tmp_path),
                          max_disk_bytes=row_bytes, verify_fraction=0.0)  # fmt: skip
    with freeze(net, policy=policy):
        for _ in range(2):
            with sample_keys(range(4)):
                net(data)
    report = fast_report(net)
    # 2 rows in memory, 1 on disk, 1 not stored: the second epoch hits 3 of 4.
    assert report is not None and (report.cache_hits, report.cache_misses) == (3, 5)
    assert report.cache_bytes == 2 * row_bytes
    assert len(list(tmp_path.iterdir())) == 1
    drop_fast(net)
    assert not list(tmp_path.iterdir())  # removed with the cache


def test_feature_cache_is_emptied_when_the_weights_change():
    net = small_cnn()
    data = torch.randn(2, 3, 8, 8)
    policy = cache_policy(verify_fraction=0.0)
    with freeze(net, policy=policy), sample_keys([0, 1]):
        net(data)
        with torch.no_grad():
            net[0].conv.weight.mul_(2.0)
        out = net(data)
        reference = type(net).forward(net, data)
    assert within(out, reference, FastFrozen().tolerance(torch.float32))
    report = fast_report(net)
    assert report is not None and report.cache_hits == 0
    drop_fast(net)


def test_feature_cache_refuses_a_frozen_middle_stage_and_wrong_key_counts():
    model = Detector()
    x = torch.randn(2, 3, 8, 8)
    with freeze(model.backbone, policy=cache_policy()):
        with sample_keys([0, 1]), pytest.raises(ValueError, match="only a frozen prefix"):
            model(x)
        with sample_keys([0, 1, 2]), pytest.raises(ValueError, match="3 keys but the batch"):
            model.backbone(x)
    with pytest.raises(TypeError, match="keys must be a sequence"), sample_keys("ab"):
        pass
    with pytest.raises(TypeError, match=r"keys\[0\] must be hashable"), sample_keys([[1]]):
        pass
    drop_fast(model.backbone)


class MixesSamples(nn.Module):
    """A forward that mixes the samples of its batch, with no layer that says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0)


@pytest.mark.parametrize("norm", ["track_running_stats=False", "added in training mode"])
def test_feature_cache_refuses_a_module_whose_outputs_depend_on_the_batch(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    if norm == "track_running_stats=False":
        net.insert(1, nn.BatchNorm2d(4, track_running_stats=False))
    data = torch.randn(4, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        with freeze(net, policy=cache_policy(verify_fraction=0.0)):
            if norm == "added in training mode":
                net.append(nn.BatchNorm1d(64, affine=False))  # unpinned: batch statistics
            refused = r"BatchNorm.d '[13]'.*batch's statistics"
            with sample_keys(range(4)), pytest.raises(ValueError, match=refused):
                net(data)
            out = net(data)  # outside sample_keys: plain fast mode, exact for the batch
            with sample_keys(range(2)), pytest.raises(ValueError, match="cannot serve"):
                net(data[:2])  # still refused: nothing was cached
            reference = type(net).forward(net, data)
    assert within(out, reference, FastFrozen().tolerance(torch.float32))
    report = fast_report(net)
    assert report is not None and (report.cache_hits, report.cache_misses) == (0, 0)
    drop_fast(net)


def test_feature_cache_verification_names_a_forward_that_mixes_samples():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MixesSamples())
    data = torch.randn(4, 3, 4, 4)
    with freeze(net, policy=cache_policy(verify_fraction=1.0)):
        with sample_keys(range(4)):
            net(data)
        with sample_keys([0, 1]), pytest.raises(FeatureCacheMismatchError, match="mixes samples"):
            net(data[:2])  # the same inputs per key; only the batch around them changed
    drop_fast(net)


def test_one_sample_keys_block_refuses_a_second_input_to_a_cached_module():
    net = small_cnn()
    other = small_cnn(seed=1)
    view1, view2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with freeze(net, policy=cache_policy(verify_fraction=0.0)):
        with freeze(other, policy=cache_policy(verify_fraction=0.0)), sample_keys([0, 1]):
            first = net(view1)
            assert torch.equal(net(view1), first)  # the same input: served from the cache
            assert torch.equal(net(view1.clone()), first)  # an equal one, too
            other(view2)  # another module has its own input
            with pytest.raises(ValueError, match=r"twice in one sample_keys block.*other values"):
                net(view2)  # a second view under the same keys
        report = fast_report(net)
        assert report is not None and (report.cache_misses, report.cache_hits) == (2, 4)
        with sample_keys([0, 1]):
            z2 = net(view2)  # the features of view1 were dropped: computed afresh
            view2.add_(1.0)
            with pytest.raises(ValueError, match="changed in place"):
                net(view2)
        reference = type(net).forward(net, view2 - 1.0)
    assert within(z2, reference, FastFrozen().tolerance(torch.float32))
    drop_fast(net)
    drop_fast(other)


# --- torchvision and timm models (where installed) --------------------------------------------


@pytest.mark.parametrize(("name", "norms"), [("resnet18", 20), ("resnet50", 53)])
def test_torchvision_resnets_fold_every_batchnorm_and_match(name, norms):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = getattr(models, name)(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_norm(m, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    for spec in (FastFrozen(channels_last=True), FastFrozen(dtype="bfloat16")):
        plain, (_, fast) = plain_and_fast(net, x, spec)
        assert within(fast, plain, spec.tolerance(torch.float32))
        report = fast_report(net)
        assert report is not None and len(report.folded) == norms and not report.not_folded
        drop_fast(net)


def test_torchvision_frozen_batchnorm_detection_backbone_folds():
    pytest.importorskip("torchvision")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    for m in backbone.modules():
        if type(m).__name__ == "FrozenBatchNorm2d":
            randomize_norm(m, torch.Generator().manual_seed(0))
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 64, 64)
    plain, (_, fast) = plain_and_fast(backbone, x, FastFrozen(channels_last=True))
    assert list(fast) == list(plain)  # an OrderedDict of feature maps
    for key in plain:
        assert within(fast[key], plain[key], FastFrozen().tolerance(torch.float32)), key
    report = fast_report(backbone)
    assert report is not None and len(report.folded) == 20 and not report.not_folded
    drop_fast(backbone)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_timm_models_match_and_report_what_they_fold(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_norm(m, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastModeWarning)
        plain, (_, fast) = plain_and_fast(net, x, FastFrozen(channels_last=True))
    assert within(fast, plain, FastFrozen().tolerance(torch.float32))
    report = fast_report(net)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert report is not None and report.fast_calls == 1
    assert len(report.folded) + len(report.not_folded) == norms
    assert report.folded  # at least the plain conv -> BatchNorm pairs
    drop_fast(net)
