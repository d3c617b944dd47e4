"""Differential fuzzing of the guard against a plain reference implementation.

A random small module tree (linear, BatchNorm, dropout, layer norm, residual blocks, a
module under two names, an adapter outside the model hooked onto one of its layers, a
hook that only reads features), random freeze targets and trainable exceptions, a random
input with or without ``requires_grad``. The same step runs twice on two identical builds:

* **guarded**: ``FrozenStageGuard`` freezes the targets;
* **reference**: the freeze done by hand, without freezesched: ``requires_grad=False`` on
  every parameter of a target not under an exception, and eval mode on every BatchNorm,
  dropout and buffer-owning layer of a target not under an exception.

Every gradient (the input's and the adapter's included), every parameter and buffer after
an SGD step (momentum, weight decay), and every flag after the region must be identical.
Used by ``tests/test_fuzz.py`` (a bounded number of examples in CI) and
``benchmarks/fuzz_guard.py`` (long runs).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from freezesched import Constant, FrozenStageGuard

WIDTH = 4
LEAVES = 5  # linear, BatchNorm, dropout, ReLU, LayerNorm


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclass(frozen=True)
class Recipe:
    """Everything random about a case; ``build`` turns it into modules, twice alike."""

    seed: int
    tree: tuple[Any, ...]  # per top-level block: a leaf kind (int) or (residual, children)
    shared: bool
    adapter_host: int | None  # index among the hookable linears
    reader: int  # index among the named modules
    targets: tuple[str, ...]
    trainable: tuple[str, ...]  # names relative to their target
    x_requires_grad: bool


def _leaf(kind: int) -> nn.Module:
    if kind == 0:
        return nn.Linear(WIDTH, WIDTH)
    if kind == 1:
        return nn.BatchNorm1d(WIDTH)
    if kind == 2:
        return nn.Dropout(0.3)
    if kind == 3:
        return nn.ReLU()
    return nn.LayerNorm(WIDTH)


def _node(spec: Any) -> nn.Module:
    if isinstance(spec, int):
        return _leaf(spec)
    residual, children = spec
    block = nn.Sequential(*[_node(c) for c in children])
    return Residual(block) if residual else block


def build(recipe: Recipe) -> tuple[nn.Module, nn.Module]:
    """The model and the adapter hooked onto it, from the recipe (deterministic)."""
    torch.manual_seed(recipe.seed)
    blocks = [_node(spec) for spec in recipe.tree]
    if recipe.shared:  # the first block again, under a second name
        blocks.append(blocks[0])
    model = nn.Sequential(*blocks, nn.Linear(WIDTH, 2))
    adapter = nn.Linear(WIDTH, WIDTH)
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    if recipe.adapter_host is not None and linears:
        host = linears[recipe.adapter_host % len(linears)]
        host.register_forward_hook(lambda m, args, out: out + adapter(out))
    named = [m for n, m in model.named_modules() if n]
    features: list[torch.Tensor] = []
    named[recipe.reader % len(named)].register_forward_hook(
        lambda m, args, out: features.append(out)
    )
    return model, adapter


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    def spec(depth: int) -> Any:
        if depth == 0 or draw(st.booleans()):
            return draw(st.integers(0, LEAVES - 1))
        return (draw(st.booleans()), tuple(spec(depth - 1) for _ in range(draw(st.integers(1, 3)))))

    tree = tuple(spec(2) for _ in range(draw(st.integers(2, 4))))
    partial = Recipe(draw(st.integers(0, 2**16)), tree, draw(st.booleans()), None, 0, (), (), False)
    model, _ = build(partial)
    names = [n for n, _ in model.named_modules() if n]
    targets = tuple(sorted(set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)))))
    inner = sorted({n[len(t) + 1 :] for t in targets for n in names if n.startswith(t + ".")})
    trainable = (
        tuple(sorted(set(draw(st.lists(st.sampled_from(inner), max_size=2))))) if inner else ()
    )
    return Recipe(
        seed=partial.seed,
        tree=tree,
        shared=partial.shared,
        adapter_host=draw(st.one_of(st.none(), st.integers(0, 20))),
        reader=draw(st.integers(0, 50)),
        targets=targets,
        trainable=trainable,
        x_requires_grad=draw(st.booleans()),
    )


def _exempt(name: str, patterns: tuple[str, ...]) -> bool:
    return bool(name) and any(
        fnmatch.fnmatchcase(name, p)
        or any(fnmatch.fnmatchcase(prefix, p) for prefix in _prefixes(name))
        for p in patterns
    )


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reference_freeze(model: nn.Module, recipe: Recipe) -> None:
    """What the guard promises, done by hand: each target with the same relative patterns."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for target in recipe.targets:
        for name, sub in modules[target].named_modules(remove_duplicate=False):
            if _exempt(name, recipe.trainable):
                continue
            for pname, param in sub.named_parameters(recurse=False):
                qualified = f"{name}.{pname}" if name else pname
                if not any(fnmatch.fnmatchcase(qualified, p) for p in recipe.trainable):
                    param.requires_grad_(False)
            has_buffers = any(b is not None for b in sub._buffers.values())
            if isinstance(sub, nn.BatchNorm1d | nn.Dropout) or has_buffers:
                sub.eval()


def _conflict(model: nn.Module, recipe: Recipe) -> bool:
    """Within one target, a module reached under two names, exempt under only one."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for target in recipe.targets:
        status: dict[int, set[bool]] = {}
        for name, sub in modules[target].named_modules(remove_duplicate=False):
            status.setdefault(id(sub), set()).add(_exempt(name, recipe.trainable))
        if any(len(s) > 1 for s in status.values()):
            return True
    return False


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:  # everything frozen and an input without grad: nothing to do
        loss.backward()


def _step(recipe: Recipe, guarded: bool) -> dict[str, Any]:
    model, adapter = build(recipe)
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    opt = torch.optim.SGD([*model.parameters(), *adapter.parameters()], lr=0.1, momentum=0.9,
                          weight_decay=0.01)  # fmt: skip
    g = torch.Generator().manual_seed(recipe.seed)
    x = torch.randn(5, WIDTH, generator=g).requires_grad_(recipe.x_requires_grad)
    model.train()
    modules = dict(model.named_modules())
    torch.manual_seed(recipe.seed)  # the same dropout masks in both runs
    if guarded:
        guard = FrozenStageGuard(Constant(True), trainable=list(recipe.trainable))
        with guard([modules[t] for t in recipe.targets], 0):
            _backward(model(x).square().mean())
        after = {n: p.requires_grad for n, p in model.named_parameters()}
        assert after == original, "requires_grad not restored"
        assert all(m.training for m in model.modules()), "a mode was not restored"
    else:
        _reference_freeze(model, recipe)
        _backward(model(x).square().mean())
    grads = {f"model.{n}": p.grad for n, p in model.named_parameters()}
    grads.update({f"adapter.{n}": p.grad for n, p in adapter.named_parameters()})
    grads["input"] = x.grad
    grads = {k: None if v is None else v.clone() for k, v in grads.items()}
    opt.step()
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"adapter.{k}": v.clone() for k, v in adapter.state_dict().items()})
    return {"grads": grads, "state": state}


def check(recipe: Recipe) -> bool:
    """Run one case; False if it was (rightly) refused; AssertionError on any difference."""
    model, _ = build(recipe)
    if _conflict(model, recipe):
        try:
            _step(recipe, guarded=True)
        except ValueError as error:
            if "two names" not in str(error):
                raise
            return False
        raise AssertionError("a module trainable under one name and frozen under another")
    guarded = _step(recipe, guarded=True)
    reference = _step(recipe, guarded=False)
    for name, expected in reference["grads"].items():
        got = guarded["grads"][name]
        assert (got is None) == (expected is None), f"{name}: {got} vs {expected}"
        if expected is not None:
            assert torch.equal(got, expected), name
    for key, expected in reference["state"].items():
        assert torch.equal(guarded["state"][key], expected), key
    return True
