"""FrozenStageGuard and freeze(): freeze modules for one region of code, restore them after."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from torch import nn
from typing_extensions import Self

from freezesched.freezing._fast import drop_fast
from freezesched.freezing._mechanism import (
    _DEPTH,
    CachedPlan,
    Hold,
    Plan,
    check_patterns_matched,
    critical,
    deliver_interrupt,
    interrupt_pending,
    is_main_thread,
    plan_freeze,
)
from freezesched.freezing._policy import FreezePolicy, ModePolicy, TrainableSpec, resolve_policy
from freezesched.freezing._targets import TargetSpec, parse_stages, resolve_stages
from freezesched.schedules import ScheduleLike, check_schedule, commit, evaluate, num_stages

__all__ = ["FrozenRegion", "FrozenStageGuard", "freeze"]


class FrozenRegion:
    """The context manager returned by ``guard(target, tick)`` and :func:`freeze`.

    Entering it freezes the stages it decided to freeze; leaving it (also by an
    exception) restores them. Enter it once.

    Attributes:
        stages: The guarded modules, one group per stage.
        frozen: One decision per stage (``True`` = frozen in this region).
        policy: How the frozen stages are frozen.
    """

    def __init__(
        self,
        stages: tuple[tuple[nn.Module, ...], ...],
        frozen: tuple[bool, ...],
        policy: FreezePolicy,
        plan_cache: PlanCache | None = None,
    ) -> None:
        self.stages = stages
        self.frozen = frozen
        self.policy = policy
        self._cache = plan_cache
        self._holds: list[Hold] | None = None

    @property
    def frozen_modules(self) -> tuple[nn.Module, ...]:
        """The modules frozen in this region, in stage order."""
        return tuple(
            m for stage, f in zip(self.stages, self.frozen, strict=True) if f for m in stage
        )

    def __repr__(self) -> str:
        return f"FrozenRegion(frozen={self.frozen}, entered={self._holds is not None})"

    def plans(self) -> list[Plan]:
        """What entering would touch, worked out without touching anything.

        Raises:
            ValueError: a trainable exception matches nothing, a parameter is an
                uninitialized lazy one, or a shared module is trainable under one name
                and frozen under another.
        """
        modules = self.frozen_modules
        if self._cache is not None:
            plans = self._cache.get(modules, self.policy)
            if plans is not None:
                return plans
        plans = [plan_freeze(m, self.policy) for m in modules]
        if plans:
            check_patterns_matched(self.policy, plans, "the frozen modules")
        if self._cache is not None:
            self._cache.put(modules, self.policy, plans)
        return plans

    @critical
    def __enter__(self) -> Self:
        if self._holds is not None:
            raise RuntimeError("this region was already entered; call guard(...) for a new one")
        plans = self.plans()  # read-only: bad input leaves the model untouched
        if self.policy.fast is not None:  # issue 17: a trainable stage ends a frozen phase
            for stage, frozen in zip(self.stages, self.frozen, strict=True):
                for module in stage if not frozen else ():
                    drop_fast(module)
        holds = [Hold(plan) for plan in plans]
        entered, main, added = False, is_main_thread(), 0
        try:
            # One statement without calls: no Ctrl-C can fall between raising the depth
            # and recording that it was raised.
            _DEPTH[0], added = _DEPTH[0] + main, main
            try:
                for hold in holds:
                    hold.acquire()
            except BaseException:
                _release_all(holds)
                raise
            if interrupt_pending():  # a Ctrl-C came meanwhile: undo, then deliver it
                _release_all(holds)
            else:
                self._holds = holds
                entered = True
        finally:
            _DEPTH[0] -= added  # no call between here and the return: no signal gap
        if entered:
            return self
        deliver_interrupt()  # raises KeyboardInterrupt with the default handler
        return self.__enter__()  # the handler ignored it: enter as if nothing happened

    @critical
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        main, added = is_main_thread(), 0
        try:
            _DEPTH[0], added = _DEPTH[0] + main, main
            _release_all(self._holds or [])
            self._holds = []
        except BaseException as error:
            if exc is None:
                raise
            if hasattr(exc, "add_note"):
                exc.add_note(f"freezesched: while restoring after this error: {error!r}")
        finally:
            _DEPTH[0] -= added
            deliver_interrupt()


class PlanCache:
    """A guard's plans for the module trees it froze last, reused while a tree is unchanged.

    Planning walks the whole tree and was most of a guarded step's overhead; a cached
    plan is checked against the tree instead (:meth:`CachedPlan.revive`). Plans are kept
    without references to the models, so a guard keeps no model alive. A plan is reused
    only under the policy it was made with (the very object: a guard whose ``policy`` is
    reassigned plans again), and the cache may be shared by threads.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._plans: dict[tuple[int, ...], tuple[FreezePolicy, list[CachedPlan]]] = {}
        self._lock = threading.Lock()

    def get(self, modules: tuple[nn.Module, ...], policy: FreezePolicy) -> list[Plan] | None:
        key = tuple(map(id, modules))
        with self._lock:
            found = self._plans.get(key)
        if found is None or found[0] is not policy:
            return None
        plans = [p for p in (c.revive() for c in found[1]) if p is not None]
        fresh = len(plans) == len(modules) and all(
            p.module is m for p, m in zip(plans, modules, strict=True)
        )
        with self._lock:
            if self._plans.get(key) is found:
                del self._plans[key]
                if fresh:
                    self._plans[key] = found  # most recently used last
        return plans if fresh else None

    def put(self, modules: tuple[nn.Module, ...], policy: FreezePolicy, plans: list[Plan]) -> None:
        cached = [plan.cached() for plan in plans]
        if any(c is None for c in cached):
            return
        with self._lock:
            self._plans[tuple(map(id, modules))] = (policy, cached)  # type: ignore[assignment]
            while len(self._plans) > self.size:
                del self._plans[next(iter(self._plans))]


def _release_all(holds: list[Hold]) -> None:
    """Release every hold (each completes even if another raised); raise the first error."""
    error: BaseException | None = None
    for hold in reversed(holds):
        try:
            hold.release()
        except BaseException as caught:
            error = error or caught
    if error is not None:
        raise error


def _policy(
    policy: FreezePolicy | None,
    bn: ModePolicy | None,
    dropout: ModePolicy | None,
    trainable: Sequence[TrainableSpec] | None,
) -> FreezePolicy:
    return resolve_policy(policy, bn=bn, dropout=dropout, trainable=trainable)


class FrozenStageGuard:
    """Freeze a submodule for a region of code when the schedule says so.

    ``guard(target, tick)`` returns a :class:`FrozenRegion`. Inside it, for each stage the
    schedule freezes at ``tick``:

    * its parameters have ``requires_grad=False`` and ``.grad is None``, so no optimizer
      (momentum, weight decay, Adam moments, decoupled decay) moves them, even when the
      loop calls ``zero_grad(set_to_none=False)``; a gradient accumulated in them before
      the region is discarded. Autograd keeps no activation for their weights, and none
      at all for a frozen prefix of the model; a frozen middle stage still passes input
      gradients back. Tensors that reach the forward another way (``functional_call``,
      an adapter attached by a hook) get exactly the gradients they would without the
      guard;
    * BatchNorm and dropout layers follow ``bn`` / ``dropout``, and every other buffer
      stays bitwise unchanged (see :class:`FreezePolicy`);
    * exceptions named in ``trainable`` stay trainable, with correct gradients.

    On exit, also when the body raises, every ``requires_grad`` flag and train/eval mode is
    restored exactly; nothing of freezesched stays on the modules. Constructing a guard,
    or calling it, touches nothing; only entering the region does.

    Nesting, overlap and threads: holds are counted per parameter and module, so nested
    or overlapping regions (``backbone`` and ``backbone.layer1``, two guards, two threads)
    freeze the union, and each object returns to its original state when the last region
    holding it exits. Where policies differ, the stricter one wins.

    Args:
        schedule: A :class:`~freezesched.schedules.Schedule`, or any pure function of the
            tick that returns ``bool`` (frozen) or a tuple of bools (one per stage).
        modules: What to freeze, as names (or groups of names) resolved against the model
            passed to ``guard(model, tick)``; one entry per stage for a per-stage
            schedule. Leave it out to pass the modules themselves to ``guard(...)``.
        policy: How to freeze (:class:`FreezePolicy`); the keyword shortcuts below
            replace its fields.
        bn: BatchNorm policy while frozen, ``"eval"`` (default) or ``"train"``.
        dropout: Dropout policy while frozen, ``"eval"`` (default) or ``"train"``.
        trainable: Name patterns and module types that stay trainable inside a frozen
            module (adapters, LoRA, norms, a classifier); each must match something.

    Raises:
        TypeError: ``schedule`` is not callable, or an argument is malformed.
        ValueError: ``bn`` or ``dropout`` is not ``"eval"`` or ``"train"``, or ``modules``
            does not fit a per-stage schedule.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from freezesched import FrozenStageGuard, Step
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> guard = FrozenStageGuard(Step(2))  # trainable on even ticks
        >>> with guard(model[0], 1) as region:
        ...     model(torch.randn(3, 4)).sum().backward()
        ...     region.frozen, model[0].weight.requires_grad, model[0].weight.grad
        ((True,), False, None)
        >>> model[0].weight.requires_grad, model[2].weight.grad is not None
        (True, True)

        Freezing everything but the classifier of a model without a ``.backbone``:

        >>> everything_but_head = FrozenStageGuard(Step(2), trainable=["2*"])
        >>> with everything_but_head(model, 1):
        ...     [p.requires_grad for p in model.parameters()]
        [False, False, True, True]
    """

    def __init__(
        self,
        schedule: ScheduleLike,
        modules: TargetSpec | None = None,
        *,
        policy: FreezePolicy | None = None,
        bn: ModePolicy | None = None,
        dropout: ModePolicy | None = None,
        trainable: Sequence[TrainableSpec] | None = None,
    ) -> None:
        self.schedule = check_schedule(schedule)
        self.policy = _policy(policy, bn, dropout, trainable)
        self._plans = PlanCache()
        self.modules = None if modules is None else parse_stages(modules, "modules")
        stages = num_stages(self.schedule)
        if self.modules is not None and stages not in (None, 1, len(self.modules)):
            raise ValueError(
                f"modules must have one entry per stage of the schedule ({stages}), "
                f"got {len(self.modules)}"
            )

    def __repr__(self) -> str:
        return (
            f"FrozenStageGuard({self.schedule!r}, modules={self.modules!r}, policy={self.policy})"
        )

    def decide(self, tick: int, stages: int = 1) -> tuple[bool, ...]:
        """The decision per stage at ``tick`` (``True`` = frozen), touching nothing.

        It only reads: for an adaptive schedule, ``tick`` must be decided already
        (:class:`~freezesched.schedules.UndecidedTickError` otherwise); calling the guard
        decides it.

        Examples:
            >>> from freezesched import Layerwise
            >>> FrozenStageGuard(Layerwise.gradual_unfreeze(3)).decide(1, stages=3)
            (True, False, False)
        """
        return evaluate(self.schedule, tick, stages)

    def __call__(self, target: TargetSpec, tick: int) -> FrozenRegion:
        """A region freezing ``target`` as the schedule decides at ``tick``.

        For an adaptive schedule this decides ``tick`` for good
        (:func:`~freezesched.schedules.commit`): give it the observations of earlier ticks
        first (``schedule.observe(t, value)``).

        Args:
            target: The model the guard's ``modules`` names are looked up in; or, for a
                guard built without ``modules``, what to freeze: a module, or one entry per
                stage (a module or a list of modules frozen together).
            tick: The current epoch or iteration, an int in ``[0, 2**53 - 1]``.

        Raises:
            TypeError: ``target`` or ``tick`` has the wrong type.
            ValueError: ``tick`` is out of range, a name is unknown, a module is given
                twice, or the number of stages does not fit the schedule.
        """
        if self.modules is not None:
            if not isinstance(target, nn.Module):
                raise TypeError(
                    "this guard was built with modules= names, so guard(model, tick) takes "
                    f"the model they are looked up in, got {type(target).__name__}"
                )
            stages = resolve_stages(self.modules, target)
        else:
            stages = resolve_stages(parse_stages(target, "target"), None, "target")
        return FrozenRegion(
            stages, commit(self.schedule, tick, len(stages)), self.policy, self._plans
        )


def freeze(
    target: TargetSpec,
    modules: TargetSpec | None = None,
    *,
    policy: FreezePolicy | None = None,
    bn: ModePolicy | None = None,
    dropout: ModePolicy | None = None,
    trainable: Sequence[TrainableSpec] | None = None,
) -> FrozenRegion:
    """Freeze now, for the ``with`` block: the guard without a schedule.

    Same guarantees as :class:`FrozenStageGuard` (which is "freeze when the schedule
    says"). Use it for a phase of training, a calibration pass, or around building a
    ``DistributedDataParallel`` so that it leaves the frozen part out of its buckets.

    Args:
        target: What to freeze (a module, or several, or groups); or, with ``modules``,
            the model those names are looked up in.
        modules: Dotted names of the submodules to freeze.
        policy: How to freeze; the keyword shortcuts replace its fields.
        bn: BatchNorm policy while frozen.
        dropout: Dropout policy while frozen.
        trainable: Exceptions that stay trainable.

    Raises:
        TypeError, ValueError: as for :class:`FrozenStageGuard`.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> with freeze(model, ["0"]):
        ...     model[0].weight.requires_grad, model[1].weight.requires_grad
        (False, True)
    """
    if modules is not None:
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"with modules= names, target must be the model they are looked up in, "
                f"got {type(target).__name__}"
            )
        stages = resolve_stages(parse_stages(modules, "modules"), target)
    else:
        stages = resolve_stages(parse_stages(target, "target"), None, "target")
    return FrozenRegion(stages, (True,) * len(stages), _policy(policy, bn, dropout, trainable))
