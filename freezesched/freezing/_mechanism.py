"""The one mechanism that freezes a module and undoes it exactly.

Freezing a module ``m`` means, until the hold is released:

* every parameter of ``m`` (except named trainable exceptions) has
  ``requires_grad=False`` and ``.grad is None``, so no optimizer step can move it;
* ``m``'s forward runs under :func:`torch.no_grad` whenever nothing flowing into it
  (inputs, or parameters still trainable inside it) requires grad, so no activations
  are kept for backward; otherwise autograd runs normally and computes input
  gradients only;
* BatchNorm-like and dropout layers follow a mode policy (``"eval"`` runs each forward
  of theirs in eval mode, whatever ``model.train()``, ``model.eval()`` or a framework
  restoring ``.training`` flags does meanwhile; ``"train"`` leaves them alone).

Holds are reference-counted per parameter and per module, so overlapping freezes
(``backbone`` and ``backbone.layer1``, or two guards) combine as a union: an object is
frozen while at least one hold is active, and returns to exactly the state it had
before the first hold when the last one is released, in whatever order they end.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from freezesched.schedules._base import _describe

__all__ = ["FreezePolicy", "ModePolicy", "TrainableSpec"]

ModePolicy = Literal["eval", "train"]
TrainableSpec = str | type[nn.Module]

_MODE_POLICIES = ("eval", "train")


@dataclass(frozen=True)
class FreezePolicy:
    """How a frozen module behaves; shared by the guard and the controller.

    Args:
        bn: ``"eval"`` (default) pins BatchNorm/InstanceNorm layers of a frozen module to
            eval mode, so their running statistics (buffers) stay bitwise unchanged even
            if ``model.train()`` is called while frozen; ``"train"`` leaves their mode
            alone, so running statistics keep updating in training mode.
        dropout: ``"eval"`` (default) pins ``nn.Dropout*`` layers of a frozen module to
            eval mode (a frozen module is a deterministic feature extractor);
            ``"train"`` leaves their mode alone (frozen features with dropout noise).
            Functional dropout inside other modules (e.g. ``nn.MultiheadAttention``)
            follows that module's own mode.
        trainable: Exceptions that stay trainable inside a frozen module: glob patterns
            (:func:`fnmatch.fnmatchcase`, ``*`` also matches dots) on qualified names
            relative to the frozen module, and module types. A pattern matching a
            submodule's name, or a type matching it, exempts that whole submodule
            (parameters and mode); a pattern matching a parameter's name exempts that
            parameter. Exempt parameters keep their own ``requires_grad``.

    Raises:
        ValueError: ``bn`` or ``dropout`` is not ``"eval"`` or ``"train"``.
        TypeError: an entry of ``trainable`` is neither a string nor a module type.

    Examples:
        >>> FreezePolicy(bn="train", trainable=("*adapter*", nn.LayerNorm)).bn
        'train'
    """

    bn: ModePolicy = "eval"
    dropout: ModePolicy = "eval"
    trainable: Sequence[TrainableSpec] = ()

    def __post_init__(self) -> None:
        for name in ("bn", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in _MODE_POLICIES:
                raise ValueError(f"{name} must be 'eval' or 'train', got {_describe(value)}")
        given: object = self.trainable
        if isinstance(given, str | type) or not isinstance(given, Iterable):
            raise TypeError(
                "trainable must be a sequence of name patterns and module types, "
                f"got {_describe(given)}"
            )
        specs = tuple(given)
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                continue
            if not (isinstance(spec, type) and issubclass(spec, nn.Module)):
                raise TypeError(
                    f"trainable[{i}] must be a name pattern (str) or an nn.Module subclass, "
                    f"got {_describe(spec)}"
                )
        object.__setattr__(self, "trainable", specs)


# ---------------------------------------------------------------------------------------
# Planning: read-only; decides what a hold will touch and validates before any mutation.


@dataclass
class _Plan:
    module: nn.Module
    params: list[nn.Parameter]  # to freeze
    pinned: list[nn.Module]
    matched: set[int]  # indices into policy.trainable that matched something
    every_param: list[nn.Parameter]  # all of the module's, trainable exceptions included


def _matches(name: str, module: nn.Module | None, specs: Sequence[TrainableSpec]) -> set[int]:
    hits = set()
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            if name and fnmatch.fnmatchcase(name, spec):
                hits.add(i)
        elif module is not None and isinstance(module, spec):
            hits.add(i)
    return hits


def _walk(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``named_modules(remove_duplicate=False)`` in the same order, without recursion.

    Planning runs on every guarded step; nested generators made it the guard's main cost.
    """
    stack: list[tuple[str, nn.Module]] = [("", module)]
    while stack:
        name, sub = stack.pop()
        yield name, sub
        children = [
            (f"{name}.{k}" if name else k, m) for k, m in sub._modules.items() if m is not None
        ]
        stack.extend(reversed(children))


def plan_freeze(module: nn.Module, policy: FreezePolicy) -> _Plan:
    """Work out what freezing ``module`` under ``policy`` touches, without touching it."""
    specs = policy.trainable
    matched: set[int] = set()
    exempt_prefixes: list[str] = []
    pinned: list[nn.Module] = []
    pinned_ids: set[int] = set()
    exempt_ids: set[int] = set()
    seen: dict[int, nn.Parameter] = {}
    # One traversal, aliases included (a shared submodule or tied parameter is seen under
    # each of its names, so a pattern may match any of them).
    for name, sub in _walk(module):
        hits = _matches(name, sub, specs) if specs else set()
        matched |= hits  # count matches inside exempt subtrees too
        under = bool(exempt_prefixes) and any(
            name == p or name.startswith(p + ".") for p in exempt_prefixes
        )
        exempt_sub = under or bool(hits)
        if hits and not under:
            exempt_prefixes.append(name)
        if (
            not exempt_sub
            and (
                (policy.bn == "eval" and isinstance(sub, _NormBase))
                or (policy.dropout == "eval" and isinstance(sub, _DropoutNd))
            )
            and id(sub) not in pinned_ids
        ):
            pinned_ids.add(id(sub))
            pinned.append(sub)
        for pname, param in sub._parameters.items():
            if param is None:
                continue
            seen.setdefault(id(param), param)
            phits = _matches(f"{name}.{pname}" if name else pname, None, specs) if specs else set()
            matched |= phits
            if phits or exempt_sub:
                exempt_ids.add(id(param))
    params = [p for key, p in seen.items() if key not in exempt_ids]
    return _Plan(
        module=module,
        params=params,
        pinned=pinned,
        matched=matched,
        every_param=list(seen.values()),
    )


def check_patterns_matched(policy: FreezePolicy, plans: Iterable[_Plan], where: str) -> None:
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


# ---------------------------------------------------------------------------------------
# The ledger: reference-counted holds on parameters and modules.


@dataclass
class _ParamHold:
    param: nn.Parameter
    requires_grad: bool
    count: int = 0


@dataclass
class _ModuleHold:
    module: nn.Module
    own_forward: Any  # an instance attribute `forward` that existed before, or _MISSING
    wrapper: _FrozenForward
    grad: int = 0  # holds as a frozen module: no graph when nothing needs one
    eval: int = 0  # holds as a pinned BatchNorm/dropout layer: eval mode per call


_MISSING = object()
_PARAMS: dict[int, _ParamHold] = {}
_MODULES: dict[int, _ModuleHold] = {}
#: Instance attribute caching a module's wrapper between holds (see _FrozenForward).
_CACHE_ATTR = "_freezesched_forward"


def is_frozen(obj: torch.Tensor | nn.Module) -> bool:
    """Whether a parameter, or every parameter of a module, is held frozen by freezesched.

    Args:
        obj: A parameter, or a module (a module without parameters is never frozen).

    Raises:
        TypeError: ``obj`` is neither a tensor nor a module.

    Examples:
        >>> from freezesched import FrozenStageGuard, Constant
        >>> layer = nn.Linear(2, 2)
        >>> with FrozenStageGuard(Constant(True))(layer, 0):
        ...     is_frozen(layer.weight), is_frozen(layer)
        (True, True)
        >>> is_frozen(layer.weight), is_frozen(layer)
        (False, False)
    """
    if isinstance(obj, nn.Module):
        params = list(obj.parameters())
        return bool(params) and all(id(p) in _PARAMS for p in params)
    if isinstance(obj, torch.Tensor):
        return id(obj) in _PARAMS
    raise TypeError(f"obj must be a parameter or an nn.Module, got {_describe(obj)}")


def _hold_param(param: nn.Parameter) -> None:
    hold = _PARAMS.get(id(param))
    if hold is None:
        hold = _PARAMS[id(param)] = _ParamHold(param, param.requires_grad)
    hold.count += 1
    param.requires_grad_(False)
    # A stale (even all-zero) .grad would let weight decay and momentum move the weight.
    param.grad = None


def _release_param(param: nn.Parameter) -> bool:
    """Drop one hold; return True if the parameter is free again."""
    hold = _PARAMS[id(param)]
    hold.count -= 1
    if hold.count:
        return False
    del _PARAMS[id(param)]
    param.requires_grad_(hold.requires_grad)
    return True


class _ClassMethodCall:
    """Calls ``type(module).<name>(module, ...)``: what a copy of a pinned attribute becomes.

    A module deep-copied or pickled while frozen must not carry freezesched's instance
    attributes along: they point at the *original* module. Copies get this transparent
    stand-in instead, which behaves exactly like the class's own method on the copy.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.module), self.name)(self.module, *args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple[nn.Module, str]]:
        return (_ClassMethodCall, (self.module, self.name))


_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _may_require_grad(obj: object) -> bool:
    """Whether ``obj`` holds a tensor that requires grad; unknown objects count as yes."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, _PLAIN):
        return False
    if isinstance(obj, list | tuple):
        return any(_may_require_grad(x) for x in obj)
    if isinstance(obj, Mapping):
        return any(_may_require_grad(x) for x in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_may_require_grad(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    # Something we cannot look into may carry a tensor that needs a graph: keep autograd on
    # (correct, only less memory-efficient) rather than silently cutting gradients.
    return True


class _FrozenForward:
    """Shadows ``module.forward`` while the module is held; one object per module.

    As a frozen module (``no_grad``), the forward runs under :func:`torch.no_grad` when
    nothing flowing in needs grad. As a pinned BatchNorm/dropout layer (``eval``), each
    call runs with ``training=False`` and puts the flag back afterwards (also when the
    forward raises): ``module.training`` keeps meaning what was last asked for, by
    ``train()``/``eval()`` or by assignment (Lightning restores modes that way after
    validation), so nothing needs restoring when the hold ends.

    The object is cached on the module and reused by every later hold, so that
    ``torch.compile`` sees the same ``forward`` each time a module is frozen again and
    reuses the graph it compiled for that state instead of recompiling.
    """

    def __init__(self, module: nn.Module, own: Any) -> None:
        self.module = module
        self.own = own  # the instance `forward` it shadows, or _MISSING for the class's
        self.params = list(module.parameters())
        self.no_grad = False
        self.eval = False

    def _inner(self, *args: Any, **kwargs: Any) -> Any:
        if self.own is _MISSING:
            return type(self.module).forward(self.module, *args, **kwargs)
        return self.own(*args, **kwargs)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (
            self.no_grad
            and torch.is_grad_enabled()
            and not (
                any(p.requires_grad for p in self.params)
                or _may_require_grad(args)
                or _may_require_grad(kwargs)
            )
        ):
            with torch.no_grad():
                return self._inner(*args, **kwargs)
        return self._inner(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.eval:
            return self._run(args, kwargs)
        module = self.module
        flag = module.training
        module.training = False
        try:
            return self._run(args, kwargs)
        finally:
            module.training = flag

    def __reduce__(self) -> tuple[type, tuple[nn.Module, str]]:
        return (_ClassMethodCall, (self.module, "forward"))


def _hold_module(
    module: nn.Module, *, as_eval: bool, params: list[nn.Parameter] | None = None
) -> None:
    hold = _MODULES.get(id(module))
    if hold is None:
        own = module.__dict__.get("forward", _MISSING)
        wrapper = module.__dict__.get(_CACHE_ATTR)
        if not (
            isinstance(wrapper, _FrozenForward) and wrapper.module is module and wrapper.own is own
        ):
            wrapper = _FrozenForward(module, own)
            module.__dict__[_CACHE_ATTR] = wrapper
        hold = _MODULES[id(module)] = _ModuleHold(module, own, wrapper)
        module.__dict__["forward"] = wrapper
    if as_eval:
        hold.eval += 1
    else:
        if not hold.grad:  # the parameters the no-grad test looks at, if they changed
            params = list(module.parameters()) if params is None else params
            if len(params) != len(hold.wrapper.params) or any(
                a is not b for a, b in zip(params, hold.wrapper.params, strict=True)
            ):
                hold.wrapper.params = params
        hold.grad += 1
    hold.wrapper.eval, hold.wrapper.no_grad = hold.eval > 0, hold.grad > 0


def _release_module(module: nn.Module, *, as_eval: bool) -> None:
    hold = _MODULES[id(module)]
    if as_eval:
        hold.eval -= 1
    else:
        hold.grad -= 1
    hold.wrapper.eval, hold.wrapper.no_grad = hold.eval > 0, hold.grad > 0
    if hold.eval or hold.grad:
        return
    del _MODULES[id(module)]
    if module.__dict__.get("forward") is not hold.wrapper:
        warnings.warn(
            f"{type(module).__name__}.forward was replaced while the module was frozen; "
            "freezesched leaves the replacement in place",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if hold.own_forward is _MISSING:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = hold.own_forward


class FreezeHandle:
    """One active hold on a module; :meth:`release` undoes it (idempotent)."""

    def __init__(self, plan: _Plan) -> None:
        self.module = plan.module
        self.params = tuple(plan.params)
        self._pinned = tuple(plan.pinned)
        self._every_param = plan.every_param
        self._active = False

    def _acquire(self) -> None:
        # Holds cannot fail half-way for valid plans, but keep the ledger consistent anyway.
        done: list[Callable[[], object]] = []
        try:
            for param in self.params:
                _hold_param(param)
                done.append(functools.partial(_release_param, param))
            for sub in self._pinned:
                _hold_module(sub, as_eval=True)
                done.append(functools.partial(_release_module, sub, as_eval=True))
            _hold_module(self.module, as_eval=False, params=self._every_param)
        except BaseException:
            for undo in reversed(done):
                undo()
            raise
        self._active = True

    @property
    def active(self) -> bool:
        """Whether this hold is still in force."""
        return self._active

    def release(self) -> list[nn.Parameter]:
        """Undo this hold; return the parameters that became free (not held elsewhere)."""
        if not self._active:
            return []
        self._active = False
        _release_module(self.module, as_eval=False)
        for sub in reversed(self._pinned):
            _release_module(sub, as_eval=True)
        return [p for p in reversed(self.params) if _release_param(p)]


def freeze(plan: _Plan) -> FreezeHandle:
    """Apply a plan made by :func:`plan_freeze`; the returned handle undoes it."""
    handle = FreezeHandle(plan)
    handle._acquire()
    return handle
