"""The guard plans a module tree once and reuses the plan while the tree is unchanged.

Every change to the tree between two guarded steps must be seen: the cached guard must
freeze exactly what a guard planning from scratch freezes, every time.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
from helpers import flags
from torch import nn
from torch.nn.utils import parametrize, prune

from freezesched import Constant, FrozenStageGuard, freeze, is_frozen
from freezesched.freezing import _mechanism

FROZEN = FrozenStageGuard(Constant(True))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)),
        nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]),
    )


def _seen(guard: FrozenStageGuard, model: nn.Module) -> tuple[object, ...]:
    """What a region of ``guard`` freezes and pins, as observed inside it."""
    with guard(model, 0):
        return (
            tuple(sorted(n for n, p in model.named_parameters() if is_frozen(p))),
            tuple(sorted(n for n, p in model.named_parameters() if p.requires_grad)),
            tuple(sorted(n for n, m in model.named_modules() if id(m) in _mechanism._WATCH)),
        )


def _fresh(model: nn.Module) -> tuple[object, ...]:
    return _seen(FrozenStageGuard(Constant(True)), model)


def test_a_guard_plans_once_while_the_tree_is_unchanged(monkeypatch):
    model, guard = _net(), FrozenStageGuard(Constant(True))
    calls = []
    original = _mechanism.plan_freeze
    monkeypatch.setattr(
        "freezesched.freezing._guard.plan_freeze",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    for _ in range(5):
        with guard(model, 0):
            pass
    assert len(calls) == 1
    model[2][0].weight = nn.Parameter(torch.zeros(4, 4))  # the tree changed: planned again
    with guard(model, 0):
        assert is_frozen(model[2][0].weight)
    assert len(calls) == 2


def _replace_param(m: nn.Sequential) -> None:
    m[2][0].weight = nn.Parameter(torch.ones(4, 4))


def _add_module(m: nn.Sequential) -> None:
    m[2].add_module("extra", nn.Linear(4, 4))


def _insert(m: nn.Sequential) -> None:
    m[3].insert(0, nn.Linear(4, 4))  # writes ModuleList._modules directly, no hooks


def _pop(m: nn.Sequential) -> None:
    m[3].pop(0)


def _delete(m: nn.Sequential) -> None:
    del m[2][1]


def _rename(m: nn.Sequential) -> None:
    # Same object, new name (last in its dict, so the values keep their order).
    layer = m[3][1]
    del m[3][1]
    m[3].add_module("renamed", layer)


def _register_buffer(m: nn.Sequential) -> None:
    m[2][0].register_buffer("counter", torch.zeros(1))


def _remove_bias(m: nn.Sequential) -> None:
    m[2][0].bias = None


def _assign_state(m: nn.Sequential) -> None:
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(state, assign=True)


def _parametrize(m: nn.Sequential) -> None:
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    parametrize.register_parametrization(m[3][0], "weight", Double())


def _prune(m: nn.Sequential) -> None:
    prune.l1_unstructured(m[3][1], "weight", amount=0.5)


def _replace_batchnorm(m: nn.Sequential) -> None:
    m[1] = nn.Identity()


CHANGES = [
    _replace_param, _add_module, _insert, _pop, _delete, _rename, _register_buffer,
    _remove_bias, _assign_state, _parametrize, _prune, _replace_batchnorm,
]  # fmt: skip


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_every_change_to_the_tree_is_seen(change):
    model, guard = _net(), FrozenStageGuard(Constant(True))
    before = _seen(guard, model)
    assert before == _fresh(model)
    change(model)
    assert _seen(guard, model) == _fresh(model)  # as if planned from scratch
    assert _seen(guard, model) == _fresh(model)  # and again, from the new cache entry
    assert not any(is_frozen(p) for p in model.parameters())


def test_random_changes_between_guarded_steps_match_fresh_plans():
    rng = random.Random(0)
    model, guard = _net(), FrozenStageGuard(Constant(True))
    for step in range(60):
        if rng.random() < 0.3:
            try:
                rng.choice(CHANGES)(model)
            except (IndexError, AttributeError, KeyError, ValueError):
                model = _net()  # that change no longer applies: start over
        target = model if step % 3 else model[2]
        assert _seen(guard, target) == _fresh(target), step
        before = flags(model)
        with guard(target, 0):
            pass
        assert flags(model) == before


def test_cached_plans_keep_no_model_alive():
    gc.disable()
    try:
        model = _net()
        refs = [weakref.ref(m) for m in model.modules()]
        for _ in range(3):
            with FROZEN(model, 0):
                pass
        del model
        assert [r for r in refs if r() is not None] == []
        # The dead entry is dropped when looked up, and a new model is planned afresh.
        other = _net()
        with FROZEN(other, 0):
            assert all(is_frozen(p) for p in other.parameters())
    finally:
        gc.enable()


def test_each_decision_has_its_own_plan():
    from freezesched import Layerwise

    model = _net()
    guard = FrozenStageGuard(
        Layerwise.progressive(2, first=1, last=2), modules=[["0", "1"], ["2", "3"]]
    )
    for tick in (0, 1, 2, 1, 0, 2):
        with guard(model, tick) as region:
            frozen = {id(p) for m in region.frozen_modules for p in m.parameters()}
            assert {id(p) for p in model.parameters() if is_frozen(p)} == frozen


def test_overlapping_regions_of_cached_plans_release_in_any_order():
    model, outer, inner = _net(), FrozenStageGuard(Constant(True)), FrozenStageGuard(Constant(True))
    before = flags(model)
    for order in range(4):
        a, b = outer(model, 0), inner(model[2], 0)
        a.__enter__()
        b.__enter__()
        if order % 2:
            a.__exit__(None, None, None)
            assert all(is_frozen(p) for p in model[2].parameters())
            assert not is_frozen(model[0].weight)
            b.__exit__(None, None, None)
        else:
            b.__exit__(None, None, None)
            assert all(is_frozen(p) for p in model.parameters())
            a.__exit__(None, None, None)
        assert flags(model) == before


def test_freeze_and_the_guard_agree():
    model = _net()
    with freeze(model):
        plain = {n for n, p in model.named_parameters() if is_frozen(p)}
    assert set(_seen(FROZEN, model)[0]) == plain


def test_a_rule_that_reads_more_than_the_tree_is_asked_every_step():
    from freezesched.freezing import TrainableRule

    class Flagged(TrainableRule):  # exempts modules carrying a flag the tree does not show
        def matches(self, name, module, parent):
            return getattr(module, "keep_training", False)

    model = _net()
    model[0].keep_training = True
    model[2][0].keep_training = False
    guard = FrozenStageGuard(Constant(True), trainable=[Flagged()])
    with guard(model, 0):
        assert model[0].weight.requires_grad and not model[2][0].weight.requires_grad
    model[0].keep_training, model[2][0].keep_training = False, True
    with guard(model, 0):
        assert not model[0].weight.requires_grad and model[2][0].weight.requires_grad

    class Named(Flagged):
        tree_only = True  # promised: reused while the tree is unchanged

    plan_calls = []
    guard = FrozenStageGuard(Constant(True), trainable=[Named()])
    original = _mechanism.plan_freeze
    import freezesched.freezing._guard as guard_module

    guard_module.plan_freeze = lambda *a, **k: plan_calls.append(1) or original(*a, **k)
    try:
        for _ in range(3):
            with guard(model, 0):
                pass
    finally:
        guard_module.plan_freeze = original
    assert len(plan_calls) == 1


def test_a_cached_plan_leaves_no_weak_reference_on_a_tensor():
    # torch.utils.swap_tensors (module.to() with set_swap_module_params_on_conversion, and
    # tensor subclasses such as DTensor) refuses tensors that have weak references.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    guard = FrozenStageGuard(Constant(True))
    for step in range(3):
        with guard(model[1], step):
            model(torch.randn(2, 4))
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(weakref.getweakrefs(t) for t in tensors)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)  # raised "Couldn't swap BatchNorm1d.weight" when it held some
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(p is q for p, q in zip(tensors, model.parameters(), strict=False))  # swapped
    with guard(model[1], 3):  # the swapped tensors (same objects, new contents) still plan
        assert not model[1].weight.requires_grad and model[0].weight.requires_grad
        model(torch.randn(2, 4, dtype=torch.float64))
    assert model[1].weight.requires_grad


def test_a_reassigned_policy_is_obeyed_at_the_next_step():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    guard = FrozenStageGuard(Constant(True))
    with guard(model, 0):
        assert not model[2].weight.requires_grad
    guard.policy = guard.policy.replace(trainable=("2",))
    with guard(model, 1):  # the plan cached under the old policy is not reused
        assert model[2].weight.requires_grad and not model[0].weight.requires_grad
    guard.policy = guard.policy.replace(trainable=("nomatch",))
    with pytest.raises(ValueError, match="matched nothing"), guard(model, 2):
        pass
    assert all(p.requires_grad for p in model.parameters())


def test_threads_sharing_a_guard_over_more_trees_than_it_caches():
    import sys
    import threading

    models = [nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(12)]
    guard = FrozenStageGuard(Constant(True))
    errors: list[BaseException] = []
    wrong: list[int] = []

    def worker(k: int) -> None:
        try:
            for i in range(400):
                model = models[(i * 7 + k) % len(models)]  # more trees than the cache holds
                with guard(model, i):
                    if model[0].weight.requires_grad or model[1].weight.requires_grad:
                        wrong.append(i)
        except BaseException as error:
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not wrong
    assert all(p.requires_grad for m in models for p in m.parameters())
    assert not _mechanism._PARAMS and not _mechanism._WATCH
