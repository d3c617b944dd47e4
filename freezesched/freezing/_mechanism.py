"""The one mechanism that freezes modules and undoes it exactly.

Freezing a module ``m`` means, while the hold lasts:

* every parameter of ``m`` (except named trainable exceptions) has ``requires_grad=False``
  and ``.grad is None``, so no optimizer that skips gradient-less parameters can move it.
  Autograd then keeps nothing for ``m``'s weights, and if nothing flowing into ``m``
  requires grad, nothing at all: no ``no_grad`` switch is needed, so tensors that reach
  the forward another way (``torch.func.functional_call``, an adapter attached by a hook,
  a captured tensor) still get exactly their gradients;
* layers whose forward would change a buffer or draw dropout noise run each forward call
  in eval mode (BatchNorm and dropout per the policy; spectral norm and other buffer
  owners always; quantization observers are switched off), and every buffer of a frozen
  module is checked unchanged after each of its forward calls: an update freezesched
  cannot prevent is an error, never a drift.

Nothing is stored on the modules. Per-call behaviour comes from one pair of
process-global forward hooks that torch calls for every module while at least one hold
is active, and that look the module up in a registry keyed by weak reference; replicas
made by ``nn.DataParallel`` are recognised through the hook dictionary they share with
the module they copy. So copies, pickles, ``torch.jit.script``, ``torch.export`` and
``inspect`` see plain modules, and a model is freed as soon as its last reference goes.
TorchScript submodules, which run without Python hooks, are put in eval mode for the
whole hold instead, and their buffers are checked when it ends.

Holds are per (object, hold), so overlapping freezes (``backbone`` and
``backbone.layer1``, two guards, two threads) combine as a union: an object is frozen
while at least one hold is active and returns to exactly the state it had before the
first one when the last ends, in whatever order they end. Every registry change happens
under one lock; acquiring is all-or-nothing; releasing always completes (each step is
idempotent, so a step cut short by an exception is redone) before any error is raised;
and a Ctrl-C arriving meanwhile is delivered once the model is consistent again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib
import itertools
import numbers
import operator
import signal
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.parameter import is_lazy

from freezesched._validation import describe
from freezesched.freezing import _fast  # fast frozen mode (attach/detach only)
from freezesched.freezing._distributed import (
    check_call,
    check_flat_parameter_views,
    fsdp2_sharded_counterparts,
)
from freezesched.freezing._policy import FreezePolicy, TrainableRule

__all__ = [
    "Hold",
    "Plan",
    "critical",
    "deliver_interrupt",
    "interrupt_pending",
    "is_frozen",
    "is_main_thread",
    "plan_freeze",
    "restored_requires_grad",
    "thawed",
]

# --- what a module is ------------------------------------------------------------------

EVAL = 1  # runs each forward call in eval mode
CHECK = 2  # its buffers are checked unchanged after each forward call
OBSERVER = 4  # a fake-quantize module: its observer is off during each call
RESTORE = 8  # an observer: its buffers are put back after each call
ENTRY = 16  # a TorchScript module called from Python: re-pin its scripted parts per call

#: Dropout-like layers outside ``torch.nn`` (torchvision, timm), recognised by class name.
_DROPOUT_NAMES = frozenset({"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock"})


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    subclasses: list[type] = cls.__subclasses__()
    for sub in subclasses:
        out |= {sub, *_all_subclasses(sub)}
    return out


def _script_name(module: nn.Module) -> str | None:
    name = getattr(module, "original_name", None) if _is_scripted(module) else None
    return name if isinstance(name, str) else None


def _is_scripted(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NormBase):
        return True
    name = _script_name(module)
    return name is not None and name in {c.__name__ for c in _all_subclasses(_NormBase)}


def _is_dropout(module: nn.Module) -> bool:
    """Dropout-like: draws noise in training mode only (``nn.RReLU``'s random slopes too)."""
    if isinstance(module, _DropoutNd | nn.RReLU) or type(module).__name__ in _DROPOUT_NAMES:
        return True
    name = _script_name(module)
    return name is not None and (
        name in _DROPOUT_NAMES
        or name == "RReLU"
        or name in {c.__name__ for c in _all_subclasses(_DropoutNd)}
    )


#: Attribute names a scripted module's dropout rate is looked up under (TorchScript keeps
#: attributes in C++, where they cannot be listed).
_RATE_NAMES = (
    "dropout", "dropout_p", "dropout_prob", "dropout_rate", "attn_drop", "attn_dropout",
    "attention_dropout", "drop_rate", "drop_prob", "proj_drop", "p_drop",
)  # fmt: skip


def _is_rate(value: object) -> bool:
    """A positive non-integer real (``float``, NumPy floats): a dropout probability."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral)
        and float(value) > 0
    )


def _draws_dropout(module: nn.Module, exempt: Callable[[str, nn.Module], bool]) -> bool:
    """Whether ``module``'s own forward may draw dropout noise gated by its ``training``.

    Attention and recurrent cells apply dropout functionally, for example
    ``F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training
    else 0.0)`` (timm, Hugging Face), ``F.multi_head_attention_forward(...,
    training=self.training)`` (``nn.MultiheadAttention``) or between the layers of an
    ``nn.LSTM``: putting only their dropout children in eval mode leaves that noise on.
    Recognised: ``nn.MultiheadAttention`` and ``nn.RNNBase`` with a positive ``dropout``;
    a module with a positive real attribute whose name mentions ``drop`` (``dropout``,
    ``dropout_prob``, ``attn_drop``, timm's ``drop_rate``); and a *cell*, a module whose
    children have no children of their own, with a dropout child that is not a trainable
    exception (``exempt``). A container is not switched for its dropout children (it calls
    them as modules, which are pinned themselves): its flag can gate more than noise
    (GoogLeNet's auxiliary outputs, a distilled ViT's two heads).
    """
    if isinstance(module, nn.MultiheadAttention | nn.RNNBase) or _script_name(module) in {
        "MultiheadAttention", "RNN", "LSTM", "GRU",
    }:  # fmt: skip
        return _is_rate(getattr(module, "dropout", 0.0))
    if _is_scripted(module):
        if any(_is_rate(getattr(module, n, None)) for n in _RATE_NAMES):
            return True
    elif any(_is_rate(v) and "drop" in k.lower() for k, v in vars(module).items()):
        return True  # its own rate: timm's heads, F.dropout(x, self.drop_rate, self.training)
    children = [(n, c) for n, c in module._modules.items() if c is not None]
    if any(len(c._modules) for _, c in children):
        return False  # a container calls its dropout children as modules (pinned there)
    return any(_is_dropout(c) and not exempt(n, c) for n, c in children)


def _quant_kind(module: nn.Module) -> int:
    """``OBSERVER`` for a fake-quantize module, ``RESTORE`` for an observer, else 0."""
    fake = sys.modules.get("torch.ao.quantization.fake_quantize")
    if fake is not None and isinstance(module, fake.FakeQuantizeBase):
        return OBSERVER
    observer = sys.modules.get("torch.ao.quantization.observer")
    if observer is not None and isinstance(module, observer.ObserverBase):
        return RESTORE
    return 0


def _has_buffers(module: nn.Module) -> bool:
    return any(b is not None for _, b in module._buffers.items())


def _get(entries: Any, key: str) -> Any:
    """``entries.get(key)`` that also works on TorchScript modules' attribute wrappers."""
    return entries[key] if key in entries else None  # noqa: SIM401 - wrappers have no .get


# --- planning: read-only; validates everything before any change ------------------------


@dataclass
class Plan:
    """What freezing one module under one policy touches; made without touching it.

    Attributes:
        module: The frozen module.
        params: The parameters to freeze (trainable exceptions excluded).
        watch: ``(submodule, kinds, name)`` for every submodule with per-call behaviour.
        scripted: TorchScript submodules put in eval mode for the whole hold.
        slots: ``(owner, attribute, parameter)`` for every place a frozen parameter lives,
            so that one replaced inside the hold is restored too.
        matched: Indices of ``policy.trainable`` entries that matched something.
        names: Qualified name of every submodule (relative to ``module``), by identity.
        fast: The policy's fast frozen mode (``None``: off).
    """

    module: nn.Module
    params: list[nn.Parameter]
    watch: list[tuple[nn.Module, int, str]]
    scripted: list[tuple[nn.Module, str]]
    slots: list[tuple[nn.Module, str, nn.Parameter]]
    matched: set[int]
    names: dict[int, str] = field(repr=False)
    signature: _Signature | None = field(default=None, repr=False)
    fast: _fast.FastFrozen | None = None

    _records: list[tuple[nn.Parameter, _ParamRecord]] | None = field(default=None, repr=False)
    _watches: list[tuple[nn.Module, int, str, _Watch]] | None = field(default=None, repr=False)
    _slot_check: tuple[tuple[Any, ...], tuple[str, ...], tuple[Any, ...]] | None = field(
        default=None, repr=False
    )

    def cached(self) -> CachedPlan | None:
        """This plan without strong references, for reuse; ``None`` if not cacheable.

        Not cacheable: a tree the signature cannot check (TorchScript), a rule that reads
        more than the tree, or a frozen parameter that is not in a slot of the tree (an
        FSDP2 sharded parameter), which a cached plan could not find again.
        """
        if self.signature is None:
            return None
        in_slots = {id(p) for _, _, p in self.slots}
        if not all(i in in_slots for i in self.param_ids):
            return None
        return CachedPlan(self, self.signature)

    @functools.cached_property
    def param_ids(self) -> tuple[int, ...]:
        """``id`` of each frozen parameter, in :attr:`params` order."""
        return tuple(map(id, self.params))

    @functools.cached_property
    def watch_ids(self) -> tuple[int, ...]:
        """``id`` of each watched module."""
        return tuple(id(m) for m, _, _ in self.watch)

    def records(self) -> list[tuple[nn.Parameter, _ParamRecord]]:
        """One registry record per frozen parameter, made once and reused by each hold."""
        if self._records is None:
            self._records = [(p, _ParamRecord(id(p), p.requires_grad)) for p in self.params]
        return self._records

    def watches(self) -> list[tuple[nn.Module, int, str, _Watch]]:
        """:attr:`watch` with one registry entry per module, made once and reused."""
        if self._watches is None:
            self._watches = [(m, k, n, _Watch(m, n)) for m, k, n in self.watch]
        return self._watches

    def slots_unchanged(self) -> bool:
        """Whether every frozen parameter is still in its place (a few C-level passes)."""
        if self._slot_check is None:
            owners = tuple(owner._parameters for owner, _, _ in self.slots)
            if not all(type(d) is dict for d in owners):  # TorchScript wrappers
                return False
            self._slot_check = (
                owners,
                tuple(attr for _, attr, _ in self.slots),
                tuple(p for _, _, p in self.slots),
            )
        owners, attrs, params = self._slot_check
        return all(map(operator.is_, map(dict.get, owners, attrs), params))


_DICTS = operator.attrgetter("_modules", "_parameters", "_buffers")


class _Signature:
    """Everything a plan depends on, held weakly and checked in a few C-level passes.

    A plan depends only on the module tree: which submodules, parameters and buffers
    each module has, under which names, and the modules' types. Every change to the tree
    through torch's API (``setattr``, ``del``, ``add_module``, ``register_*``,
    ``ModuleList.insert``/``pop``, ``load_state_dict(assign=True)``, parametrizations,
    pruning) changes the type of a module or the size, a key or a value of one of its
    dictionaries, all of which are compared here; so a cached plan is used only while the
    tree is identical. Everything is referenced weakly: a cache of signatures keeps no
    model alive. TorchScript modules keep their dictionaries in wrappers: trees holding
    them get no signature (``of`` returns ``None``) and are planned every time.
    """

    __slots__ = ("filled", "kept", "keys", "lens", "modules", "nones", "types", "values")

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        dicts = tuple(itertools.chain.from_iterable(map(_DICTS, modules)))
        self.modules = tuple(map(weakref.ref, modules))
        self.types = tuple(map(type, modules))
        self.lens = tuple(map(len, dicts))
        self.filled = tuple(map(bool, dicts))
        filled = tuple(itertools.compress(dicts, self.filled))
        self.keys = tuple(itertools.chain.from_iterable(map(dict.keys, filled)))
        values = tuple(itertools.chain.from_iterable(map(dict.values, filled)))
        # ``None`` entries (``bias=None``) by position; the others by identity. Modules
        # are referenced weakly (a dead one is a changed tree), tensors by ``id`` only: a
        # weak reference on a parameter would stop ``torch.utils.swap_tensors``. A new
        # tensor that happens to get a dead one's ``id`` sits in the same slot of the
        # same tree, which plans the same (the plan takes its tensors from the tree).
        self.nones = tuple(v is None for v in values)
        self.kept = tuple(not none for none in self.nones)
        self.values = tuple(id(v) for v in values if v is not None)

    @classmethod
    def of(cls, modules: Sequence[nn.Module]) -> _Signature | None:
        dicts = itertools.chain.from_iterable(map(_DICTS, modules))
        return cls(modules) if all(type(d) is dict for d in dicts) else None

    def alive(self) -> tuple[nn.Module, ...] | None:
        """The modules, if the tree is alive and unchanged; else ``None``."""
        modules = tuple(map(_CALL, self.modules))
        if any(map(operator.is_, modules, itertools.repeat(None))):
            return None
        if not all(map(operator.is_, map(type, modules), self.types)):
            return None
        dicts = tuple(itertools.chain.from_iterable(map(_DICTS, modules)))
        if tuple(map(len, dicts)) != self.lens:
            return None
        filled = tuple(itertools.compress(dicts, self.filled))
        values = tuple(itertools.chain.from_iterable(map(dict.values, filled)))
        if tuple(map(operator.is_, values, itertools.repeat(None))) != self.nones:
            return None
        if tuple(map(id, itertools.compress(values, self.kept))) != self.values:
            return None
        if tuple(itertools.chain.from_iterable(map(dict.keys, filled))) != self.keys:
            return None
        return modules


_CALL = operator.methodcaller("__call__")


class CachedPlan:
    """A :class:`Plan` kept without keeping its model alive, for reuse while it holds.

    Planning walks the whole tree and was most of a guarded step's overhead. A cached
    plan keeps weak references to modules only (and the registry entries its holds
    reuse), and finds each parameter again in its slot (owner module, attribute); each
    :meth:`revive` checks the tree is alive and unchanged (:class:`_Signature`) and hands
    back an equivalent plan, or ``None``.
    """

    def __init__(self, plan: Plan, signature: _Signature) -> None:
        refs: dict[int, weakref.ref[Any]] = {}

        def ref(obj: Any) -> Any:  # a weakref; Any: what it returns is alive once checked
            found = refs.get(id(obj))
            if found is None:
                found = refs[id(obj)] = weakref.ref(obj)
            return found

        slot_of: dict[int, tuple[Any, str]] = {}  # (weakref to the owner, attribute)
        for owner, attr, param in plan.slots:
            slot_of.setdefault(id(param), (ref(owner), attr))
        self.signature = signature
        self.module = ref(plan.module)
        self.params = tuple(slot_of[i] for i in plan.param_ids)
        self.watch = tuple((ref(m), k, n) for m, k, n in plan.watch)
        self.scripted = tuple((ref(m), n) for m, n in plan.scripted)
        self.slots = tuple((ref(o), a) for o, a, _ in plan.slots)
        self.matched = plan.matched
        self.names = plan.names
        self.fast = plan.fast
        self.records = tuple(r for _, r in plan.records())
        self.entries = tuple(e for *_, e in plan.watches())
        self.param_ids = plan.param_ids
        self.watch_ids = plan.watch_ids

    def revive(self) -> Plan | None:
        """The plan, if its tree is alive and unchanged; else ``None``."""
        if self.signature.alive() is None:
            return None
        # Unchanged: every module below is alive (the tree holds it), every parameter is
        # in its slot.
        params = [o()._parameters[a] for o, a in self.params]
        watch: list[tuple[nn.Module, int, str]] = [(m(), k, n) for m, k, n in self.watch]
        plan = Plan(
            module=self.module(),
            params=params,
            watch=watch,
            scripted=[(m(), n) for m, n in self.scripted],
            slots=[(o(), a, o()._parameters[a]) for o, a in self.slots],
            matched=self.matched,
            names=self.names,
            signature=None,
            fast=self.fast,
        )
        plan._records = list(zip(params, self.records, strict=True))
        plan._watches = [(*w, e) for w, e in zip(watch, self.entries, strict=True)]
        plan.__dict__["param_ids"] = self.param_ids
        plan.__dict__["watch_ids"] = self.watch_ids
        return plan


def _matches(
    name: str, module: nn.Module | None, parent: nn.Module | None, specs: Sequence[Any]
) -> set[int]:
    """Indices of the ``specs`` that exempt ``name``: a module (``module`` given) or a parameter."""
    hits = set()
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            if name and fnmatch.fnmatchcase(name, spec):
                hits.add(i)
        elif isinstance(spec, TrainableRule):
            if module is not None and parent is not None and spec.matches(name, module, parent):
                hits.add(i)
        elif module is not None and isinstance(module, spec):
            hits.add(i)
    return hits


def _walk(module: nn.Module) -> Iterable[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, submodule, parent)`` in ``named_modules(remove_duplicate=False)`` order.

    Iterative: planning runs on every guarded step, and nested generators made it the
    guard's main cost.
    """
    stack: list[tuple[str, nn.Module, nn.Module | None]] = [("", module, None)]
    while stack:
        name, sub, parent = stack.pop()
        yield name, sub, parent
        children = [
            (f"{name}.{k}" if name else k, m, sub) for k, m in sub._modules.items() if m is not None
        ]
        stack.extend(reversed(children))


def _label(name: str) -> str:
    return repr(name) if name else "(the frozen module itself)"


def plan_freeze(module: nn.Module, policy: FreezePolicy) -> Plan:
    """Work out what freezing ``module`` under ``policy`` touches, without touching it.

    Raises:
        ValueError: a parameter is an uninitialized lazy parameter, a submodule or
            parameter reachable under two names is a trainable exception under one and
            frozen under the other, or a module's parameters are flattened by
            ``FullyShardedDataParallel(use_orig_params=False)``.
    """
    specs = policy.trainable
    matched: set[int] = set()
    exempt_prefixes: list[str] = []
    module_status: dict[int, tuple[bool, str]] = {}
    param_status: dict[int, tuple[bool, str]] = {}
    params: dict[int, nn.Parameter] = {}
    slots: list[tuple[nn.Module, str, nn.Parameter]] = []
    watch: list[tuple[nn.Module, int, str]] = []
    scripted: list[tuple[nn.Module, str]] = []
    names: dict[int, str] = {}
    modules: list[nn.Module] = []
    for name, sub, parent in _walk(module):
        hits = _matches(name, sub, parent, specs) if specs else set()
        matched |= hits  # count matches inside exempt subtrees too
        under = bool(exempt_prefixes) and any(
            name == p or name.startswith(p + ".") for p in exempt_prefixes
        )
        exempt = under or bool(hits)
        if hits and not under:
            exempt_prefixes.append(name)
        seen = module_status.get(id(sub))
        if seen is not None:
            if seen[0] != exempt:
                trainable, frozen = (seen[1], name) if seen[0] else (name, seen[1])
                raise ValueError(
                    f"a submodule reachable under two names must be frozen or trainable "
                    f"under both; {type(sub).__name__} is a trainable exception as "
                    f"{_label(trainable)} but frozen as {_label(frozen)}. Make trainable= "
                    "match both names, or neither"
                )
            continue  # an alias: everything below was planned under its first name
        module_status[id(sub)] = (exempt, name)
        names[id(sub)] = name
        modules.append(sub)
        if not exempt:
            check_flat_parameter_views(sub, name)  # FSDP1 without use_orig_params
        for pname, param in sub._parameters.items():
            if param is None:
                continue
            qualified = f"{name}.{pname}" if name else pname
            phits = _matches(qualified, None, None, specs) if specs else set()
            matched |= phits
            p_exempt = exempt or bool(phits)
            pseen = param_status.get(id(param))
            if pseen is not None and pseen[0] != p_exempt:
                trainable, frozen = (pseen[1], qualified) if pseen[0] else (qualified, pseen[1])
                raise ValueError(
                    "a parameter reachable under two names (tied weights) must be frozen or "
                    f"trainable under both; it is a trainable exception as {trainable!r} but "
                    f"frozen as {frozen!r}. Make trainable= match both names, or neither"
                )
            param_status[id(param)] = (p_exempt, qualified)
            if p_exempt:
                continue
            if is_lazy(param):
                raise ValueError(
                    f"{qualified!r} of {type(module).__name__} is an uninitialized lazy "
                    "parameter; run one forward with a real batch (a dry run) before "
                    "freezing, so that it has a shape"
                )
            params.setdefault(id(param), param)
            slots.append((sub, pname, param))
        if exempt:
            continue

        def exempt_child(
            child_name: str, child: nn.Module, name: str = name, parent: nn.Module = sub
        ) -> bool:
            qualified = f"{name}.{child_name}" if name else child_name
            return bool(specs) and bool(_matches(qualified, child, parent, specs))

        kinds = 0
        if _is_norm(sub):
            kinds = EVAL | CHECK if policy.bn == "eval" else 0
        elif _is_dropout(sub):
            kinds = EVAL if policy.dropout == "eval" else 0
        else:
            quant = _quant_kind(sub)
            if quant:
                kinds = quant | CHECK if quant == OBSERVER else quant
            elif _has_buffers(sub):
                # Eval keeps the buffers still; under dropout="train" a module that also
                # draws dropout keeps its mode, and its buffers are checked instead.
                noisy = policy.dropout == "train" and _draws_dropout(sub, exempt_child)
                kinds = CHECK if noisy else EVAL | CHECK
            elif policy.dropout == "eval" and _draws_dropout(sub, exempt_child):
                kinds = EVAL  # functional dropout (attention) follows its own flag
        if _is_scripted(sub):
            if parent is None or not _is_scripted(parent):
                watch.append((sub, ENTRY, name))
            if kinds & EVAL:
                scripted.append((sub, name))
        elif kinds:
            watch.append((sub, kinds, name))
    # FSDP2 registers an unsharded copy between all-gather and reshard and copies
    # requires_grad from the sharded parameter at the next all-gather: freeze that one too.
    for sharded in fsdp2_sharded_counterparts(slots):
        params.setdefault(id(sharded), sharded)
    return Plan(
        module=module,
        params=list(params.values()),
        watch=watch,
        scripted=scripted,
        slots=slots,
        matched=matched,
        names=names,
        # A rule may depend on more than the tree: such plans are not reused.
        signature=None
        if any(isinstance(r, TrainableRule) and not r.tree_only for r in specs)
        else _Signature.of(modules),
        fast=policy.fast,
    )


def check_patterns_matched(policy: FreezePolicy, plans: Iterable[Plan], where: str) -> None:
    """Raise if an entry of ``policy.trainable`` matched nothing in any planned module."""
    matched: set[int] = set()
    for plan in plans:
        matched |= plan.matched
    missing = [spec for i, spec in enumerate(policy.trainable) if i not in matched]
    if missing:
        raise ValueError(
            f"trainable entries must each match a submodule, parameter or module type in "
            f"{where}; these matched nothing: {missing!r}"
        )


# --- the registry ------------------------------------------------------------------------

_LOCK = threading.RLock()
_HOLD_IDS = itertools.count(1)


class _Gone:
    pass


#: A reference that was never alive: what a record refers to while it is not held.
_NOREF: weakref.ref[Any] = weakref.ref(_Gone())


class _ParamRecord:
    """A parameter's registry entry: its holders and the flag it had before the first.

    A record refers to its parameter (weakly) only while it is held: a weak reference
    left on a parameter between holds would make ``torch.utils.swap_tensors`` (used by
    ``module.to()`` under ``torch.__future__.set_swap_module_params_on_conversion`` and
    for tensor subclasses such as DTensor) refuse to convert the model.
    """

    __slots__ = ("forget", "holders", "ref", "requires_grad")

    def __init__(self, key: int, requires_grad: bool) -> None:
        self.ref: weakref.ref[nn.Parameter] = _NOREF
        self.forget = _forget_param(key)
        self.requires_grad = requires_grad
        self.holders: set[int] = set()


class _Watch:
    __slots__ = ("holders", "hooks_key", "kinds", "name", "ref", "scripted")

    def __init__(self, module: nn.Module, name: str) -> None:
        self.ref: weakref.ref[nn.Module] = weakref.ref(module, _forget_watch(id(module)))
        self.name = name
        self.holders: dict[int, int] = {}
        self.kinds = 0
        self.scripted: dict[int, list[tuple[weakref.ref[nn.Module], str]]] = {}
        self.reset(module)

    def reset(self, module: nn.Module) -> None:
        """Empty, for a first hold: the module's hook dictionary is looked up again."""
        hooks = module.__dict__.get("_forward_hooks")
        self.hooks_key = id(hooks) if hooks is not None else None
        self.holders.clear()
        self.scripted.clear()
        self.kinds = 0

    def update(self) -> None:
        kinds = 0
        for k in self.holders.values():
            kinds |= k
        self.kinds = kinds


class _Static:
    __slots__ = ("holders", "ref", "training", "versions")

    def __init__(self, module: nn.Module) -> None:
        self.ref: weakref.ref[nn.Module] = weakref.ref(module)
        self.training = module.training
        self.versions = _versions(module)
        self.holders: set[int] = set()


class _Call:
    __slots__ = (
        "depth", "frame", "module", "observer", "snapshot", "thread", "training", "versions",
    )  # fmt: skip

    def __init__(self, module: nn.Module, frame: FrameType | None) -> None:
        self.module = module
        # The frame of torch's ``_call_impl`` that opened the call, and its thread: a call
        # whose frame is no longer running was cut short (below).
        self.frame = frame
        self.thread = threading.get_ident()
        self.depth = 0
        self.training: bool | None = None
        self.observer: int | None = None
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.versions: dict[str, tuple[torch.Tensor, int]] | None = None


_PARAMS: dict[int, _ParamRecord] = {}
_JOINS = [0]  # counts acquisitions that overlapped an existing hold
_WATCH: dict[int, _Watch] = {}
_BY_HOOKS: dict[int, _Watch] = {}  # id(module._forward_hooks) -> watch, for replicas
_STATIC: dict[int, _Static] = {}
_CALLS: dict[int, _Call] = {}
_THREADS = threading.local()


def _forget_param(key: int) -> Callable[[object], None]:
    def forget(_: object) -> None:
        with _LOCK:
            record = _PARAMS.get(key)
            if record is not None and record.ref() is None:
                del _PARAMS[key]
                _sync_hooks()

    return forget


def _forget_watch(key: int) -> Callable[[object], None]:
    def forget(_: object) -> None:
        with _LOCK:
            entry = _WATCH.get(key)
            if entry is not None and entry.ref() is None:
                del _WATCH[key]
                if entry.hooks_key is not None and _BY_HOOKS.get(entry.hooks_key) is entry:
                    del _BY_HOOKS[entry.hooks_key]
                _sync_hooks()

    return forget


def _versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (b, b._version) for k, b in module._buffers.items() if b is not None}


def _changed(module: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    now = {k: b for k, b in module._buffers.items() if b is not None}
    out = [k for k, (b, v) in before.items() if now.get(k) is not b or b._version != v]
    return out + sorted(set(now) - set(before))


def _set_training(module: nn.Module, mode: bool) -> None:
    if "training" in module.__dict__:
        module.__dict__["training"] = mode  # plain modules: no __setattr__ machinery
    else:
        module.training = mode  # TorchScript modules keep it in C++


def is_frozen(obj: torch.Tensor | nn.Module) -> bool:
    """Whether a parameter, or every parameter of a module, is held frozen by freezesched.

    Args:
        obj: A parameter, or a module (a module without parameters is never frozen).

    Raises:
        TypeError: ``obj`` is neither a tensor nor a module.

    Examples:
        >>> from freezesched import freeze
        >>> layer = nn.Linear(2, 2)
        >>> with freeze(layer):
        ...     is_frozen(layer.weight), is_frozen(layer)
        (True, True)
        >>> is_frozen(layer.weight), is_frozen(layer)
        (False, False)
    """

    def held(p: torch.Tensor) -> bool:
        record = _PARAMS.get(id(p))
        return record is not None and record.ref() is p and bool(record.holders)

    if isinstance(obj, nn.Module):
        params = list(obj.parameters())
        return bool(params) and all(held(p) for p in params)
    if isinstance(obj, torch.Tensor):
        return held(obj)
    raise TypeError(f"obj must be a parameter or an nn.Module, got {describe(obj)}")


def restored_requires_grad(param: torch.Tensor) -> bool:
    """The ``requires_grad`` a parameter has once no hold of freezesched freezes it.

    For a parameter freezesched holds, the flag it had before the first hold (what releasing
    gives back); for any other, its flag now.
    """
    with _LOCK:
        record = _PARAMS.get(id(param))
        if record is not None and record.ref() is param and record.holders:
            return record.requires_grad
        return param.requires_grad


@contextlib.contextmanager
def thawed(params: Iterable[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Give frozen parameters their own ``requires_grad`` back for a block; refreeze after.

    For tools that read ``requires_grad`` to decide what to save or load (e.g.
    ``torch.distributed.checkpoint``'s ``set_state_dict``, which loads optimizer state
    only for parameters that require grad), not for training: the holds stay, and on
    exit every parameter that is still held is frozen again with ``.grad = None``.

    Args:
        params: Restrict to these parameters (default: every frozen one).

    Yields:
        The parameters that were thawed.

    Examples:
        >>> from freezesched import freeze
        >>> layer = nn.Linear(2, 2)
        >>> with freeze(layer):
        ...     with thawed() as thawed_params:
        ...         print(layer.weight.requires_grad, len(thawed_params))
        ...     print(layer.weight.requires_grad)
        True 2
        False
    """
    wanted = None if params is None else {id(p) for p in params}
    done: list[torch.Tensor] = []
    with _LOCK:
        for key, record in list(_PARAMS.items()):
            param = record.ref()
            if param is None or (wanted is not None and key not in wanted):
                continue
            if record.requires_grad and not param.requires_grad:
                param.requires_grad = True
                done.append(param)
    try:
        yield list(done)
    finally:
        with _LOCK:
            for thawed_param in done:
                held = _PARAMS.get(id(thawed_param))
                if held is not None and held.ref() is thawed_param and held.holders:
                    thawed_param.requires_grad = False
                    thawed_param.grad = None


# --- the global forward hooks -------------------------------------------------------------

#: Our slot in torch's global forward-hook dictionaries: always the same key and the same
#: functions, so that torch.compile's guards see the same hooks every time a freeze starts
#: and reuse the graphs they compiled for it instead of recompiling.
_HOOK_KEY = -0x46_53_5A  # "FSZ"
_COMPILE_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def _lookup(module: nn.Module) -> _Watch | None:
    entry = _WATCH.get(id(module))
    if entry is not None:
        return entry if entry.ref() is module else None
    if _BY_HOOKS and module.__dict__.get("_is_replica", False):
        entry = _BY_HOOKS.get(id(module.__dict__.get("_forward_hooks")))
        original = entry.ref() if entry is not None else None
        if original is not None and original._forward_hooks is module._forward_hooks:
            return entry
    return None


def _open_calls() -> list[int]:
    calls: list[int] | None = getattr(_THREADS, "calls", None)
    if calls is None:
        calls = _THREADS.calls = []
    return calls


def _pre_hook(module: nn.Module, args: Any) -> None:
    check_call(module, is_frozen)  # DDP / DeepSpeed settings that freezing would break
    if _compiling():  # traced once per freeze state: only the mode matters in a graph
        traced = _WATCH.get(id(module))
        if traced is not None and traced.kinds & EVAL:
            module.__dict__["_freezesched_mode"] = module.training
            module.training = False
        return
    entry = _lookup(module)
    if entry is None:
        return
    with _LOCK:
        call = _CALLS.get(id(module))
        if call is not None and _cut_short(call):
            # A KeyboardInterrupt inside an earlier call of this module skipped torch's
            # post-hook (it runs for Exception only): close that call, so that this one
            # pins the mode and checks the buffers again.
            while _CALLS.get(id(module)) is call:
                _close_call(id(module))
            call = None
        if call is None:
            call = _Call(module, sys._getframe(1))
            kinds = entry.kinds
            if kinds & EVAL:
                call.training = module.training
                _set_training(module, False)
            if kinds & OBSERVER:
                enabled: torch.Tensor = module.observer_enabled  # type: ignore[assignment]
                call.observer = int(enabled[0])
                enabled[0] = 0
            if kinds & RESTORE:
                call.snapshot = {k: b.clone() for k, b in module._buffers.items() if b is not None}
            if kinds & CHECK:
                call.versions = _versions(module)
            if kinds & ENTRY:
                for pins in entry.scripted.values():
                    for ref, _ in pins:
                        inner = ref()
                        if inner is not None and inner.training:
                            _set_training(inner, False)
            _CALLS[id(module)] = call
        call.depth += 1
        _open_calls().append(id(module))


def _cut_short(call: _Call) -> bool:
    """Whether ``call`` was opened in this thread by a frame that is no longer running."""
    if call.thread != threading.get_ident() or call.frame is None:
        return False
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame is call.frame:
            return False  # a nested call of the same module (recursion)
        frame = frame.f_back
    return True


def _post_hook(module: nn.Module, args: Any, output: Any) -> None:
    if _compiling():
        if "_freezesched_mode" in module.__dict__:
            module.training = module.__dict__.pop("_freezesched_mode")
        return
    if id(module) not in _CALLS:
        return
    changed = _close_call(id(module))
    if changed:
        entry = _lookup(module)
        name = entry.name if entry is not None else "?"
        raise RuntimeError(
            f"{type(module).__name__} {_label(name)} of a frozen module changed its buffers "
            f"{changed} during its forward. freezesched keeps the buffers of frozen modules "
            "bitwise unchanged, and it does not know how to stop this module from updating "
            "them. If it may update them while frozen, list it as a trainable exception "
            f"(trainable=[{type(module).__name__}] or its name)"
        )


def _close_call(key: int) -> list[str]:
    """End one call on the module ``key``; return the buffers it changed (if checked)."""
    with _LOCK:
        call = _CALLS.get(key)
        if call is None:
            return []
        calls = _open_calls()
        for i in range(len(calls) - 1, -1, -1):
            if calls[i] == key:
                del calls[i]
                break
        call.depth -= 1
        if call.depth > 0:
            return []
        del _CALLS[key]
        module = call.module
        changed = _changed(module, call.versions) if call.versions is not None else []
        if call.snapshot is not None:
            for k, saved in call.snapshot.items():
                buffer = _get(module._buffers, k)
                if buffer is not None:
                    with torch.no_grad():
                        if buffer.shape != saved.shape:  # a first observation resizes it
                            buffer.resize_(saved.shape)
                        buffer.copy_(saved)
        if call.observer is not None:
            enabled: torch.Tensor = module.observer_enabled  # type: ignore[assignment]
            enabled[0] = call.observer
        if call.training is not None:
            _set_training(module, call.training)
        _sync_hooks()
        return changed


def _sync_hooks() -> None:
    """Install the global hooks while anything is held or a call is open; else remove them."""
    pre = _torch_module._global_forward_pre_hooks
    post = _torch_module._global_forward_hooks
    always = _torch_module._global_forward_hooks_always_called
    active = bool(_PARAMS or _WATCH or _CALLS)
    _sync_interrupts(active)
    if active:
        if pre.get(_HOOK_KEY) is not _pre_hook:
            pre[_HOOK_KEY] = _pre_hook
            post[_HOOK_KEY] = _post_hook
            always[_HOOK_KEY] = True
            # torch.compile warns on every call of a compiled module while any global hook
            # exists; ours does nothing for modules it does not watch.
            warnings.filterwarnings("ignore", message=_COMPILE_WARNING, category=UserWarning)
    elif _HOOK_KEY in pre:
        pre.pop(_HOOK_KEY, None)
        post.pop(_HOOK_KEY, None)
        always.pop(_HOOK_KEY, None)
        kept = [f for f in warnings.filters if getattr(f[1], "pattern", None) != _COMPILE_WARNING]
        if len(kept) != len(warnings.filters):
            warnings.filters[:] = kept  # type: ignore[index]
            mutated = getattr(warnings, "_filters_mutated", None)
            if mutated is not None:
                mutated()


# --- holds ----------------------------------------------------------------------------


# --- Ctrl-C ---------------------------------------------------------------------------
# A KeyboardInterrupt raised half-way through freezing or restoring would leave a model
# half frozen. While anything is held, SIGINT goes (in the main thread) to a handler that
# only records the signal while freezesched is changing holds (the main thread's
# critical depth is above zero), and hands it on at once otherwise. Leaving the outermost
# critical section delivers a recorded signal to the handler that was there before, once
# the model is consistent. The depth is lowered as the last step before returning, with
# no call in between, so no signal can fall into a gap (Python runs signal handlers only
# at calls and loops).

_DEPTH = [0]  # the main thread's critical depth
#: CPython's C signal module, which ``signal`` wraps with enum conversions that cost more
#: than the call (and showed up in every guarded step).
_signal = importlib.import_module("_signal")
_PENDING: list[tuple[int, FrameType | None]] = []
_PREVIOUS: list[Any] = []  # the SIGINT handler ours replaced, while ours is installed
#: Code of the public methods that enter or leave holds: a signal arriving in their first
#: lines, before they raise the depth, must wait too.
_CRITICAL_CODE: set[Any] = set()


_F = TypeVar("_F", bound=Callable[..., Any])


def critical(func: _F) -> _F:
    """Mark a method that enters or leaves holds (see the comment above); returns it."""
    _CRITICAL_CODE.add(func.__code__)
    return func


def _in_critical(frame: Any) -> bool:
    depth = 0
    while frame is not None and depth < 8:
        if frame.f_code in _CRITICAL_CODE:
            return True
        frame, depth = frame.f_back, depth + 1
    return False


def is_main_thread() -> int:
    """1 in the main thread (where signals arrive), else 0: what to add to the depth.

    A critical section is::

        main, added = is_main_thread(), 0
        try:
            _DEPTH[0], added = _DEPTH[0] + main, main  # one statement, no call
            ...
        finally:
            _DEPTH[0] -= added
    """
    return int(threading.current_thread() is threading.main_thread())


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _DEPTH[0] > 0 or _in_critical(frame):
        _PENDING.append((signum, frame))
        return
    _call_previous(signum, frame)


def _call_previous(signum: int, frame: FrameType | None) -> None:
    previous = _PREVIOUS[0] if _PREVIOUS else signal.default_int_handler
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # SIG_DFL cannot be called: it is an interrupt
        raise KeyboardInterrupt


def _sync_interrupts(active: bool) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    # The C module directly: the ``signal`` module's enum conversions made this a tenth
    # of a guarded step's cost.
    if active and not _PREVIOUS:
        previous = _signal.getsignal(signal.SIGINT)
        if previous is None:  # installed from outside Python: leave it alone
            return
        _PREVIOUS.append(previous)
        _signal.signal(signal.SIGINT, _on_sigint)
    elif not active and _PREVIOUS and not _PENDING:
        previous = _PREVIOUS.pop()
        if _signal.getsignal(signal.SIGINT) is _on_sigint:
            _signal.signal(signal.SIGINT, previous)


def interrupt_pending() -> bool:
    """Whether a Ctrl-C is waiting for the current critical operation to finish."""
    return bool(_PENDING)


def deliver_interrupt() -> None:
    """Outside every critical section: hand a recorded Ctrl-C to the previous handler."""
    if not _PENDING or _DEPTH[0] > 0:
        return
    signum, frame = _PENDING[0]
    _PENDING.clear()
    try:
        _call_previous(signum, frame)
    finally:
        _sync_interrupts(bool(_PARAMS or _WATCH or _CALLS))


def _run_all(steps: Sequence[Callable[[], object]]) -> None:
    """Run every step, each again if it raised (steps are idempotent); then raise.

    The first error is raised once every step has run.
    """
    error: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as first:
            error = error or first
            try:
                step()
            except BaseException as second:
                error = error or second
    if error is not None:
        raise error


class Hold:
    """One active hold: the changes of one :class:`Plan`, undone by :meth:`release`."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.key = next(_HOLD_IDS)
        self.active = False
        self._used: list[_ParamRecord] = []  # the registry record each parameter got
        # Set when this hold acquired all its parameters (watches) while nothing else held
        # any of them: then, unless a hold joined since (_JOINS moved), it releases them
        # all at once.
        self._solo_params: int | None = None
        self._solo_watch: int | None = None

    # Each step below is idempotent and keyed by this hold, so a step cut short by an
    # exception can simply be run again, and undoing a step never touches another hold.
    # The registry entries are the plan's own (made once per plan, reused by every hold
    # of it): a guard enters a cached plan on every step, so each step costs a few
    # dictionary operations per parameter and watched module, and no allocation.

    def _hold_params(self) -> None:
        key, plan = self.key, self.plan
        records = plan.records()
        if _PARAMS.keys().isdisjoint(plan.param_ids):
            # Nothing else holds any of them (one guard, one region: the usual case).
            self._used = [record for _, record in records]
            ref = weakref.ref
            for param, record in records:
                record.ref = ref(param, record.forget)
                record.requires_grad = param.requires_grad
                record.holders.clear()  # (empty: a record leaves the registry when it is)
                record.holders.add(key)
                param.requires_grad = False
                # A stale (even all-zero) .grad would let weight decay and momentum move it.
                param.grad = None
            _PARAMS.update(zip(plan.param_ids, self._used, strict=True))
            self._solo_params = _JOINS[0]
            return
        _JOINS[0] += 1  # holds overlap: every hold releases entry by entry from now on
        used: list[_ParamRecord] = []
        self._used = used
        get = _PARAMS.get
        for param, mine in records:
            found = get(id(param))
            if found is not None and found.ref() is param:
                record = found
            else:
                mine.ref = weakref.ref(param, mine.forget)
                mine.requires_grad = param.requires_grad
                mine.holders.clear()
                record = _PARAMS[id(param)] = mine
            used.append(record)
            record.holders.add(key)
            param.requires_grad = False
            param.grad = None

    def _release_params(self, freed: list[nn.Parameter]) -> None:
        key = self.key
        if self._solo_params == _JOINS[0]:
            # Acquired whole, alone, and no hold joined since: every record is ours alone.
            for param, record in zip(self.plan.params, self._used, strict=True):
                param.requires_grad = record.requires_grad
            for record in self._used:
                record.holders.clear()
                record.ref = _NOREF
            pop = _PARAMS.pop
            for i in self.plan.param_ids:
                pop(i, None)
            freed.extend(self.plan.params)
            self._solo_params = None  # done: a rerun finds nothing held (below)
            return
        seen = set(map(id, freed))  # (filled only when this step runs again)
        # _used is shorter than params if acquiring stopped half-way.
        for param, record in zip(self.plan.params, self._used, strict=False):
            holders = record.holders
            if key not in holders:
                continue  # not held by this hold, or already released
            if len(holders) == 1:
                # The last holder: restore first and drop our key last, so that a run cut
                # short in between is completed by the next one.
                param.requires_grad = record.requires_grad
                if _PARAMS.get(id(param)) is record:
                    del _PARAMS[id(param)]
                    record.ref = _NOREF
                if id(param) not in seen:
                    seen.add(id(param))
                    freed.append(param)
            holders.discard(key)
            if not holders:  # (also one never registered: acquiring stopped half-way)
                record.ref = _NOREF

    def _watch_all(self) -> None:
        key, plan = self.key, self.plan
        fast = _WATCH.keys().isdisjoint(plan.watch_ids)
        if not fast:
            _JOINS[0] += 1
        for module, kinds, name, mine in plan.watches():
            entry = None if fast else _WATCH.get(id(module))
            if entry is None or entry.ref() is not module:
                mine.reset(module)
                mine.holders[key] = kinds  # before it is registered: release finds it held
                mine.kinds = kinds
                entry = _WATCH[id(module)] = mine
                if entry.hooks_key is not None:
                    _BY_HOOKS[entry.hooks_key] = entry
            else:
                entry.holders[key] = kinds
                entry.kinds |= kinds
            if kinds & ENTRY:
                entry.scripted[key] = [
                    (weakref.ref(m), n)
                    for m, n in plan.scripted
                    if m is module or n.startswith(f"{name}.") or not name
                ]
        if fast:
            self._solo_watch = _JOINS[0]

    def _unwatch_all(self) -> None:
        key = self.key
        if self._solo_watch == _JOINS[0] and not _CALLS:
            # Acquired whole, alone, and no hold joined since (and no call left open).
            for module, _, _, entry in self.plan.watches():
                if _WATCH.get(id(module)) is entry:
                    del _WATCH[id(module)]
                if entry.hooks_key is not None and _BY_HOOKS.get(entry.hooks_key) is entry:
                    del _BY_HOOKS[entry.hooks_key]
                entry.holders.clear()
                entry.scripted.clear()
                entry.kinds = 0
            self._solo_watch = None
            return
        for module, _, _, _ in self.plan.watches():
            found = _WATCH.get(id(module))
            if found is None or found.ref() is not module or key not in found.holders:
                continue
            entry = found
            # A call this thread left open (a KeyboardInterrupt inside forward skips the
            # post-hook) must not keep the module pinned.
            if _CALLS and id(module) in _CALLS and id(module) in _open_calls():
                while id(module) in _CALLS and id(module) in _open_calls():
                    _close_call(id(module))
            if len(entry.holders) == 1:
                # The last holder: unregister first and drop our key last, so that a run
                # cut short in between is completed by the next one.
                if _WATCH.get(id(module)) is entry:
                    del _WATCH[id(module)]
                if entry.hooks_key is not None and _BY_HOOKS.get(entry.hooks_key) is entry:
                    del _BY_HOOKS[entry.hooks_key]
            entry.scripted.pop(key, None)
            del entry.holders[key]
            entry.update()

    def _pin_static(self, module: nn.Module) -> None:
        entry = _STATIC.get(id(module))
        if entry is None or entry.ref() is not module:
            entry = _STATIC[id(module)] = _Static(module)
        entry.holders.add(self.key)
        _set_training(module, False)

    def _unpin_static(self, module: nn.Module, problems: list[str]) -> None:
        entry = _STATIC.get(id(module))
        if entry is None or entry.ref() is not module:
            return
        entry.holders.discard(self.key)
        if entry.holders:
            return
        changed = _changed(module, entry.versions)
        if changed:
            problems.append(f"{_label(self.plan.names.get(id(module), '?'))}: {changed}")
        _set_training(module, entry.training)
        del _STATIC[id(module)]

    def acquire(self) -> None:
        """Apply the plan: all of it, or (if anything fails) none of it.

        Call it inside a critical section (:func:`enter_critical`).
        """
        plan = self.plan
        if plan.fast is not None:  # refusals come before any change
            _fast.check_fast(
                plan.module,
                scripted=bool(plan.scripted) or any(k & ENTRY for _, k, _ in plan.watch),
                observers=any(k & (OBSERVER | RESTORE) for _, k, _ in plan.watch),
            )
        _sync_interrupts(True)  # from here on a Ctrl-C waits until the model is consistent
        with _LOCK:
            try:
                self.active = True  # from the first change on, release() undoes it
                self._hold_params()
                self._watch_all()
                for module, _ in plan.scripted:
                    self._pin_static(module)
                _sync_hooks()
                if plan.fast is not None:
                    evals = {id(m) for m, k, _ in plan.watch if k & EVAL}
                    _fast.attach(plan.module, plan.fast, evals, self.key)
            except BaseException:
                self.release()
                raise

    def sole_params(self) -> list[nn.Parameter]:
        """The parameters that only this hold keeps frozen (they unfreeze on release)."""
        out = []
        for param in self.plan.params:
            record = _PARAMS.get(id(param))
            if record is not None and record.ref() is param and record.holders == {self.key}:
                out.append(param)
        return out

    def release(self) -> list[nn.Parameter]:
        """Undo this hold (idempotent); return the parameters it was the last to hold.

        Restoring always completes; an error met on the way (or a TorchScript buffer
        found changed) is raised afterwards.
        """
        if not self.active:
            return []
        plan = self.plan
        freed: list[nn.Parameter] = []
        problems: list[str] = []

        def params() -> None:
            self._release_params(freed)

        def slots() -> None:
            # A parameter replaced inside the hold (``m.weight = Parameter(...)``,
            # ``load_state_dict(assign=True)``) inherited requires_grad=False from the
            # frozen one; it gets the flag the replaced one has again.
            if plan.slots_unchanged():
                return
            for owner, attr, original in plan.slots:
                now = _get(owner._parameters, attr)
                if now is None or now is original:
                    continue
                before = _PARAMS.get(id(original))
                flag = (
                    before.requires_grad
                    if before is not None and before.ref() is original and before.holders
                    else original.requires_grad
                )
                if not flag:
                    continue
                held = _PARAMS.get(id(now))
                if held is not None and held.ref() is now and held.holders:
                    # Frozen by another hold too, which took its inherited False for the
                    # flag to restore: give that hold the replaced parameter's flag.
                    held.requires_grad = True
                elif not now.requires_grad:
                    now.requires_grad = True

        steps: list[Callable[[], object]] = [params, slots]
        if plan.fast is not None:
            steps.insert(0, functools.partial(_fast.detach, plan.module, self.key))
        steps.append(self._unwatch_all)
        steps += [functools.partial(self._unpin_static, m, problems) for m, _ in plan.scripted]
        steps.append(_sync_hooks)
        with _LOCK:
            _run_all(steps)
            self.active = False
        if problems:
            raise RuntimeError(
                "buffers of TorchScript modules changed while they were frozen: "
                f"{'; '.join(problems)}. TorchScript runs submodules without Python hooks, "
                "so freezesched puts them in eval mode for the whole region and checks their "
                "buffers at its end. Either a .train() call on the scripted model inside the "
                "region switched them back (call .train() before entering the region, or "
                "freeze before scripting), or a load_state_dict wrote them (expected if you "
                "loaded them: load before freezing or after)"
            )
        return freed
