"""The guard under adversarial use: every case ends correct, or refused before any change.

One test (or a small group) per scenario of the "never silently wrong" list; each failed
on the first release. The reference for gradients is always the same computation with
no guard at all.
"""

from __future__ import annotations

import copy
import gc
import inspect
import pickle
import signal
import subprocess
import sys
import threading
import warnings
import weakref

import pytest
import torch
from helpers import batch, flags, make_net, tensors
from torch import nn

from freezesched import Constant, FreezeController, FrozenStageGuard, Step, freeze, is_frozen
from freezesched.freezing import _mechanism

FROZEN = FrozenStageGuard(Constant(True))


def _grads(loss: torch.Tensor, tensors_: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors_, allow_unused=False))


# --- 1. trainable tensors that reach a frozen forward by another way ------------------------


def test_functional_call_with_trainable_tensors_gets_the_true_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    w = torch.randn(3, 4, requires_grad=True)

    def loss() -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": w}, (x,)).square().sum()

    expected = _grads(loss(), [w])
    with FROZEN(layer, 0):
        got = _grads(loss(), [w])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_torch_func_grad_through_a_frozen_module_is_not_zero():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    w0 = torch.randn(3, 4)

    def f(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": w}, (x,)).square().sum()

    expected = torch.func.grad(f)(w0)
    with FROZEN(layer, 0):
        got = torch.func.grad(f)(w0)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_adapter_attached_by_a_hook_inside_a_frozen_module_gets_its_gradient():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    adapter = nn.Linear(4, 4)  # owned outside the frozen module
    handle = backbone[0].register_forward_hook(lambda m, args, out: out + adapter(out))
    pre = backbone[2].register_forward_pre_hook(lambda m, args: (args[0] * adapter.weight[0],))
    x = torch.randn(3, 4)
    expected = _grads(backbone(x).sum(), list(adapter.parameters()))
    with FROZEN(backbone, 0):
        got = _grads(backbone(x).sum(), list(adapter.parameters()))
    handle.remove()
    pre.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _Scaled(nn.Module):
    """Uses a tensor captured from outside, not registered as a parameter."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.__dict__["scale"] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_captured_trainable_tensor_gets_its_gradient():
    torch.manual_seed(0)
    scale = torch.randn(4, requires_grad=True)
    module = _Scaled(scale)
    x = torch.randn(3, 4)
    expected = _grads(module(x).sum(), [scale])
    with FROZEN(module, 0):
        got = _grads(module(x).sum(), [scale])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- 2. TorchScript --------------------------------------------------------------------------


def _scripted_backbone() -> nn.Module:
    torch.manual_seed(0)
    return torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


class _Holder(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))


def test_scripted_backbone_keeps_its_batchnorm_statistics_while_frozen():
    model = _Holder(_scripted_backbone())
    model.train()
    before = tensors(model.backbone)
    with FROZEN(model.backbone, 0):
        model.train()
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert tensors(model.backbone).keys() == before.keys()
    for key, value in tensors(model.backbone).items():
        assert torch.equal(value, before[key]), key
    assert all(m.training for m in model.modules())


def test_frozen_child_of_a_scripted_model_keeps_its_statistics():
    torch.manual_seed(0)
    model = torch.jit.script(_Holder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    model.train()
    before = tensors(model.backbone)
    with FROZEN(model.backbone, 0):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    for key, value in tensors(model.backbone).items():
        assert torch.equal(value, before[key]), key
    assert model.backbone[1].training


def test_train_on_a_scripted_model_inside_the_region_is_reported():
    torch.manual_seed(0)
    model = torch.jit.script(_Holder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    region = FROZEN(model.backbone, 0)
    expected = r"buffers of TorchScript modules changed.*\.train\(\)"
    with pytest.raises(RuntimeError, match=expected), region:
        model.train()  # switches the scripted BatchNorm back to training mode ...
        model(torch.randn(2, 3, 8, 8))  # ... so its statistics move: reported at exit
    assert not any(is_frozen(p) for p in model.parameters())


# --- 3. lazy modules -------------------------------------------------------------------------


def test_a_lazy_module_is_refused_before_anything_changes_and_trains_later():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1))
    before = flags(model)
    with pytest.raises((ValueError, RuntimeError)), FROZEN(model[0], 0):
        pass
    assert flags(model) == before
    model(torch.randn(2, 3)).sum().backward()  # materializes, then trains
    assert model[0].weight.requires_grad and model[0].weight.grad is not None
    assert not is_frozen(model[0].weight)
    with FROZEN(model[0], 0):  # a freeze of the materialized layer is undone in full
        assert is_frozen(model[0])
    assert model[0].weight.requires_grad and not is_frozen(model[0].weight)


# --- 4. nn.DataParallel replicas -------------------------------------------------------------


def _replicate(module: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` builds for one device, on the CPU.

    Each module becomes ``_replicate_for_data_parallel()``; parameters become non-leaf
    copies (as broadcasting makes them, here scaled so that a replica computing with the
    original's weights is told apart), buffers stay the same tensors (as on device 0).
    """
    memo: dict[int, nn.Module] = {}
    for m in module.modules():
        memo[id(m)] = m._replicate_for_data_parallel()
    for m in module.modules():
        replica = memo[id(m)]
        for name, child in m._modules.items():
            replica._modules[name] = None if child is None else memo[id(child)]
        for name, param in m._parameters.items():
            if param is not None:
                setattr(replica, name, param * 2.0)
    return memo[id(module)]


def test_data_parallel_replicas_run_their_own_weights_with_batchnorm_pinned():
    model = make_net(dropout=0.0)
    model.train()
    x = batch(0)[0]
    with FROZEN(model.backbone, 0):
        replica = _replicate(model.backbone)
        stats = tensors(model.backbone)
        out = replica(x)
        for key, value in tensors(model.backbone).items():
            assert torch.equal(value, stats[key]), key  # statistics not updated via replica
    reference = copy.deepcopy(model.backbone)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
    reference.eval()
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)


# --- 5. threads ------------------------------------------------------------------------------


class _Rendezvous(nn.Module):
    """Waits for ``parties`` threads inside its forward, so that the calls overlap."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.barrier.wait()
        return x


def _threaded(target, n: int = 2) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


@pytest.mark.parametrize("guards", ["one guard", "two guards"])
def test_two_threads_forwarding_through_one_frozen_module(guards):
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), _Rendezvous(2), bn)
    model.train()
    before = flags(model)
    stats = tensors(bn)
    guard_list = [FROZEN, FrozenStageGuard(Constant(True))]

    def work(i: int) -> None:
        guard = guard_list[i] if guards == "two guards" else FROZEN
        with guard(model, 0):
            model(torch.randn(3, 4))

    assert _threaded(work) == []
    assert flags(model) == before
    assert all(torch.equal(v, stats[k]) for k, v in tensors(bn).items())
    assert not any(is_frozen(p) for p in model.parameters())


def test_threads_entering_and_leaving_overlapping_regions_restore_everything():
    model = make_net()
    model.train()
    before = flags(model)
    barrier = threading.Barrier(4, timeout=20)

    def work(i: int) -> None:
        target = model.backbone if i % 2 else model.backbone[1]
        for _ in range(20):
            with FROZEN(target, 0):
                model(batch(i)[0])
        barrier.wait()

    assert _threaded(work, 4) == []
    assert flags(model) == before
    assert not any(is_frozen(p) for p in model.parameters())


# --- 6. copies -------------------------------------------------------------------------------


def _copy_inside(model: nn.Module) -> nn.Module:
    with FROZEN(model.backbone, 0):
        return copy.deepcopy(model)


def test_nothing_of_freezesched_remains_on_a_module_after_exit():
    model = make_net()
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    with FROZEN(model.backbone, 0):
        model(batch(0)[0]).sum().backward()
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == attrs
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_a_copy_taken_inside_a_region_scripts_exports_and_inspects_like_the_original():
    model = make_net()
    model.eval()
    twin = _copy_inside(model)
    for a, b in zip(model.modules(), twin.modules(), strict=True):
        assert sorted(vars(a)) == sorted(vars(b))
        assert inspect.signature(a.forward) == inspect.signature(b.forward)
    x = batch(0)[0]
    scripted = torch.jit.script(twin)
    torch.testing.assert_close(scripted(x), model(x))
    exported = torch.export.export(twin, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_a_model_pickled_inside_a_region_loads_without_freezesched(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Flatten())
    path = tmp_path / "model.pt"
    with FROZEN(model, 0):
        model(torch.randn(2, 3, 5, 5))
        torch.save(model, path)
        raw = pickle.dumps(model)
    assert b"freezesched" not in raw
    code = (
        "import sys; sys.modules['freezesched'] = None; import torch; "
        f"m = torch.load({str(path)!r}, weights_only=False); print(type(m).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Sequential"


# --- 7. exception safety ---------------------------------------------------------------------


def test_a_warning_turned_into_an_error_during_exit_does_not_abort_the_restore():
    model = make_net()
    model.train()
    before = flags(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with FROZEN(model.backbone, 0):
                for m in model.backbone.modules():
                    m.forward = m.forward  # an instance attribute of the user's own
        except Exception:
            pass
    for m in model.backbone.modules():
        del m.forward
    assert flags(model) == before
    assert not any(is_frozen(p) for p in model.parameters())


#: The steps that change what is held, entering and exiting: where a real error (or a
#: Ctrl-C, whose Python handler runs at the next call) can arise. Per parameter and per
#: watched module the failure comes right after the k-th one was changed (injected
#: through the registry entry the plan made for it); the hooks are synced as a whole.
_STEPS = [
    ("enter", "param"),
    ("enter", "watch"),
    ("enter", "sync"),
    ("exit", "param"),
    ("exit", "watch"),
    ("exit", "sync"),
]


class _FailingHolders(set):
    """A parameter record's holders, failing right after one change."""

    def __init__(self, failure, when: str) -> None:
        super().__init__()
        self.failure, self.when = failure, when

    def add(self, key) -> None:
        super().add(key)
        if self.when == "enter":
            self.failure()

    def discard(self, key) -> None:
        super().discard(key)
        if self.when == "exit":
            self.failure()

    def clear(self) -> None:  # releasing a hold that was alone releases all at once
        held = bool(self)
        super().clear()
        if held and self.when == "exit":
            self.failure()


class _FailingWatchers(dict):
    """A watched module's holders, failing right after one change."""

    def __init__(self, failure, when: str) -> None:
        super().__init__()
        self.failure, self.when = failure, when

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if self.when == "enter":
            self.failure()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        if self.when == "exit":
            self.failure()

    def clear(self) -> None:
        held = bool(self)
        super().clear()
        if held and self.when == "exit":
            self.failure()


def _inject(region, where: str, what: str, k: int, failure) -> bool:
    """Make the k-th change of ``what`` fail; False if there are fewer than k."""
    plans = region.plans()
    if what == "sync":
        return False
    if what == "param":
        entries = [record for plan in plans for _, record in plan.records()]
        if k > len(entries):
            return False
        entries[k - 1].holders = _FailingHolders(failure, where)
    else:
        entries = [entry for plan in plans for *_, entry in plan.watches()]
        if k > len(entries):
            return False
        entries[k - 1].holders = _FailingWatchers(failure, where)
    return True


def _failing_sync(k: int, failure):
    """``_sync_hooks`` running ``failure()`` right after its k-th call (once)."""
    original = _mechanism._sync_hooks
    calls = 0

    def step() -> None:
        nonlocal calls
        original()
        calls += 1
        if calls == k:
            failure()

    return original, step


def _error() -> None:
    raise RuntimeError("injected")


def _ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)  # its handler runs at the next Python call


@pytest.mark.parametrize("failure", [_error, _ctrl_c], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("step", _STEPS, ids=[f"{w}-{what}" for w, what in _STEPS])
def test_an_interruption_in_any_step_leaves_the_model_consistent(step, failure):
    where, what = step
    model = make_net(adapter=True)
    model.train()
    before = flags(model)
    interrupted = 0
    for k in range(1, 40):
        # A new guard each time: a new plan, whose registry entries carry the injection.
        guard = FrozenStageGuard(Constant(True), trainable=["*adapter*"])
        region = guard(model.backbone, 0)
        if what != "sync" and not _inject(region, where, what, k, failure):
            break
        original, patched = _failing_sync(k, failure) if what == "sync" else (None, None)
        try:
            if where == "exit":
                region.__enter__()
            if patched is not None:
                _mechanism._sync_hooks = patched
            try:
                region.__enter__() if where == "enter" else region.__exit__(None, None, None)
            finally:
                if original is not None:
                    _mechanism._sync_hooks = original
        except (RuntimeError, KeyboardInterrupt):
            interrupted += 1
        else:
            if where == "enter":
                region.__exit__(None, None, None)
        # An interrupted __enter__ is never exited by `with`; an interrupted __exit__ must
        # finish restoring before the interruption propagates.
        assert flags(model) == before, f"{what}: interruption after change {k} left a change"
        assert not any(is_frozen(p) for p in model.parameters()), k
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert interrupted > 0


def test_ctrl_c_in_the_first_line_of_exit_waits_for_the_restore():
    """Python may run a signal handler as a function starts, before any of its lines."""
    from freezesched.freezing import _guard

    model = make_net()
    before = flags(model)
    region = FROZEN(model.backbone, 0)
    region.__enter__()
    at_entry = type("Frame", (), {"f_code": _guard.FrozenRegion.__exit__.__code__, "f_back": None})
    handler = signal.getsignal(signal.SIGINT)
    assert handler is not signal.default_int_handler  # ours, while something is held
    handler(signal.SIGINT, at_entry())  # as if Ctrl-C came at __exit__'s first instruction
    with pytest.raises(KeyboardInterrupt):
        region.__exit__(None, None, None)  # ... it is delivered once restoring is done
    assert flags(model) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_at_random_moments_never_leaves_a_model_half_frozen():
    import _thread
    import random

    model = make_net(adapter=True)
    model.train()
    before = flags(model)
    guard = FrozenStageGuard(Constant(True), trainable=["*adapter*"])
    rng = random.Random(0)
    interrupted = 0
    for _ in range(150):
        delay = rng.uniform(0.0, 0.002)
        timer = threading.Timer(delay, _thread.interrupt_main)
        try:
            timer.start()
            try:
                for _ in range(5):
                    with guard(model.backbone, 0):
                        assert is_frozen(model.backbone[0])
            finally:
                timer.join()
            for _ in range(100):  # let an interrupt still on its way arrive here
                pass
        except KeyboardInterrupt:
            interrupted += 1
        assert flags(model) == before
        assert not any(is_frozen(p) for p in model.parameters())
    assert interrupted > 10


def test_parameters_replaced_inside_a_region_are_trainable_afterwards():
    model = make_net()
    layer = model.backbone[0][0]
    with FROZEN(model.backbone, 0):
        layer.weight = nn.Parameter(layer.weight.detach() * 2, requires_grad=False)
        model.backbone.load_state_dict(copy.deepcopy(model.backbone.state_dict()), assign=True)
        assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.parameters())


# --- 8. weights and buffers that change outside .grad ----------------------------------------


def test_controller_refuses_lbfgs_which_moves_parameters_without_gradients():
    model = make_net()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="LBFGS"):
        FreezeController(model, {"backbone": Step(2)}, optimizers=opt)


def _spectral_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        torch.nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)),
        torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 3)),
    )


def test_spectral_norm_power_iteration_buffers_stay_put_while_frozen():
    model = _spectral_conv()
    model.train()
    model(torch.randn(2, 3, 9, 9))  # leave the first power iteration behind
    before = tensors(model)
    with FROZEN(model, 0):
        model(torch.randn(2, 3, 9, 9))
    after = tensors(model)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    model(torch.randn(2, 3, 9, 9))  # unfrozen: the power iteration runs again
    assert any(not torch.equal(after[k], v) for k, v in tensors(model).items())


def test_quantization_aware_training_observers_stay_put_while_frozen():
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    fake = FakeQuantize(observer=MovingAverageMinMaxObserver)
    model = nn.Sequential(nn.Linear(4, 4), fake)
    model.train()
    model(torch.randn(8, 4))
    before = tensors(model)
    with FROZEN(model, 0):
        out = model(torch.randn(8, 4) * 10)
    after = tensors(model)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.isfinite(out).all()


def test_an_observer_that_has_not_observed_yet_is_restored_to_its_empty_buffers():
    from torch.ao.quantization import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0)  # min_val / max_val are empty until used
    model = nn.Sequential(nn.Linear(4, 3), observer)
    model.train()
    before = tensors(model)
    with FROZEN(model, 0):
        model(torch.randn(8, 4))  # the observer resizes its buffers to 3 channels
    after = tensors(model)
    assert all(after[k].shape == before[k].shape for k in before)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


class _Counter(nn.Module):
    """A module that updates a buffer on every forward, whatever its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_an_unknown_buffer_update_inside_a_frozen_module_is_an_error_not_a_drift():
    model = nn.Sequential(nn.Linear(2, 2), _Counter())
    with pytest.raises(RuntimeError, match="calls"), FROZEN(model, 0):
        model(torch.randn(1, 2))
    assert flags(model) == flags(nn.Sequential(nn.Linear(2, 2), _Counter()))
    with FrozenStageGuard(Constant(True), trainable=[_Counter])(model, 0):
        model(torch.randn(1, 2))  # declared: it may update its buffer
    assert model[1].calls.item() == 2


# --- 9. reference cycles ---------------------------------------------------------------------


def test_nothing_keeps_a_model_alive_after_a_region_or_a_controller():
    gc.disable()
    try:
        model = make_net()
        refs = [weakref.ref(m) for m in model.modules()]
        with FROZEN(model.backbone, 0):
            model(batch(0)[0]).sum().backward()
        ctrl = FreezeController(model, {"backbone": Step(2)})
        ctrl.apply(1)
        ctrl.apply(2)
        ctrl.release()
        del ctrl, model
        assert [r for r in refs if r() is not None] == []
    finally:
        gc.enable()


def test_a_model_deleted_while_frozen_is_freed_and_leaves_no_hold():
    gc.disable()
    try:
        model = make_net()
        refs = [weakref.ref(m) for m in model.modules()]
        region = FROZEN(model.backbone, 0)
        region.__enter__()
        del model  # the region holds the backbone until it exits
        region.__exit__(None, None, None)
        del region
        assert [r for r in refs if r() is not None] == []
    finally:
        gc.enable()


# --- 10. shared submodules -------------------------------------------------------------------


def test_a_module_trainable_under_one_name_and_frozen_under_another_is_an_error():
    shared = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    backbone = nn.Sequential()
    backbone.add_module("main", shared)
    backbone.add_module("adapter", shared)  # the same object, a second name
    before = flags(backbone)
    guard = FrozenStageGuard(Constant(True), trainable=["adapter"])
    with pytest.raises(ValueError, match=r"adapter.*main|main.*adapter"), guard(backbone, 0):
        pass
    assert flags(backbone) == before


# --- 11. controller input --------------------------------------------------------------------


def test_the_same_module_under_two_keys_is_an_error():
    model = make_net()
    with pytest.raises(ValueError, match="backbone"):
        FreezeController(model, {"backbone": Step(2), ("backbone",): Step(3)})
    model.alias = model.backbone  # one module, a second name
    with pytest.raises(ValueError, match="alias"):
        FreezeController(model, {"backbone": Step(2), "alias": Step(3)})


def test_a_state_without_its_tick_is_an_error():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Step(2)})
    ctrl.apply(1)
    state = ctrl.state_dict()
    del state["tick"]
    with pytest.raises(ValueError, match="tick"):
        ctrl.load_state_dict(state)
    assert is_frozen(model.backbone)  # unchanged by the refused load
    ctrl.release()


def test_a_replaced_submodule_is_followed_by_name():
    model = make_net()
    ctrl = FreezeController(model, {"backbone": Step(2)})
    ctrl.apply(1)
    old = model.backbone
    model.backbone = make_net(1).backbone
    frozen = ctrl.apply(1)
    assert frozen == {"backbone": True}
    assert is_frozen(model.backbone) and not is_frozen(old)
    assert all(p.requires_grad for p in old.parameters())
    ctrl.release()
    assert all(p.requires_grad for p in model.parameters())


# --- 13. gradient checkpointing inside a frozen middle module --------------------------------


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 4)
        self.middle = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
        self.head = nn.Linear(4, 1)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.utils.checkpoint.checkpoint(self.middle, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_frozen_middle_stage_passes_exact_input_gradients(reentrant):
    model = _Checkpointed(reentrant)
    model.train()
    x = torch.randn(6, 4)
    reference = copy.deepcopy(model)
    reference.middle.eval()  # what a frozen middle stage computes
    for p in reference.middle.parameters():
        p.requires_grad_(False)
    reference(x).sum().backward()
    stats = tensors(model.middle)
    with FROZEN(model.middle, 0):
        model(x).sum().backward()
    for got, expected in zip(model.stem.parameters(), reference.stem.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in model.middle.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in tensors(model.middle).items())


@pytest.mark.changes_flags  # the loaded parameters are new: their flag is the replaced ones'
def test_a_parameter_replaced_between_two_overlapping_holds_gets_its_flag_back():
    # The second hold takes the replacement's inherited False for the flag to restore;
    # releasing the first gives that hold the replaced parameter's flag instead.
    model = nn.Linear(2, 2)
    first = freeze(model)
    first.__enter__()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    second = freeze(model)
    second.__enter__()
    first.__exit__(None, None, None)
    assert not model.weight.requires_grad  # still held by the second
    second.__exit__(None, None, None)
    assert all(p.requires_grad for p in model.parameters())


def test_a_failed_entry_leaves_no_weak_reference_on_a_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    guard = FrozenStageGuard(Constant(True))
    real = model[1].weight
    model[1]._parameters["weight"] = torch.randn(2, 2, requires_grad=True) * 2  # not a leaf
    with pytest.raises(RuntimeError), guard(model, 0):
        pass
    model[1]._parameters["weight"] = real
    assert all(p.requires_grad for p in model.parameters())
    assert not any(weakref.getweakrefs(p) for p in model.parameters())


def test_a_keyboard_interrupt_inside_a_frozen_forward_does_not_unpin_later_calls():
    # torch skips the post-hooks when a forward raises KeyboardInterrupt (they run for
    # Exception only), so the call stays open; the next call must pin and check again.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    stop = [True]

    def interrupt(module: nn.Module, args: object) -> None:
        if stop[0]:
            stop[0] = False
            raise KeyboardInterrupt

    model[1].register_forward_pre_hook(interrupt)
    before = tensors(model)
    with freeze(model):  # a hold that outlives the interrupted call (a notebook cell)
        with pytest.raises(KeyboardInterrupt):
            model(torch.randn(8, 4))
        model.train()
        model(torch.randn(8, 4) * 5 + 3)
        assert [k for k in before if not torch.equal(before[k], tensors(model)[k])] == []
    assert model[1].training
    model(torch.randn(8, 4))  # unfrozen: the statistics move again
    assert not torch.equal(before["b:1.running_mean"], model[1].running_mean)
