"""Fast frozen mode: while a module is frozen, run a cheaper, verified copy of it.

A frozen module is a constant function for as long as its weights do not change. With
``FreezePolicy(fast=FastFrozen(...))``, each module frozen by the guard, ``freeze`` or
the controller runs, while it is held, a *twin* (see :mod:`._twin`): a private copy with
BatchNorm folded into the preceding convolution or linear layer, optionally channels-last,
in bfloat16/float16, compiled by inductor with its weights frozen into constants; and,
with a :class:`FeatureCache`, the outputs of a frozen prefix are served per sample.

The guarantees (each tested, see ``docs/fast.md``):

* **Never stale.** Before every call the twin is checked against the module: the identity,
  ``_version`` and storage of each parameter, buffer and tensor held in a plain attribute,
  the submodule tree (modules held in plain attributes included) and each submodule's class,
  the modes, and the hooks. Any change torch records (an optimizer step,
  ``load_state_dict``, ``.to()``, assigning a parameter, ``.data = ...``) rebuilds the twin
  before it is used, and so does a changed scalar attribute of a submodule (``eps``,
  ``stride``). When a hold is attached, a few sampled elements of every tensor are compared
  too (writes torch does not record: fused optimizers, collectives). Each twin serves one
  rank and dtype per input. The first output of every new twin is compared with the plain
  frozen forward and the plain output is returned, and every ``verify_every`` calls the
  comparison is repeated (it also catches writes torch does not record inside a region, such
  as ``p.data.copy_(...)``).
* **Exact where it cannot be fast.** Whenever the twin cannot give the plain frozen
  forward's result and gradients, the plain forward runs and the reason is counted in the
  report (and warned once): trainable tensors reaching the module
  (``functional_call``, ``requires_grad`` set), hooks on a submodule, global module hooks
  (a profiler), keyword or non-tensor arguments, an input on another device. TorchScript
  or FX tracing and an outer ``torch.compile`` (which optimises the plain forward itself)
  always see the plain forward; those calls are not counted in the report. A
  low-precision or compiled twin is not used when the input requires grad (a frozen
  middle stage): the float32 folded twin passes the input gradient back.
* **Nothing left behind.** The originals are never written. While a fast hold is active
  the module carries two instance attributes, ``forward`` and ``__getstate__``; copies and
  pickles taken meanwhile leave them out, and both are removed when the last fast hold
  ends. Twins are kept (weakly keyed by module) across holds, so that the next frozen
  region reuses them, and dropped when a guard or controller makes the module trainable,
  when its weights changed, when it is freed, or by :func:`drop_fast`.
"""

from __future__ import annotations

import math
import operator
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from freezesched._validation import check_int, describe
from freezesched.freezing._features import (
    FeatureCache,
    FeatureCacheMismatchError,
    FeatureStore,
    current_keys,
    other_input,
    split,
)
from freezesched.freezing._twin import Twin, build_twin

__all__ = [
    "FastFrozen",
    "FastMismatchError",
    "FastModeWarning",
    "FastReport",
    "attach",
    "check_fast",
    "detach",
    "drop_fast",
    "fast_report",
]

FastDtype = Literal["bfloat16", "float16"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

#: Default ``(rtol, atol)`` per effective precision: ``|fast - plain| <= atol + rtol * scale``
#: with ``scale`` the largest ``|plain|`` of the output. float32: about 10x the largest
#: folding error measured (9e-5 relative on a ResNet-50 backbone with 53 folded norms;
#: 8e-6 on a ResNet-18; <= 4e-7 on small random nets); low precision: about 10x the
#: error of ResNet-18-sized and random nets (a deeper net may exceed it, and then runs
#: plainly: the first check refuses the twin). See docs/fast.md.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-3, 1e-6),
    torch.float16: (2e-2, 1e-4),
    torch.bfloat16: (1e-1, 1e-3),
}


class FastModeWarning(UserWarning):
    """Fast mode ran something plainly, or could not fold or trace part of a module."""


class FastMismatchError(RuntimeError):
    """A fast twin's output differs from the plain frozen forward beyond the tolerance."""


@dataclass(frozen=True)
class FastFrozen:
    """Opt-in fast frozen mode: how a frozen module may run faster than plainly.

    A frozen module computes a fixed function while its weights do not change; fast mode
    runs a private twin of it instead (see ``docs/fast.md`` for what changes numerically
    and when not to use it). It needs ``bn="eval"``, ``dropout="eval"`` and no
    ``trainable`` exceptions in the policy. The original parameters and buffers are never
    written; every new twin is checked against the plain forward on its first call.

    Args:
        fold_bn: Fold BatchNorm (and torchvision's ``FrozenBatchNorm2d``) into the
            preceding convolution or linear layer, with torch's fusion utilities. Norm
            layers that cannot be folded are left as they are and listed in the report.
        channels_last: Run 4-D convolutions in channels-last memory format (outputs are
            returned in the memory format the plain forward gives).
        dtype: ``"bfloat16"`` or ``"float16"``: run a low-precision copy (outputs cast back
            to the plain forward's dtype); ``None`` keeps the module's dtype. Only used
            when the input needs no gradient.
        compile: Compile the twin with inductor, weights frozen into constants
            (``freezing``). Compiled once per weight state; only used when the input needs
            no gradient. Compiling takes seconds to minutes.
        cache: A :class:`FeatureCache` to serve a frozen prefix's outputs per sample.
        rtol: Relative tolerance of the checks against the plain forward (default per
            precision: 1e-3 float32, 2e-2 float16, 1e-1 bfloat16).
        atol: Absolute tolerance of the checks (default per precision: 1e-6, 1e-4, 1e-3).
        verify_every: Compare the twin with the plain forward every this many calls
            (``0``: only on each twin's first call).

    Raises:
        TypeError, ValueError: a field has the wrong type or value.

    Examples:
        >>> FastFrozen(channels_last=True).tolerance(torch.float32)
        (0.001, 1e-06)
        >>> FastFrozen(dtype="bfloat16").tolerance(torch.float32)
        (0.1, 0.001)
    """

    fold_bn: bool = True
    channels_last: bool = False
    dtype: FastDtype | None = None
    compile: bool = False
    cache: FeatureCache | None = None
    rtol: float | None = None
    atol: float | None = None
    verify_every: int = 1000

    def __post_init__(self) -> None:
        for name in ("fold_bn", "channels_last", "compile"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {describe(value)}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be one of {sorted(_DTYPES)} or None, got {describe(self.dtype)}"
            )
        if self.cache is not None and not isinstance(self.cache, FeatureCache):
            raise TypeError(f"cache must be a FeatureCache or None, got {describe(self.cache)}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number >= 0 or None, got {describe(value)}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        check_int(self.verify_every, "verify_every")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype``."""
        return None if self.dtype is None else _DTYPES[self.dtype]

    def tolerance(self, *dtypes: torch.dtype | None) -> tuple[float, float]:
        """``(rtol, atol)`` for outputs computed in the lowest of these and ``dtype``."""
        found = [d for d in (*dtypes, self.torch_dtype) if d in _TOLERANCES]
        rtol, atol = max((_TOLERANCES[d] for d in found), default=_TOLERANCES[torch.float32])
        return (
            self.rtol if self.rtol is not None else rtol,
            self.atol if self.atol is not None else atol,
        )


@dataclass(frozen=True)
class FastReport:
    """What fast mode did for one module: :func:`fast_report` returns it.

    Attributes:
        module: The module's class name.
        folded: ``"conv + bn"`` pairs folded, by qualified name.
        not_folded: ``(name, reason)`` of each norm layer left as it is.
        untraced: ``(name, reason)`` of each submodule run as it is (not traced; ``""`` is
            the module itself).
        channels_last: Whether the twin runs channels-last.
        dtype: The twin's dtype (``None``: the module's).
        compiled: Whether the latest twin is compiled.
        tolerance: ``(rtol, atol)`` of the latest check.
        max_abs_diff: Largest ``|fast - plain|`` at the latest check (``None``: none yet).
        max_rel_diff: ``max_abs_diff`` over the largest ``|plain|``.
        builds: Twins built (each a copy, a trace and a check; a weight change or a new
            mode or autocast setting builds one).
        compiles: Graphs inductor compiled.
        fast_calls: Calls served by a twin.
        plain_calls: ``(reason, calls)`` of calls that ran the plain forward.
        cache_hits: Samples served from the feature cache.
        cache_misses: Samples computed (and stored if the budget allowed).
        cache_verified: Hits recomputed and checked.
        cache_bytes: Bytes held in memory by the feature cache.
    """

    module: str
    folded: tuple[str, ...] = ()
    not_folded: tuple[tuple[str, str], ...] = ()
    untraced: tuple[tuple[str, str], ...] = ()
    channels_last: bool = False
    dtype: str | None = None
    compiled: bool = False
    tolerance: tuple[float, float] = (0.0, 0.0)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    builds: int = 0
    compiles: int = 0
    fast_calls: int = 0
    plain_calls: tuple[tuple[str, int], ...] = ()
    cache_hits: int = 0
    cache_misses: int = 0
    cache_verified: int = 0
    cache_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"fast mode for {self.module}: {self.fast_calls} fast calls, "
            f"{sum(n for _, n in self.plain_calls)} plain, {self.builds} builds, "
            f"{self.compiles} compiles",
            f"  folded {len(self.folded)} norm layers; channels_last={self.channels_last}, "
            f"dtype={self.dtype}, compiled={self.compiled}",
        ]
        if self.max_abs_diff is not None:
            lines.append(
                f"  latest check: max |fast - plain| = {self.max_abs_diff:.3g} "
                f"(relative {self.max_rel_diff:.3g}; tolerance rtol={self.tolerance[0]:g}, "
                f"atol={self.tolerance[1]:g})"
            )
        lines += [f"  not folded: {n or '(module)'}: {r}" for n, r in self.not_folded]
        lines += [f"  not traced: {n or '(module)'}: {r}" for n, r in self.untraced]
        lines += [f"  plain: {r} ({n} calls)" for r, n in self.plain_calls]
        if self.cache_hits or self.cache_misses:
            lines.append(
                f"  feature cache: {self.cache_hits} hits, {self.cache_misses} misses, "
                f"{self.cache_verified} verified, {self.cache_bytes} bytes"
            )
        return "\n".join(lines)


# --- refusals: checked before a hold changes anything ---------------------------------------


def check_fast(module: nn.Module, scripted: bool, observers: bool) -> None:
    """Raise if ``module`` cannot be held in fast mode (nothing is changed).

    Raises:
        ValueError: the module is or contains TorchScript or quantization observers, or
            already has an instance ``forward`` / ``__getstate__`` of someone else's.
    """
    name = type(module).__name__
    if scripted or isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"fast frozen mode cannot run {name}: it is or contains TorchScript, which it "
            "cannot copy and trace; freeze it without fast=, or freeze before scripting"
        )
    if observers:
        raise ValueError(
            f"fast frozen mode cannot run {name}: it contains quantization observers or "
            "fake-quantize modules; freeze it without fast="
        )
    for attr in ("forward", "__getstate__"):
        found = module.__dict__.get(attr)
        if found is not None and not isinstance(found, _FastForward | _GetState):
            raise ValueError(
                f"fast frozen mode must run {name}'s own forward, but it has an instance "
                f"attribute {attr!r} ({describe(found)}), set by a wrapper such as "
                "accelerate's hooks; freeze it without fast=, or freeze the module the "
                "wrapper calls"
            )


# --- the per-module state -------------------------------------------------------------------

_LOCK = threading.RLock()


@dataclass(eq=False)
class _TwinSlot:
    twin: Twin
    variant: str
    out_spec: pytree.TreeSpec
    out_paths: list[str]
    out_dtypes: list[torch.dtype | None]
    out_contiguous: list[bool]
    tolerance: tuple[float, float]
    calls: int = 0


@dataclass(eq=False)
class _Fingerprint:
    """What a twin was built from, checked by :func:`_compare` and :func:`_unchanged`.

    :func:`_compare` and :func:`_attributes_unchanged` run on every call,
    :func:`_unchanged` when a hold is attached.

    Attributes:
        modules: The module and every module it reaches, registered or held in a plain
            attribute (directly or inside a list, tuple or dict).
        types: ``type`` of each of ``modules`` (``m.__class__ = Other`` changes no
            attribute).
        shape: ``len`` of each module's ``_parameters``, ``_buffers`` and ``_modules``.
        edges: ``(parent, name, child)`` of each registered submodule.
        tensors: ``(holder, name, tensor, _version, data_ptr)`` of each parameter, buffer and
            tensor held in a plain attribute; ``tensor`` is ``None`` for a ``None`` slot.
        refs: ``(container, key, value)``: a plain attribute (or container element) that
            holds tensors or modules, checked by identity.
        sizes: ``(container, len)`` of the lists and dicts among them.
        device: The device of the first floating parameter or buffer.
        attributes: ``(__dict__, len, getter, values)`` of each module: the scalar
            attributes (and an instance ``forward``) its forward may read.
        samples: Per device, ``(views, values)``: a few elements of every tensor, as byte
            views of the tensors' memory (which also keep each storage alive, so that a
            replaced storage cannot come back at the same address), and their values.
    """

    modules: list[nn.Module]
    shape: list[tuple[int, int, int]]
    edges: list[tuple[nn.Module, str, nn.Module]]
    tensors: list[tuple[dict[Any, Any], Any, torch.Tensor | None, int, int]]
    device: torch.device | None
    refs: list[tuple[Any, Any, object]] = field(default_factory=list)
    sizes: list[tuple[Any, int]] = field(default_factory=list)
    attributes: list[tuple[dict[str, Any], int, Callable[[Any], Any] | None, Any]] = field(
        default_factory=list
    )
    samples: list[tuple[list[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    types: list[type] = field(default_factory=list)


@dataclass(eq=False)
class _Entry:
    ref: weakref.ref[nn.Module]
    spec: FastFrozen
    eval_ids: set[int] = field(default_factory=set)
    holders: set[int] = field(default_factory=set)
    fingerprint: _Fingerprint | None = None
    twins: dict[Hashable, _TwinSlot] = field(default_factory=dict)
    #: One store per whole spec (not per cache): features computed in bf16 are never
    #: served to a float32 spec with an equal FeatureCache.
    stores: dict[FastFrozen, FeatureStore] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    override: _FastForward | None = None
    getstate: _GetState | None = None
    #: Twin keys that run plainly (until the weights change), with the reason.
    disabled: dict[Hashable, str] = field(default_factory=dict)
    #: Twin keys whose forward writes the module's attributes (a subset of ``disabled``):
    #: the feature cache refuses them, since a hit skips the forward.
    writes: dict[Hashable, str] = field(default_factory=dict)
    calls: int = 0
    builds: int = 0
    compiles: int = 0
    fast_calls: int = 0
    plain: dict[str, int] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    last: Twin | None = None
    diff: tuple[float, float] | None = None
    tolerance: tuple[float, float] = (0.0, 0.0)
    hits: int = 0
    misses: int = 0
    verified: int = 0
    recent_builds: list[int] = field(default_factory=list)


_ENTRIES: dict[int, _Entry] = {}


def _forget(key: int) -> Callable[[object], None]:
    def forget(_: object) -> None:
        with _LOCK:
            entry = _ENTRIES.get(key)
            if entry is not None and entry.ref() is None:
                _drop_entry(key, entry)

    return forget


def _entry_of(module: nn.Module) -> _Entry | None:
    entry = _ENTRIES.get(id(module))
    return entry if entry is not None and entry.ref() is module else None


class _FastForward:
    """The instance ``forward`` of a module held in fast mode (see the module docstring)."""

    __slots__ = ("__weakref__", "_entry", "_func", "_ref")

    def __init__(self, module: nn.Module, entry: _Entry) -> None:
        self._ref = weakref.ref(module)
        self._func: Callable[..., Any] = type(module).forward
        self._entry = entry

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        module = self._ref()
        return self._func if module is None else self._func.__get__(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._ref()
        if module is None:  # pragma: no cover - the module owns this object
            raise RuntimeError("the module of this fast forward was freed")
        if _tracing_or_compiling():
            return self._func(module, *args, **kwargs)
        called = _called_module()
        if called is not None and called is not module:
            # A copy of the module's __dict__ (an nn.DataParallel replica) computes with
            # its own tensors: run its plain forward.
            return _plain(
                self._entry,
                "a DataParallel replica runs its own forward",
                lambda: type(called).forward(called, *args, **kwargs),
            )
        return _call(self._entry, module, self._func, args, kwargs)

    def __reduce__(self) -> Any:
        raise TypeError(
            "freezesched's fast forward is not copyable; copy or pickle the module itself "
            "(its copies leave this attribute out)"
        )


class _GetState:
    """The instance ``__getstate__``: a module's state without freezesched's attributes."""

    __slots__ = ("_ref",)

    def __init__(self, module: nn.Module) -> None:
        self._ref = weakref.ref(module)

    def __call__(self) -> dict[str, Any]:
        module = self._ref()
        if module is None:  # pragma: no cover
            return {}
        state: dict[str, Any] = type(module).__getstate__(module)  # type: ignore[no-untyped-call]
        for attr in ("forward", "__getstate__"):
            if isinstance(state.get(attr), _FastForward | _GetState):
                del state[attr]
        return state

    def __reduce__(self) -> Any:
        raise TypeError("freezesched's __getstate__ is not copyable")


def _fx_tracing() -> bool:
    check = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    if check is None:  # older torch
        check = torch.fx._symbolic_trace.is_fx_tracing
    return bool(check())


_CALL_IMPL = ("_call_impl", "inner", "_slow_forward")


def _called_module() -> nn.Module | None:
    """The module torch's ``Module.__call__`` is calling now (our caller's ``self``).

    ``None`` when the forward was called some other way (``module.forward(x)``).
    """
    frame = sys._getframe(2)
    code = frame.f_code
    if code.co_name not in _CALL_IMPL or not code.co_filename.endswith(_MODULE_FILE):
        return None
    called = frame.f_locals.get("self")
    return called if isinstance(called, nn.Module) else None


_MODULE_FILE = str(_torch_module.__file__)


def is_ours(value: object) -> bool:
    """Whether ``value`` is one of the instance attributes fast mode sets on a module."""
    return isinstance(value, _FastForward | _GetState)


def _tracing_or_compiling() -> bool:
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return True
    if _fx_tracing():
        return True
    return bool(torch._C._are_functorch_transforms_active())


# --- attaching to holds ---------------------------------------------------------------------


def attach(module: nn.Module, spec: FastFrozen, eval_ids: set[int], hold: int) -> None:
    """Run ``module`` fast for the hold ``hold`` (idempotent; undone by :func:`detach`).

    Raises:
        ValueError: the module is already held fast under a different ``FastFrozen``.
    """
    with _LOCK:
        entry = _entry_of(module)
        if entry is not None and entry.spec != spec and entry.holders - {hold}:
            raise ValueError(
                f"{type(module).__name__} is already frozen in fast mode with {entry.spec}; "
                f"a second region cannot hold it with {spec}. Use one FastFrozen for both"
            )
        if entry is None:
            entry = _Entry(ref=weakref.ref(module, _forget(id(module))), spec=spec)
            _ENTRIES[id(module)] = entry
        entry.spec = spec  # twins and caches of other settings are kept
        if entry.fingerprint is not None and hold not in entry.holders:
            # Once per region: what the per-call check cannot see (writes torch does not
            # record, Python attributes) rebuilds the twins now.
            with entry.lock:
                fp = entry.fingerprint
                if fp is not None and (_compare(fp) == "changed" or not _unchanged(fp)):
                    _invalidate(entry, module)
        entry.holders.add(hold)
        entry.eval_ids |= eval_ids
        if entry.override is None or entry.getstate is None:
            entry.override = _FastForward(module, entry)
            entry.getstate = _GetState(module)
        module.__dict__["forward"] = entry.override
        module.__dict__["__getstate__"] = entry.getstate


def detach(module: nn.Module, hold: int) -> None:
    """End the hold ``hold``'s fast mode on ``module`` (idempotent); the twin is kept."""
    with _LOCK:
        entry = _entry_of(module)
        if entry is None:
            return
        entry.holders.discard(hold)
        if entry.holders:
            return
        if module.__dict__.get("forward") is entry.override:
            del module.__dict__["forward"]
        if module.__dict__.get("__getstate__") is entry.getstate:
            del module.__dict__["__getstate__"]


def _drop_entry(key: int, entry: _Entry) -> None:
    del _ENTRIES[key]
    for store in entry.stores.values():
        store.clear()
    # Break the entry <-> override cycle now, so the twins go without waiting for gc.
    entry.twins.clear()
    entry.override = entry.getstate = None
    entry.last = None


def drop_fast(module: nn.Module | None = None) -> None:
    """Drop the fast twins (and cached features) of ``module``, or of every module.

    Twins of a module that a fast region still holds are kept. The guard and the
    controller call this when they make a module trainable.

    Args:
        module: The frozen module, or ``None`` for all.

    Raises:
        TypeError: ``module`` is not a module or ``None``.

    Examples:
        >>> drop_fast()  # nothing is kept after this
    """
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or None, got {describe(module)}")
    with _LOCK:
        keys = list(_ENTRIES) if module is None else [id(module)]
        for key in keys:
            entry = _ENTRIES.get(key)
            if entry is None or entry.holders:
                continue
            if module is not None and entry.ref() is not module:
                continue
            _drop_entry(key, entry)


def fast_report(module: nn.Module) -> FastReport | None:
    """What fast mode did for ``module`` so far, or ``None`` if it never ran it fast.

    Raises:
        TypeError: ``module`` is not a module.

    Examples:
        >>> fast_report(nn.Linear(2, 2)) is None
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {describe(module)}")
    with _LOCK:
        entry = _entry_of(module)
        if entry is None:
            return None
        twin = entry.last
        diff = entry.diff
        return FastReport(
            module=type(module).__name__,
            folded=tuple(twin.folded) if twin else (),
            not_folded=tuple(twin.not_folded) if twin else (),
            untraced=tuple(twin.untraced) if twin else (),
            channels_last=entry.spec.channels_last,
            dtype=entry.spec.dtype,
            compiled=bool(twin and twin.compiled),
            tolerance=entry.tolerance,
            max_abs_diff=diff[0] if diff else None,
            max_rel_diff=diff[1] if diff else None,
            builds=entry.builds,
            compiles=entry.compiles + sum(s.twin.compiles[0] for s in entry.twins.values()),
            fast_calls=entry.fast_calls,
            plain_calls=tuple(sorted(entry.plain.items())),
            cache_hits=entry.hits,
            cache_misses=entry.misses,
            cache_verified=entry.verified,
            cache_bytes=sum(store.bytes for store in entry.stores.values()),
        )


# --- the fingerprint --------------------------------------------------------------------------

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


#: Attributes every module has (torch's own), not scanned for plain state.
_MODULE_ATTRS = frozenset(nn.Module().__dict__) | {"forward", "__getstate__", "_freezesched_mode"}
#: Elements sampled per tensor by the check when a hold is attached.
_SAMPLE = 4
#: How deep lists, tuples and dicts in plain attributes are searched for tensors and modules.
_DEPTH = 3


def _scalar(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_scalar(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _holds_state(value: object, depth: int) -> bool:
    """Whether ``value`` is or (within ``depth`` containers) holds a tensor or module."""
    if isinstance(value, torch.Tensor | nn.Module):
        return True
    if depth and isinstance(value, list | tuple):
        return any(_holds_state(v, depth - 1) for v in value)
    if depth and isinstance(value, dict):
        return any(_holds_state(v, depth - 1) for v in value.values())
    return False


def _sample_view(t: torch.Tensor) -> torch.Tensor | None:
    """Bytes of up to ``_SAMPLE`` elements spread over ``t``'s memory (``None``: none).

    The view's shape is ``(elements, element size)``; it aliases ``t``'s storage.
    """
    try:
        d = t.detach()
        if d.numel() == 0 or d.layout != torch.strided:
            return None
        span = 1 + sum((n - 1) * s for n, s in zip(d.shape, d.stride(), strict=True))
        k = min(_SAMPLE, span)
        step = (span - 1) // (k - 1) if k > 1 else 1
        view = torch.as_strided(d, (k, 1), (step, 1), d.storage_offset())
        return view.view(torch.uint8)
    except Exception:  # a tensor subclass or layout without plain memory: not sampled
        return None


def _fingerprint(module: nn.Module) -> _Fingerprint:
    modules: list[nn.Module] = []
    seen: set[int] = set()
    edges: list[tuple[nn.Module, str, nn.Module]] = []
    refs: list[tuple[Any, Any, object]] = []
    sizes: list[tuple[Any, int]] = []
    plain: list[tuple[dict[Any, Any], Any, torch.Tensor]] = []
    stack = [module]

    def scan(container: Any, key: Any, value: object, depth: int) -> None:
        # State held outside _parameters/_buffers/_modules (the twin copied it too).
        if isinstance(value, nn.Module):
            refs.append((container, key, value))
            stack.append(value)
        elif isinstance(value, torch.Tensor):
            refs.append((container, key, value))
            plain.append(({key: value}, key, value))  # identity: checked by refs
        elif isinstance(value, list | tuple | dict) and depth and _holds_state(value, depth):
            refs.append((container, key, value))
            if not isinstance(value, tuple):
                sizes.append((value, len(value)))
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            for k, v in items:
                scan(value, k, v, depth - 1)

    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        modules.append(sub)
        for name, child in sub._modules.items():
            if child is not None:
                edges.append((sub, name, child))
                stack.append(child)
        for name, value in sub.__dict__.items():
            if name not in _MODULE_ATTRS:
                scan(sub.__dict__, name, value, _DEPTH)
    tensors: list[tuple[dict[Any, Any], Any, torch.Tensor | None, int, int]] = []
    device = None
    for sub in modules:
        for slots in (sub._parameters, sub._buffers):
            for name, t in slots.items():
                if t is None:  # a None slot: assigning a tensor there changes the module
                    tensors.append((slots, name, None, 0, 0))
                    continue
                tensors.append((slots, name, t, t._version, _pointer(t)))
                if device is None and t.is_floating_point():
                    device = t.device
    tensors += [(holder, key, t, t._version, _pointer(t)) for holder, key, t in plain]
    shape = [(len(m._parameters), len(m._buffers), len(m._modules)) for m in modules]
    groups: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
    for _, _, t, _, _ in tensors:
        view = None if t is None else _sample_view(t)
        if view is not None:  # (k, element size) bytes: one torch.cat per group
            groups.setdefault((view.device, view.shape[1]), []).append(view)
    samples = [(views, torch.cat(views)) for views in groups.values()]
    return _Fingerprint(
        modules,
        shape,
        edges,
        tensors,
        device,
        refs=refs,
        sizes=sizes,
        attributes=[_attributes(m, m is module) for m in modules],
        samples=samples,
        types=list(map(type, modules)),
    )


def _pointer(t: torch.Tensor) -> int:
    """``t.data_ptr()``, or ``-1`` for a tensor without storage (sparse, other layouts).

    Such a tensor is tracked by identity and ``_version`` only.
    """
    if t.layout != torch.strided:
        return -1
    try:
        return int(t.data_ptr())
    except Exception:  # a subclass or a tensor without storage
        return -1


def _attributes(
    module: nn.Module, root: bool
) -> tuple[dict[str, Any], int, Callable[[Any], Any] | None, Any]:
    """The scalar attributes of ``module`` (and an instance ``forward``), for :func:`_unchanged`."""
    d = module.__dict__
    names = [k for k, v in d.items() if k not in _MODULE_ATTRS and _scalar(v)]
    if not root and "forward" in d:
        names.append("forward")
    # Two names at least, so that the getter always returns a tuple (compared by identity).
    getter = operator.itemgetter(*names, *names[:1]) if names else None
    return d, _own_len(d, root), getter, getter(d) if getter else None


def _own_len(d: dict[str, Any], root: bool) -> int:
    """``len(d)`` without fast mode's own attributes (on the held module only)."""
    if not root:
        return len(d)
    return len(d) - sum(is_ours(d.get(a)) for a in ("forward", "__getstate__"))


def _compare(fp: _Fingerprint) -> str:
    """What changed since the fingerprint.

    ``""`` if nothing, ``"grad"`` if a tensor requiring grad was swapped in, else
    ``"changed"``.
    """
    if list(map(type, fp.modules)) != fp.types:  # a class swapped in place
        return "changed"
    for m, s in zip(fp.modules, fp.shape, strict=True):
        if (len(m._parameters), len(m._buffers), len(m._modules)) != s:
            return "changed"
    for parent, name, child in fp.edges:
        if parent._modules.get(name) is not child:
            return "changed"
    for container, key, value in fp.refs:
        if isinstance(container, dict):
            if container.get(key) is not value:
                return "changed"
        elif key >= len(container) or container[key] is not value:
            return "changed"
    for container, n in fp.sizes:
        if len(container) != n:
            return "changed"
    verdict = ""
    for slots, name, t, version, ptr in fp.tensors:
        now = slots.get(name)
        if now is t and (t is None or (t._version == version and (ptr < 0 or t.data_ptr() == ptr))):
            if t is not None and t.requires_grad:
                return "grad"
            continue
        if now is not None and now.requires_grad:
            return "grad"
        verdict = "changed"
    return verdict


def _unchanged(fp: _Fingerprint) -> bool:
    """Whether the sampled values and the scalar attributes are as fingerprinted.

    Run when a hold is attached (once per region): catches writes torch does not record
    (fused optimizers, collectives, ``.data`` writes) that change a sampled element, and
    Python attributes the forward may read.
    """
    if not _attributes_unchanged(fp):
        return False
    return all(torch.equal(torch.cat(views), values) for views, values in fp.samples)


def _attributes_unchanged(fp: _Fingerprint) -> bool:
    """Whether every module's scalar attributes (and instance ``forward``) are as they were.

    Run on every call (a few C-level lookups per module): a stride, padding or ``eps``
    changed inside a region rebuilds the twin before it serves a wrong (or wrongly shaped)
    output.
    """
    root = fp.modules[0].__dict__
    for d, n, getter, values in fp.attributes:
        if (len(d) if d is not root else _own_len(d, True)) != n:  # added or deleted
            return False
        if getter is not None:
            try:
                now = getter(d)
            except KeyError:
                return False
            # Identity first (a NaN is its own), then type and value: never raises.
            if not all(map(operator.is_, now, values)) and not _equal_scalars(now, values):
                return False
    return True


def _equal_scalars(now: tuple[Any, ...], values: tuple[Any, ...]) -> bool:
    """Whether ``now`` holds values of the same types and equal to ``values`` (scalars)."""
    for a, b in zip(now, values, strict=True):
        if a is b:
            continue
        if type(a) is not type(b) or not _scalar(a) or not _same_types(a, b):
            return False
        if isinstance(a, float) and math.isnan(a) and math.isnan(b):
            continue
        try:
            if bool(a != b):
                return False
        except Exception:
            return False
    return True


def _same_types(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b)


def _hooked(fp: _Fingerprint) -> str:
    """The qualified-name-free description of the first hook found on a submodule."""
    for m in fp.modules[1:]:
        for attr in _HOOKS:
            if getattr(m, attr, None):
                return f"a {attr.strip('_').replace('_', ' ')[:-1]} on a {type(m).__name__}"
    others = [
        k
        for d in (_torch_module._global_forward_pre_hooks, _torch_module._global_forward_hooks)
        for k in d
        if k != _OUR_HOOK_KEY
    ]
    if others or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks:
        return "global module hooks are installed (a profiler or tracker)"
    return ""


#: The key of the mechanism's own global hooks (see ``_mechanism._HOOK_KEY``).
_OUR_HOOK_KEY = -0x46_53_5A


def _signature(fp: _Fingerprint, eval_ids: set[int], device: torch.device) -> tuple[Any, ...]:
    modes = tuple(m.training for m in fp.modules if id(m) not in eval_ids)
    kind = device.type
    autocast = (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None
    return (modes, autocast)


# --- a call ---------------------------------------------------------------------------------


def _plain(entry: _Entry, reason: str, run: Callable[[], Any], warn: bool = True) -> Any:
    with entry.lock:
        entry.plain[reason] = entry.plain.get(reason, 0) + 1
        first = reason not in entry.warned
        entry.warned.add(reason)
    if warn and first:
        module = entry.ref()
        name = type(module).__name__ if module is not None else "?"
        warnings.warn(
            f"fast frozen mode ran {name} plainly: {reason}. The result is exact; "
            "fast_report(module) counts such calls",
            FastModeWarning,
            stacklevel=4,
        )
    return run()


def _warn(entry: _Entry, key: str, message: str) -> None:
    if key in entry.warned:
        return
    entry.warned.add(key)
    warnings.warn(message, FastModeWarning, stacklevel=5)


def _call(
    entry: _Entry,
    module: nn.Module,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    def plain() -> Any:
        return func(module, *args, **kwargs)

    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return _plain(entry, "it was called with keyword or non-tensor arguments", plain)
    spec = entry.spec
    grad_in = torch.is_grad_enabled() and any(a.requires_grad for a in args)
    with entry.lock:
        fp = entry.fingerprint
        verdict = "changed" if fp is None else _compare(fp)
        if verdict == "" and fp is not None and not _attributes_unchanged(fp):
            verdict = "changed"
        if verdict == "grad":
            return _plain(entry, "tensors that require grad reach it (functional_call?)", plain)
        if verdict == "changed":
            _invalidate(entry, module)
            fp = entry.fingerprint
        assert fp is not None
        hooked = _hooked(fp)
        if hooked:
            return _plain(entry, hooked, plain)
        if fp.device is not None and any(a.device != fp.device for a in args):
            return _plain(entry, f"an input is not on {fp.device}, where its weights are", plain)
        keys = current_keys() if spec.cache is not None else None
        if keys is not None:
            return _cached(entry, module, fp, args, keys, grad_in, func)
        key, slot = _twin_for(entry, module, fp, args, grad_in)
        if key in entry.disabled:
            return _plain(entry, entry.disabled[key], plain, warn=False)
        if slot is None:
            return _build(entry, module, fp, args, grad_in, plain)
        entry.calls += 1
        check = bool(spec.verify_every) and entry.calls % spec.verify_every == 0
        if not check:
            entry.fast_calls += 1
            slot.calls += 1
    if check:
        return _verified(entry, slot, args, plain)
    return _run(slot, args, spec, grad_in)


def _invalidate(entry: _Entry, module: nn.Module) -> None:
    """The module changed: forget its twins and cached features; fingerprint it anew."""
    entry.compiles += sum(s.twin.compiles[0] for s in entry.twins.values())
    entry.twins.clear()
    entry.disabled.clear()
    entry.writes.clear()
    for store in entry.stores.values():
        store.clear()
    entry.fingerprint = _fingerprint(module)


def _variant(spec: FastFrozen, grad_in: bool) -> str:
    # Low precision and compiled twins only run without autograd; a frozen middle stage
    # (input requiring grad) runs the float32 folded twin, which passes gradients back.
    return "grad" if grad_in and (spec.dtype is not None or spec.compile) else "main"


def _key(entry: _Entry, fp: _Fingerprint, args: tuple[torch.Tensor, ...], variant: str) -> Hashable:
    """The twin for a call: settings, variant, each input's rank and dtype, modes, autocast.

    A twin is traced, folded and checked for one kind of input (a ``Linear`` +
    ``BatchNorm1d`` fold holds for 2-D input only; the output dtype is the first call's).
    """
    spec = entry.spec
    settings = (spec.fold_bn, spec.channels_last, spec.dtype, spec.compile)
    kinds = tuple((a.dim(), a.dtype, a.layout) for a in args)
    return (settings, variant, kinds, *_signature(fp, entry.eval_ids, args[0].device))


def _twin_for(
    entry: _Entry,
    module: nn.Module,
    fp: _Fingerprint,
    args: tuple[torch.Tensor, ...],
    grad_in: bool,
) -> tuple[Hashable, _TwinSlot | None]:
    """The key of the twin for this call, and the twin (``None``: to be built first)."""
    spec = entry.spec
    variant = _variant(spec, grad_in)
    if variant == "grad":
        what = " and ".join(
            w for w, on in (("low-precision", spec.dtype), ("compiled", spec.compile)) if on
        )
        _warn(
            entry,
            "grad",
            f"fast frozen mode: the input of {type(module).__name__} requires grad (a frozen "
            f"middle stage), so its {what} twin is not used there; the float32 folded twin "
            "passes the input gradient back",
        )
    key = _key(entry, fp, args, variant)
    return key, entry.twins.get(key)


def _inputs(
    args: tuple[torch.Tensor, ...], spec: FastFrozen, variant: str
) -> tuple[torch.Tensor, ...]:
    out = []
    dtype = spec.torch_dtype if variant == "main" else None
    for a in args:
        if spec.channels_last and a.dim() == 4:
            a = a.contiguous(memory_format=torch.channels_last)
        if dtype is not None and a.is_floating_point():
            a = a.to(dtype)
        out.append(a)
    return tuple(out)


def _restore(output: Any, slot: _TwinSlot) -> Any:
    """The twin's output in the plain output's structure, dtypes and memory formats.

    (A traced forward returns a ``dict`` where the module returns an ``OrderedDict``, say:
    leaves are matched by their key path.)
    """
    found = pytree.tree_flatten_with_path(output)[0]
    if [pytree.keystr(p) for p, _ in found] == slot.out_paths:
        leaves = [leaf for _, leaf in found]
    else:
        by_path = {pytree.keystr(p): leaf for p, leaf in found}
        if set(by_path) != set(slot.out_paths):
            return output  # a different structure: the check reports it
        leaves = [by_path[p] for p in slot.out_paths]
    fixed = []
    for leaf, dtype, contiguous in zip(leaves, slot.out_dtypes, slot.out_contiguous, strict=True):
        if isinstance(leaf, torch.Tensor):
            if dtype is not None and leaf.dtype != dtype:
                leaf = leaf.to(dtype)
            if contiguous and not leaf.is_contiguous():
                leaf = leaf.contiguous()
        fixed.append(leaf)
    return pytree.tree_unflatten(fixed, slot.out_spec)


def _run(slot: _TwinSlot, args: tuple[torch.Tensor, ...], spec: FastFrozen, grad: bool) -> Any:
    """The twin's output for ``args``; with autograd if ``grad`` (the float32 twins only)."""
    inputs = _inputs(args, spec, slot.variant)
    if grad:
        output = slot.twin.run(*inputs)
    else:
        with torch.no_grad():
            output = slot.twin.run(*inputs)
    return _restore(output, slot)


def _difference(
    fast: Any, plain: Any, tolerance: tuple[float, float]
) -> tuple[float, float, bool] | str:
    """``(max abs diff, max relative diff, within tolerance)`` between two outputs.

    A string instead says why they cannot be compared.

    A tensor is within tolerance when ``max |fast - plain| <= atol + rtol * max |plain|``
    over its finite entries, and its NaNs and infinities are where the plain ones are. The
    real and imaginary parts of a complex tensor count as separate entries.
    """
    rtol, atol = tolerance
    a, spec_a = pytree.tree_flatten(fast)
    b, spec_b = pytree.tree_flatten(plain)
    if spec_a != spec_b:
        return "the outputs have different structures"
    worst_abs = worst_rel = 0.0
    ok = True
    for x, y in zip(a, b, strict=True):
        if not isinstance(y, torch.Tensor):
            if not isinstance(y, _CONSTANTS) or not isinstance(x, _CONSTANTS):
                return f"an output of type {type(y).__name__} cannot be compared"
            if x != y:
                return f"a non-tensor output differs ({x!r} vs {y!r})"
            continue
        if not isinstance(x, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
            return "an output has a different shape or dtype"
        if y.numel() == 0:
            continue
        xf, yf = _real(x), _real(y)
        if not torch.equal(torch.isnan(xf), torch.isnan(yf)):
            return "NaNs in different places"
        finite = torch.isfinite(yf)
        if not torch.equal(xf[~finite].nan_to_num(), yf[~finite].nan_to_num()):
            return "infinities in different places"
        if not finite.any():
            continue
        d = (xf[finite] - yf[finite]).abs().max().item()
        scale = yf[finite].abs().max().item()
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
        ok = ok and d <= atol + rtol * scale
    return worst_abs, worst_rel, ok


def _real(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64; a complex ``t`` as its real and imaginary parts (a last dim of 2)."""
    t = t.detach()
    if t.is_complex():
        return torch.view_as_real(t.to(torch.complex128).resolve_conj().resolve_neg())
    return t.double()


#: Non-tensor output leaves the check compares with ``==``.
_CONSTANTS = (
    type(None), bool, int, float, complex, str, bytes,
    torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format,
)  # fmt: skip


def _uncomparable(output: Any) -> str:
    """Why the check cannot compare ``output`` with a twin's (``""``: it can)."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.layout != torch.strided:
            return (
                f"its output is a {leaf.layout} tensor, which the twin's output cannot be "
                "checked against (only strided tensors are compared)"
            )
        if not isinstance(leaf, (torch.Tensor, *_CONSTANTS)):
            return (
                f"its output type {type(leaf).__name__} is not a tensor/tuple/list/dict, so "
                "the twin's output cannot be checked against it (register the type with "
                "torch.utils._pytree, such as register_dataclass, or return a tuple or dict)"
            )
    return ""


#: Each submodule's ``(name, module, {attribute: (value, contents)})``, and what was met
#: (kept alive while compared).
_Attributes = tuple[list[tuple[str, nn.Module, dict[str, tuple[Any, Hashable]]]], list[object]]
#: How deep the build's snapshot looks into the lists, dicts, sets and plain objects held in
#: attributes (``self.feats["conv"] = h``, ``self.slot[0] = h``, ``self.meter.calls += 1``).
_WRITE_DEPTH = 3


def _contents(value: object, depth: int, keep: list[object]) -> Hashable:
    """The identities of what ``value`` holds, within ``depth`` levels, as a hashable value.

    Items of lists, tuples, dicts and sets, and the ``__dict__`` of plain objects (not
    modules, tensors, classes or Python modules), are followed; everything met is appended
    to ``keep``, so that an identity cannot be reused by a new object while it is compared.
    """
    if depth <= 0:
        return None
    items: list[tuple[object, object]]
    if isinstance(value, list | tuple):
        items = list(enumerate(value))
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, set | frozenset):
        keep.append(list(value))
        return ("set", len(value), frozenset(map(id, value)))
    elif isinstance(value, nn.Module | torch.Tensor | type | types.ModuleType):
        return None
    else:
        attrs = getattr(value, "__dict__", None)
        if not isinstance(attrs, dict):
            return None
        items = list(attrs.items())
    keep.append(items)
    return tuple(
        (id(k) if not isinstance(k, int | str) else k, id(v), _contents(v, depth - 1, keep))
        for k, v in items
    )


def _instance_state(module: nn.Module) -> _Attributes:
    """Each submodule's instance attributes, and what their containers and objects hold."""
    keep: list[object] = []
    state = [
        (name, m, {k: (v, _contents(v, _WRITE_DEPTH, keep)) for k, v in m.__dict__.items()})
        for name, m in module.named_modules()
    ]
    return state, keep


def _written(before: _Attributes) -> str:
    """Why the forward that ran since ``before`` cannot run as a twin (``""``: it can).

    A twin is a copy: attributes the forward sets (``self.features = x``, a counter, a list
    it appends to, an item of a dict or list it holds, an attribute of an object it holds)
    would be set on the copy, and the module's would go stale.
    """
    for name, m, attributes in before[0]:
        now = m.__dict__
        changed = [k for k in now if k not in attributes]
        for k, (v, contents) in attributes.items():
            if now.get(k, attributes) is not v or _contents(v, _WRITE_DEPTH, []) != contents:
                changed.append(k)
        for k in changed:
            where = f"{name}.{k}" if name else k
            inside = (
                ""
                if k not in attributes or now.get(k) is not attributes[k][0]
                else (" (an item or attribute inside it)")
            )
            return (
                f"its forward sets the attribute {where!r}{inside} of a {type(m).__name__}, "
                "which a twin (a copy) cannot set on the module"
            )
    return ""


def _copies_inputs(spec: FastFrozen, variant: str, args: tuple[torch.Tensor, ...]) -> bool:
    """Whether the twin may run on converted copies of the inputs (see ``_inputs``)."""
    low = spec.dtype is not None and variant == "main"
    return any(
        (spec.channels_last and a.dim() == 4) or (low and a.is_floating_point()) for a in args
    )


def _effective_tolerance(
    spec: FastFrozen, args: tuple[torch.Tensor, ...], variant: str
) -> tuple[float, float]:
    kind = args[0].device.type
    dtypes: list[torch.dtype | None] = [a.dtype for a in args if a.is_floating_point()]
    if torch.is_autocast_enabled(kind):
        dtypes.append(torch.get_autocast_dtype(kind))
    if variant == "grad":
        return FastFrozen(rtol=spec.rtol, atol=spec.atol).tolerance(*dtypes)
    return spec.tolerance(*dtypes)


def _shown(diff: tuple[float, float, bool] | str, tolerance: tuple[float, float]) -> str:
    if isinstance(diff, str):
        return diff
    return (
        f"max |fast - plain| = {diff[0]:.3g} (relative {diff[1]:.3g}); tolerance "
        f"rtol={tolerance[0]:g}, atol={tolerance[1]:g}"
    )


def _build(
    entry: _Entry,
    module: nn.Module,
    fp: _Fingerprint,
    args: tuple[torch.Tensor, ...],
    grad_in: bool,
    plain: Callable[[], Any],
) -> Any:
    """Build, check and keep the twin for this call; return the plain output."""
    spec = entry.spec
    variant = _variant(spec, grad_in)
    key = _key(entry, fp, args, variant)
    name = type(module).__name__
    training = [
        type(m).__name__
        for m in fp.modules
        if m.training and id(m) not in entry.eval_ids and any(True for _ in m.buffers(False))
    ]
    if training:
        # Not pinned by the freeze (added inside the region?): the plain forward may update
        # its buffers, which a copy cannot do for it.
        reason = f"a {training[0]} with buffers runs in training mode (added inside the region?)"
        return _plain(entry, reason, plain)
    # The twin is checked on the inputs as they were given: a forward that writes its input
    # in place has written the caller's tensors once, as a plain call does, when plain()
    # returns.
    saved = tuple(a.detach().clone() for a in args)
    versions = [a._version for a in args]
    attributes = _instance_state(module)
    reference = plain()  # the exact output, returned by this call
    refusal = _written(attributes)
    if refusal:
        entry.writes[key] = refusal
    refusal = refusal or _uncomparable(reference)
    written = [i for i, a in enumerate(args) if a._version != versions[i]]
    if not refusal and written and _copies_inputs(spec, variant, args):
        refusal = (
            "its forward writes its input in place, and the twin would write a converted "
            "copy of it (channels_last or dtype), leaving the caller's tensor unwritten"
        )
    if refusal:
        entry.disabled[key] = refusal
        _warn(entry, refusal, f"fast frozen mode runs {name} plainly: {refusal}")
        return reference
    strip = [
        v
        for m in module.modules()
        for v in m.__dict__.values()
        if isinstance(v, _FastForward | _GetState)
    ]
    tolerance = _effective_tolerance(spec, args, variant)
    entry.builds += 1
    _note_build(entry, name)
    try:
        twin = build_twin(
            module,
            eval_ids=entry.eval_ids,
            strip=strip,
            example=saved,
            fold_bn=spec.fold_bn,
            channels_last=spec.channels_last,
            dtype=spec.torch_dtype if variant == "main" else None,
            compile=spec.compile and variant == "main",
        )
    except Exception as error:
        why = f"its fast twin could not be built ({type(error).__name__}: {error})"
        entry.disabled[key] = why
        _warn(entry, why, f"fast frozen mode runs {name} plainly: {why}")
        return reference
    paths, out_spec = pytree.tree_flatten_with_path(reference)
    leaves = [leaf for _, leaf in paths]
    slot = _TwinSlot(
        twin=twin,
        variant=variant,
        out_spec=out_spec,
        out_paths=[pytree.keystr(p) for p, _ in paths],
        out_dtypes=[t.dtype if isinstance(t, torch.Tensor) else None for t in leaves],
        out_contiguous=[isinstance(t, torch.Tensor) and t.is_contiguous() for t in leaves],
        tolerance=tolerance,
    )
    buffers = [(b, b._version) for b in twin.module.buffers()]
    try:
        output = _run(slot, saved, spec, False)
    except Exception as error:
        if not twin.compiled:
            why = f"its fast twin failed ({type(error).__name__}: {error})"
            entry.disabled[key] = why
            _warn(entry, why, f"fast frozen mode runs {name} plainly: {why}")
            return reference
        # Compiling failed (no C++ compiler, an unsupported op): keep the eager twin.
        _warn(
            entry,
            "compile",
            f"fast frozen mode could not compile {name}'s twin ({type(error).__name__}: "
            f"{error}); it runs the twin uncompiled",
        )
        twin.run, twin.compiled = twin.module, False
        output = _run(slot, saved, spec, False)
    diff = _difference(output, reference, tolerance)
    entry.last, entry.tolerance = twin, tolerance
    if any(b._version != v for b, v in buffers):
        diff = "its forward changes buffers, so it is not a fixed function"
    for i in written:  # the twin must write the input as the forward did
        if not isinstance(diff, str) and diff[2]:
            wrote = _difference(saved[i], args[i], tolerance)
            if isinstance(wrote, str) or not wrote[2]:
                diff = "its forward writes its input in place, and the twin writes it otherwise"
    if isinstance(diff, str) or not diff[2]:
        why = f"its fast twin does not match the plain forward ({_shown(diff, tolerance)})"
        entry.disabled[key] = why
        _warn(
            entry,
            why,
            f"fast frozen mode runs {name} plainly until its weights change: {why}. A "
            "forward that is not deterministic (dropout outside dropout layers, random "
            "numbers) or that reads Python state torch.fx bakes in cannot run as a twin; for "
            "a low-precision twin, raise the tolerance (rtol=) if the error is acceptable",
        )
        return reference
    entry.diff = (diff[0], diff[1])
    if twin.not_folded or twin.untraced:
        norms = [f"{n} ({r})" for n, r in twin.not_folded]
        parts = [f"{n or '(module)'} ({r})" for n, r in twin.untraced]
        _warn(
            entry,
            "partial",
            f"fast frozen mode folded {len(twin.folded)} norm layers of {name}"
            + (f"; left {len(norms)} as they are: {', '.join(norms[:8])}" if norms else "")
            + ("..." if len(norms) > 8 else "")
            + (f"; ran without tracing: {', '.join(parts[:8])}" if parts else "")
            + ". Those parts run exactly as before; fast_report(module) lists them",
        )
    entry.twins[key] = slot
    return reference


def _note_build(entry: _Entry, name: str) -> None:
    entry.recent_builds.append(entry.calls)
    del entry.recent_builds[:-4]
    if len(entry.recent_builds) == 4 and entry.recent_builds[-1] - entry.recent_builds[0] < 8:
        _warn(
            entry,
            "thrash",
            f"fast frozen mode rebuilt {name}'s twin 4 times within 8 fast calls: its "
            "weights, modes or autocast setting change between frozen calls (a schedule "
            "that alternates every step?). Fast mode pays off when a module stays frozen "
            "and unchanged for many steps; each rebuild copies and checks the module",
        )


def _verified(
    entry: _Entry, slot: _TwinSlot, args: tuple[torch.Tensor, ...], plain: Callable[[], Any]
) -> Any:
    """A periodic check: the plain output, after comparing the twin's with it.

    The twin runs on copies of the inputs taken before the plain call, which may write them.
    """
    saved = tuple(a.detach().clone() for a in args)
    reference = plain()
    output = _run(slot, saved, entry.spec, False)
    tolerance = slot.tolerance
    diff = _difference(output, reference, tolerance)
    module = entry.ref()
    name = type(module).__name__ if module is not None else "?"
    if isinstance(diff, str) or not diff[2]:
        with entry.lock:
            entry.twins.clear()
            entry.fingerprint = None
            for store in entry.stores.values():  # features the twin computed, too
                store.clear()
        raise FastMismatchError(
            f"fast frozen mode's periodic check of {name} failed: {_shown(diff, tolerance)}. "
            "Its weights or buffers were changed in a way torch does not record "
            "(p.data.copy_(...), writing through .numpy()), or a Python attribute its forward "
            "reads changed; outputs since the last check may be stale. Write weights with "
            "`with torch.no_grad(): p.copy_(...)`, or turn fast mode off for this module"
        )
    with entry.lock:
        entry.diff = (diff[0], diff[1])
    return reference


# --- the feature cache ----------------------------------------------------------------------


def _batch_dependence(module: nn.Module, fp: _Fingerprint, eval_ids: set[int]) -> str:
    """Why a sample's output of ``module`` may depend on the rest of its batch.

    ``""`` if no such submodule is found (a forward that mixes samples itself, such as
    ``x - x.mean(0)``, is not detected: the verification may catch it).
    """
    for sub in fp.modules:
        training = sub.training and id(sub) not in eval_ids
        if isinstance(sub, _BatchNorm) and training:
            why = (
                "runs in training mode (added inside the region?): it normalises with the "
                "batch's statistics and updates its running statistics from them"
            )
        elif isinstance(sub, _BatchNorm) and (
            not sub.track_running_stats or sub.running_mean is None or sub.running_var is None
        ):
            why = "has track_running_stats=False: it normalises with the batch's statistics"
        elif training and any(True for _ in sub.buffers(False)):
            why = (
                "has buffers and runs in training mode (added inside the region?): its "
                "forward may update them from the batch, which a cache hit would skip"
            )
        else:
            continue
        path = next((n for n, m in module.named_modules() if m is sub), "?")
        return f"its {type(sub).__name__} {path or '(module)'!r} {why}"
    return ""


def _refuse_writes(entry: _Entry, key: Hashable, name: str) -> None:
    """Raise if the forward of this twin key writes the module's attributes.

    Raises:
        ValueError: it does: a cache hit would skip the write.
    """
    why = entry.writes.get(key)
    if why:
        raise ValueError(
            f"the feature cache cannot serve {name}: {why}. A cache hit skips the forward, "
            "so that state would go stale. Turn the cache off for this module "
            "(FastFrozen(cache=None)) or leave sample_keys out for it"
        )


def _cached(
    entry: _Entry,
    module: nn.Module,
    fp: _Fingerprint,
    args: tuple[torch.Tensor, ...],
    keys: tuple[Hashable, ...],
    grad_in: bool,
    func: Callable[..., Any],
) -> Any:
    spec = entry.spec
    cache = spec.cache
    assert cache is not None
    name = type(module).__name__
    if grad_in:
        raise ValueError(
            f"the feature cache serves only a frozen prefix of the model, but the input of "
            f"{name} requires grad (something before it trains). Freeze everything before "
            "it too, or leave sample_keys out for this step"
        )
    if len(args) != 1:
        raise ValueError(
            f"the feature cache needs a module called with one tensor; {name} got {len(args)}"
        )
    x = args[0]
    batch = x.shape[0] if x.dim() else 0
    if batch != len(keys):
        raise ValueError(
            f"sample_keys gave {len(keys)} keys but the batch of {name}'s input has {batch} "
            f"samples (shape {tuple(x.shape)}); give one key per sample"
        )
    store = entry.stores.get(spec)
    if store is None:
        store = entry.stores[spec] = FeatureStore(cache, f"{id(entry):x}-{len(entry.stores)}")
    signature = _signature(fp, entry.eval_ids, x.device)
    mixed = store.batch_dependence.get(signature)
    if mixed is None:
        mixed = store.batch_dependence[signature] = _batch_dependence(module, fp, entry.eval_ids)
    if mixed:
        raise ValueError(
            f"the feature cache cannot serve {name}: {mixed}. The cache keeps one output per "
            "sample and computes the samples it misses as a smaller batch, so each sample's "
            "output must depend on that sample only. Turn the cache off for this module "
            "(FastFrozen(cache=None)) or leave sample_keys out for it"
        )
    other = other_input(id(entry), x)
    if other:
        for each in entry.stores.values():  # the keys do not name one input: trust none
            each.clear()
        raise ValueError(
            f"{name} was called twice in one sample_keys block with different inputs (the "
            f"second is {other}): the keys name one input per sample, so the cache cannot "
            "serve both (two views, a query and a key encoder). Give each call its own "
            "sample_keys block with keys that name its input, such as "
            f"sample_keys([(i, 'view2') for i in idx]). {name}'s cached features were "
            "dropped"
        )
    full = [(signature, k) for k in keys]
    _refuse_writes(entry, _key(entry, fp, (x,), "main"), name)
    hit = [k in store for k in full]
    check = store.verify_mask(len(keys))
    compute = [i for i in range(batch) if not hit[i] or check[i]]
    computed: list[torch.Tensor] = []
    treespec = store.treespec
    if compute:
        sub = x if len(compute) == batch else x[torch.tensor(compute, device=x.device)]
        key, slot = _twin_for(entry, module, fp, (sub,), False)
        if key in entry.disabled:
            output = func(module, sub)
        elif slot is None:
            output = _build(entry, module, fp, (sub,), False, lambda: func(module, sub))
        else:
            entry.fast_calls += 1
            output = _run(slot, (sub,), spec, False)
        _refuse_writes(entry, key, name)  # seen by the build that just ran
        computed, treespec = split(output, len(compute))
        if store.treespec is None:
            store.treespec = treespec
        elif store.treespec != treespec:
            raise FeatureCacheMismatchError(
                f"{name}'s output structure changed between calls; the feature cache "
                "cannot serve it"
            )
    assert treespec is not None
    rows: dict[int, list[torch.Tensor]] = {}
    for j, i in enumerate(compute):
        rows[i] = [leaf[j] for leaf in computed]
    tolerance = _effective_tolerance(spec, args, "main")
    out_leaves: list[torch.Tensor] | None = None
    for i in range(batch):
        if hit[i]:
            cached = store.get(full[i], x.device)
            if check[i]:
                entry.verified += 1
                diff = _difference(cached, rows[i], tolerance)
                if isinstance(diff, str) or not diff[2]:
                    shown = (
                        diff if isinstance(diff, str) else f"max |cached - fresh| = {diff[0]:.3g}"
                    )
                    raise FeatureCacheMismatchError(
                        f"the feature cache's output for sample key {keys[i]!r} differs from "
                        f"{name}'s fresh output: {shown} (rtol={tolerance[0]:g}, "
                        f"atol={tolerance[1]:g}). The cache relies on your promise that the "
                        "input for a key never changes: random augmentation before the frozen "
                        "module (crops, flips, color jitter, mixup) breaks it, and so does "
                        "reusing keys for different samples. So does a frozen module whose "
                        "output for a sample depends on the rest of its batch (a forward that "
                        "mixes samples): misses and checks run on sub-batches. Turn "
                        "augmentation off for cached runs, or do not use the cache"
                    )
            else:
                rows[i] = cached
            entry.hits += 1
        else:
            entry.misses += 1
            store.put(full[i], [r.detach().clone() for r in rows[i]])
        if out_leaves is None:
            out_leaves = [
                torch.empty((batch, *r.shape), dtype=r.dtype, device=x.device) for r in rows[i]
            ]
        for leaf, r in zip(out_leaves, rows[i], strict=True):
            if leaf.shape[1:] != r.shape:
                raise FeatureCacheMismatchError(
                    f"the cached output for sample key {keys[i]!r} has shape {tuple(r.shape)}, "
                    f"this batch's {tuple(leaf.shape[1:])}: the input for a key changed. The "
                    "feature cache relies on your promise that it never does (no random "
                    "augmentation before the frozen module)"
                )
            leaf[i] = r
    assert out_leaves is not None
    return pytree.tree_unflatten(list(out_leaves), treespec)
