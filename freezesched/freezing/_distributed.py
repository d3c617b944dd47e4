"""The one check that a distributed engine is set up so that freezing cannot break it.

Each engine decides *once* what it synchronizes, and freezing changes what trains:

* ``DistributedDataParallel`` all-reduces the gradients of the parameters that required
  grad when it was built (its *managed* parameters). With ``find_unused_parameters=False``
  (or ``static_graph=True``) it expects a gradient for every one of them at every step, so
  a parameter frozen *after* wrapping makes it fail one step after the first frozen one
  (``Expected to have finished reduction in the prior iteration``), after the ranks have
  diverged. A parameter frozen *before* wrapping is never synchronized, so unfreezing it
  later lets every rank train its own copy, without an error.
* DeepSpeed ZeRO (stages 1-3) builds its partitioned optimizer from the parameters that
  require grad at ``deepspeed.initialize``: one frozen later still has its (zero) gradient
  partitions reduced and its weights rewritten from the fp32 master copy by the optimizer,
  so it moves; one frozen before is never updated again.
* ``FullyShardedDataParallel(use_orig_params=False)`` (FSDP1) replaces the parameters of
  every module it wraps by views into one flat parameter: there is nothing per module
  left to freeze.
* ``fully_shard`` (FSDP2) keeps a sharded parameter per original one and registers an
  unsharded copy on the module between its all-gather and its reshard; the sharded one is
  what it copies ``requires_grad`` from, so that is the one to freeze
  (:func:`fsdp2_sharded_counterparts`).

Every API that freezes asks here: the controller when it is built (it knows the wrapper
and the schedules, so it refuses before training starts) and before every unfreeze, and
the guard through the process-global forward hook, which sees a wrapper being called
(:func:`check_call`) before it does anything.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from freezesched.schedules import Constant, Layerwise, ScheduleLike, Step

__all__ = [
    "DDP_RECIPE",
    "DEEPSPEED_RECIPE",
    "FSDP1_RECIPE",
    "check_call",
    "check_ddp_call",
    "check_ddp_settings",
    "check_flat_parameter_views",
    "check_unfreeze",
    "check_wrapper",
    "constant_decision",
    "deepspeed_engine",
    "fsdp2_sharded_counterparts",
    "managed_parameters",
    "unwrap",
]

DDP_RECIPE = (
    "Either build DistributedDataParallel(..., find_unused_parameters=True, "
    "static_graph=False), or, if the frozen part stays frozen for the whole run, freeze it "
    "before wrapping (DDP then leaves it out of its buckets)"
)
DEEPSPEED_RECIPE = (
    "DeepSpeed fixes the set of trainable parameters at deepspeed.initialize: freeze the part "
    "before initialize and keep it frozen for the whole run (a Constant(True) or "
    "Step(math.inf) schedule, or `with freeze(model.backbone):` around initialize and "
    "training); for a schedule that toggles, use DDP (find_unused_parameters=True) or "
    "FSDP2 (fully_shard), which follow requires_grad at every step"
)
FSDP1_RECIPE = (
    "Wrap with FullyShardedDataParallel(..., use_orig_params=True), which keeps one "
    "parameter per original one and follows requires_grad at every step, or use FSDP2 "
    "(torch.distributed.fsdp.fully_shard)"
)


def _loaded(module: str, name: str) -> type | None:
    """``module.name`` if that module is imported already (never imports it)."""
    found = sys.modules.get(module)
    cls = getattr(found, name, None) if found is not None else None
    return cls if isinstance(cls, type) else None


def deepspeed_engine(module: object) -> bool:
    """Whether ``module`` is a ``deepspeed.DeepSpeedEngine`` (without importing DeepSpeed)."""
    cls = _loaded("deepspeed.runtime.engine", "DeepSpeedEngine")
    return cls is not None and isinstance(module, cls)


def _fsdp1(module: object) -> bool:
    cls = _loaded("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
    return cls is not None and isinstance(module, cls)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a data-parallel wrapper, else ``model``.

    Unwraps ``DataParallel``, ``DistributedDataParallel``, ``FullyShardedDataParallel``
    (FSDP1) and DeepSpeed engines; FSDP2 (``fully_shard``) leaves the model itself.
    """
    while (
        isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel)
        or _fsdp1(model)
        or deepspeed_engine(model)
    ):
        inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def constant_decision(schedule: ScheduleLike, stage: int = 0) -> bool | None:
    """``True`` if ``schedule`` provably freezes at every tick, ``False`` if never, else ``None``.

    Only what the schedule's structure proves counts: ``Constant(f)``, ``Step(1)`` (never
    frozen), ``Step(math.inf)`` (always frozen), and a ``Layerwise`` stage that is one of
    these. Anything else (a plain function included) is ``None``: it may toggle.

    Examples:
        >>> import math
        >>> from freezesched import Constant, Step, UnfreezeAt
        >>> constant_decision(Constant(True)), constant_decision(Step(math.inf))
        (True, True)
        >>> constant_decision(Step(1)), constant_decision(UnfreezeAt(3))
        (False, None)
    """
    if isinstance(schedule, Layerwise):
        return constant_decision(schedule.stages[stage]) if stage < len(schedule.stages) else None
    if isinstance(schedule, Constant):
        return bool(schedule.frozen)
    if isinstance(schedule, Step):
        if schedule.rho == 1:
            return False
        if math.isinf(schedule.rho):
            return True
    return None


def check_ddp_settings(
    find_unused_parameters: bool | None,
    static_graph: bool,
    *,
    where: str,
    fix: str = DDP_RECIPE,
) -> None:
    """Raise ``ValueError`` if DDP with these settings breaks once a parameter freezes.

    Args:
        find_unused_parameters: The wrapper's setting (``None``: unknown, left alone).
        static_graph: The wrapper's setting.
        where: What was checked, for the message (e.g. ``"runner.model"``).
        fix: What to do instead, in the words of the framework at hand.

    Raises:
        ValueError: ``find_unused_parameters`` is ``False`` or ``static_graph`` is true.

    Examples:
        >>> check_ddp_settings(True, False, where="model")
        >>> check_ddp_settings(False, False, where="model", fix="Use X.")
        Traceback (most recent call last):
        ...
        ValueError: model is DistributedDataParallel with find_unused_parameters=False and ...
    """
    if find_unused_parameters is False or static_graph:
        raise ValueError(
            f"{where} is DistributedDataParallel with find_unused_parameters="
            f"{find_unused_parameters} and static_graph={static_graph}: it expects a gradient "
            "for every parameter it manages at every step, so freezing one of them after "
            "wrapping makes the ranks' gradients go out of sync and DDP fail at the next step "
            f"('Expected to have finished reduction in the prior iteration'). {fix}"
        )


# --- which parameters each wrapper synchronizes ----------------------------------------

_MANAGED: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()
_UNMANAGED: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()
#: Wrappers the forward hook has seen called while something was frozen: the controller
#: asks them before it unfreezes anything (:func:`check_unfreeze`).
_SEEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _ddp_managed(ddp: nn.parallel.DistributedDataParallel) -> list[torch.Tensor] | None:
    reducer = getattr(ddp, "reducer", None)
    buckets = getattr(reducer, "_get_zeros_like_grad_buckets", None)
    try:
        return [p for bucket in buckets() for p in bucket.parameters()] if buckets else None
    except (RuntimeError, AttributeError, TypeError):
        return None


def _deepspeed_managed(engine: nn.Module) -> list[torch.Tensor] | None:
    optimizer = getattr(engine, "optimizer", None)
    for attribute in ("bit16_groups", "fp16_groups"):  # ZeRO-1/2, ZeRO-3
        groups = getattr(optimizer, attribute, None)
        if isinstance(groups, list | tuple):
            return [p for group in groups for p in group]
    if isinstance(optimizer, torch.optim.Optimizer):  # no ZeRO: the client's optimizer
        return [p for group in optimizer.param_groups for p in group["params"]]
    return None


def managed_parameters(wrapper: nn.Module) -> list[torch.Tensor]:
    """The parameters whose gradients ``wrapper`` synchronizes, fixed when it was built.

    For ``DistributedDataParallel``: those in its reducer's buckets (the parameters that
    required grad when it was built, less those it was told to ignore). For a DeepSpeed
    engine: those in its (ZeRO) optimizer's groups. Read once per wrapper; where that is
    unavailable, every parameter of the module is assumed managed, so a doubt leads to a
    refusal, not a hang.
    """
    cached = _MANAGED.get(wrapper)
    if cached is not None:
        return cached
    if isinstance(wrapper, nn.parallel.DistributedDataParallel):
        params = _ddp_managed(wrapper)
    elif deepspeed_engine(wrapper):
        params = _deepspeed_managed(wrapper)
    else:
        params = None
    if params is None:
        params = list(unwrap(wrapper).parameters())
    _MANAGED[wrapper] = params
    return params


def _ignored(wrapper: nn.Module) -> set[int]:
    """Parameters a DDP was told to leave alone (synchronized by the user, by contract)."""
    names = getattr(wrapper, "parameters_to_ignore", None) or ()
    inner = unwrap(wrapper)
    out = set()
    for name in names:
        try:
            out.add(id(inner.get_parameter(name)))
        except AttributeError:
            continue
    return out


def _unmanaged(wrapper: nn.Module) -> list[torch.Tensor]:
    """Parameters of the wrapped module the wrapper never synchronizes (frozen when built)."""
    cached = _UNMANAGED.get(wrapper)
    if cached is None:
        managed = {id(p) for p in managed_parameters(wrapper)} | _ignored(wrapper)
        cached = [p for p in unwrap(wrapper).parameters() if id(p) not in managed]
        _UNMANAGED[wrapper] = cached
    return cached


def _engine_name(wrapper: nn.Module) -> str:
    if deepspeed_engine(wrapper):
        stage = getattr(wrapper, "zero_optimization_stage", None)
        level = stage() if callable(stage) else None
        return f"a DeepSpeed engine (ZeRO stage {level})"
    return "DistributedDataParallel"


def _unmanaged_message(wrapper: nn.Module, count: int, where: str, when: str) -> str:
    fix = (
        DEEPSPEED_RECIPE
        if deepspeed_engine(wrapper)
        else (
            "Build DistributedDataParallel(..., find_unused_parameters=True) with the part "
            "trainable (freezesched freezes it after wrapping), or keep it frozen for the "
            "whole run (Constant(True) or Step(math.inf))"
        )
    )
    return (
        f"{where}: {count} parameter(s) were frozen when {_engine_name(wrapper)} was built, "
        f"so it never synchronizes them; {when}, each rank would train its own copy and the "
        f"ranks would silently diverge. {fix}"
    )


# --- the checks ----------------------------------------------------------------------------


def check_wrapper(
    model: nn.Module,
    targets: Sequence[tuple[str, Sequence[torch.Tensor], bool | None]],
    can_train: Callable[[torch.Tensor], bool] | None = None,
) -> None:
    """Before training starts: refuse schedules ``model``'s wrapper cannot follow.

    Args:
        model: What the controller was given (a DDP, a DeepSpeed engine, or a plain model,
            which is left alone).
        targets: ``(name, parameters it freezes, constant_decision of its schedule)``.
        can_train: Whether unfreezing would make a parameter require grad (default: it
            does now). A parameter frozen outside freezesched (mmdet's ``frozen_stages``,
            peft) stays frozen whatever the schedule says, so DDP not synchronizing it is
            no divergence.

    Raises:
        ValueError: a managed parameter may freeze while the wrapper expects its gradient
            every step (DDP without ``find_unused_parameters=True``, DeepSpeed), or an
            unmanaged one may unfreeze (it would never be synchronized).
    """
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if not (is_ddp or deepspeed_engine(model)):
        return
    managed = {id(p) for p in managed_parameters(model)}
    ignored = _ignored(model)
    strict = deepspeed_engine(model) or not (
        model.find_unused_parameters and not getattr(model, "static_graph", False)
    )
    for name, params, constant in targets:
        synced = [p for p in params if id(p) in managed]
        unsynced = [
            p
            for p in params
            if id(p) not in managed
            and id(p) not in ignored
            and (can_train(p) if can_train is not None else p.requires_grad)
        ]
        if synced and strict and constant is not False:
            if isinstance(model, nn.parallel.DistributedDataParallel):
                check_ddp_settings(
                    model.find_unused_parameters,
                    bool(getattr(model, "static_graph", False)),
                    where=f"model (its {name!r} is scheduled to freeze at some tick)",
                )
            raise ValueError(
                f"model is {_engine_name(model)} and {name!r} ({len(synced)} of its parameters "
                "trainable at deepspeed.initialize) is scheduled to freeze at some tick: ZeRO "
                "would keep reducing their zero gradients and its optimizer would keep "
                f"rewriting them from its master copy, so they would move. {DEEPSPEED_RECIPE}"
            )
        if unsynced and constant is not True:
            raise ValueError(
                _unmanaged_message(
                    model, len(unsynced), f"model[{name!r}]", "its schedule unfreezes them"
                )
            )


def check_unfreeze(params: Iterable[torch.Tensor], where: str) -> None:
    """Before unfreezing ``params``: refuse if a wrapper seen in use never synchronizes one.

    Raises:
        ValueError: a parameter about to unfreeze was frozen when a DDP or DeepSpeed engine
            that has been called since was built.
    """
    if not _SEEN:
        return
    ids = {id(p) for p in params}
    for wrapper in list(_SEEN):
        unsynced = [p for p in _unmanaged(wrapper) if id(p) in ids]
        if unsynced:
            raise ValueError(_unmanaged_message(wrapper, len(unsynced), where, "unfrozen now"))


def check_ddp_call(module: nn.Module, is_frozen: Callable[[torch.Tensor], bool]) -> None:
    """At a forward call of a DDP or DeepSpeed engine: refuse what would break it.

    Raises:
        ValueError: the wrapper expects a gradient for a parameter that is frozen now
            (DDP with ``find_unused_parameters=False`` or ``static_graph=True``, DeepSpeed),
            or a parameter it never synchronizes requires grad now.
    """
    _SEEN.add(module)
    if deepspeed_engine(module):
        frozen = [p for p in managed_parameters(module) if is_frozen(p)]
        if frozen:
            raise ValueError(
                f"the model being called is {_engine_name(module)} and {len(frozen)} of the "
                "parameters it optimizes are frozen now: ZeRO would keep reducing their zero "
                "gradients and its optimizer would rewrite them from its master copy, so "
                f"they would move. {DEEPSPEED_RECIPE}"
            )
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        static = bool(getattr(module, "static_graph", False))
        if not module.find_unused_parameters or static:
            frozen = [p for p in managed_parameters(module) if is_frozen(p)]
            if frozen:
                check_ddp_settings(
                    module.find_unused_parameters,
                    static,
                    where=f"the model being called ({len(frozen)} of its parameters are frozen "
                    "now)",
                )
    else:
        return
    unsynced = [p for p in _unmanaged(module) if p.requires_grad]
    if unsynced:
        raise ValueError(
            _unmanaged_message(
                module, len(unsynced), "the model being called", "they require grad now"
            )
        )


def check_call(module: nn.Module, is_frozen: Callable[[torch.Tensor], bool]) -> None:
    """Refuse a wrapper call that freezing would break (see :func:`check_ddp_call`).

    The mechanism's forward pre-hook calls it for every module call while anything is
    frozen; it is cheap for everything that is not a DDP or DeepSpeed wrapper.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel) or deepspeed_engine(module):
        check_ddp_call(module, is_frozen)


# --- FSDP -----------------------------------------------------------------------------------


def check_flat_parameter_views(module: nn.Module, name: str) -> None:
    """Refuse freezing a module whose parameters FSDP1 flattened (``use_orig_params=False``).

    Cheap unless FSDP1 is imported: only modules without registered parameters are looked
    at, since FSDP1 replaces theirs by plain tensor views of its flat parameter.

    Raises:
        ValueError: ``module`` holds a ``FlatParameter`` or views of one that has no
            original parameters (``use_orig_params=False``).
    """
    flat = _loaded("torch.distributed.fsdp._flat_param", "FlatParameter")
    if flat is None:
        return
    found = None
    for key, param in module._parameters.items():
        if isinstance(param, flat):
            found = key
            break
    if found is None and not module._parameters:
        for key, value in vars(module).items():
            base = value._base if isinstance(value, torch.Tensor) else None
            if isinstance(base, flat) and getattr(base, "_params", None) is None:
                found = key
                break
    if found is not None:
        label = repr(name) if name else "the frozen module itself"
        raise ValueError(
            f"{label} ({type(module).__name__}) has its parameters ({found!r}) flattened by "
            "FullyShardedDataParallel(use_orig_params=False) into one flat parameter shared "
            "with the other modules of its FSDP unit, so it cannot be frozen on its own: "
            "its weights would keep training through 'frozen' epochs. " + FSDP1_RECIPE
        )


def _fsdp2_params() -> Iterable[Any] | None:
    """Every FSDPParam of every ``fully_shard`` state alive, or ``None`` if not readable."""
    state_module = sys.modules.get("torch.distributed._composable_state")
    mapping = getattr(state_module, "_module_state_mapping", None)
    if mapping is None:
        return None
    out: list[Any] = []
    try:
        for ref in list(mapping.values()):
            state = ref() if callable(ref) else ref
            group = getattr(state, "_fsdp_param_group", None)
            out.extend(getattr(group, "fsdp_params", ()) or ())
    except (RuntimeError, TypeError):
        return None
    return out


def fsdp2_sharded_counterparts(
    slots: Sequence[tuple[nn.Module, str, nn.Parameter]],
) -> list[nn.Parameter]:
    """The sharded parameters FSDP2 keeps for any of ``slots`` registered unsharded now.

    ``fully_shard`` registers an unsharded parameter on a module from its all-gather to
    its reshard (and the root keeps it after a forward without backward, such as a
    ``no_grad`` validation pass); at the next all-gather it copies ``requires_grad`` from
    the *sharded* parameter. Freezing only the unsharded one would be undone then, so both
    are frozen.

    Args:
        slots: ``(module, attribute, parameter)`` for every parameter being frozen.

    Raises:
        ValueError: an FSDP2-managed module holds a parameter that is not its sharded
            one and FSDP2's state cannot be read to find it.
    """
    managed = [
        (owner, attr, p)
        for owner, attr, p in slots
        if getattr(owner, "_is_fsdp_managed_module", False)
    ]
    if not managed:
        return []
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    suspects = [(o, a, p) for o, a, p in managed if dtensor is None or not isinstance(p, dtensor)]
    if not suspects:
        return []
    fsdp_params = _fsdp2_params()
    by_slot: dict[tuple[int, str], Any] = {}
    for fp in fsdp_params or ():
        info = getattr(fp, "_module_info", None)
        if info is None:
            continue
        by_slot[(id(info.module), info.param_name)] = fp
        for module, pname in zip(info.shared_modules, info.shared_param_names, strict=False):
            by_slot[(id(module), pname)] = fp
    out: list[nn.Parameter] = []
    for owner, attr, param in suspects:
        fp = by_slot.get((id(owner), attr))
        sharded = getattr(fp, "sharded_param", None) if fp is not None else None
        if sharded is None:
            if fsdp_params is None:
                raise ValueError(
                    f"{type(owner).__name__}.{attr} is managed by fully_shard (FSDP2) and "
                    "registered unsharded now, and freezesched cannot read FSDP2's state to "
                    "find the sharded parameter FSDP2 copies requires_grad from. Call "
                    ".reshard() on the root FSDP module before freezing"
                )
            continue  # not an FSDP2 parameter (e.g. a plain one next to sharded ones)
        if sharded is not param:
            out.append(sharded)
    return out
