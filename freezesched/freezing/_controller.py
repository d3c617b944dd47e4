"""FreezeController: apply schedules to named submodules for whole epochs, resumably.

It also feeds adaptive schedules: :meth:`FreezeController.observe` routes a metric to the
metric-driven ones, :meth:`FreezeController.record_gradients` measures the per-stage
gradient norms that gradient-driven ones observe at the next tick, both agreed on by
every rank; and :meth:`FreezeController.state_dict` saves their records.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from typing_extensions import Self

from freezesched._validation import check_tick, describe
from freezesched.freezing._distributed import (
    check_unfreeze,
    check_wrapper,
    constant_decision,
    fsdp2_sharded_counterparts,
    unwrap,
)
from freezesched.freezing._fast import drop_fast
from freezesched.freezing._mechanism import (
    Hold,
    Plan,
    check_patterns_matched,
    is_frozen,
    plan_freeze,
    restored_requires_grad,
)
from freezesched.freezing._optim import (
    LRRamp,
    LRRampHooks,
    as_optimizers,
    check_optimizers,
    reset_optimizer_state,
)
from freezesched.freezing._policy import (
    FreezePolicy,
    ModePolicy,
    OptimizerPolicy,
    TrainableSpec,
    resolve_policy,
)
from freezesched.freezing._signals import GradientSignal, agree_across_ranks, as_observation
from freezesched.freezing._targets import resolve
from freezesched.schedules import (
    GradientFreeze,
    Schedule,
    ScheduleLike,
    check_schedule,
    commit,
    num_stages,
    schedule_from_config,
    timeline,
)

__all__ = ["FreezeController"]

#: A key of ``schedules``: a name, or one entry per stage (a name or a group of names).
TargetKey = str | tuple[str | tuple[str, ...], ...]


@dataclass(frozen=True)
class _Target:
    key: TargetKey
    stages: tuple[tuple[str, ...], ...]
    schedule: ScheduleLike


def _stages_of(key: object) -> tuple[tuple[str, ...], ...]:
    rule = (
        "schedules keys must be a submodule name, or a tuple with one entry per stage, each "
        "a name or a tuple of names (a group frozen together)"
    )
    if isinstance(key, str):
        return ((key,),)
    if not isinstance(key, tuple | list) or not key:
        raise TypeError(f"{rule}; got {describe(key)}")
    stages = []
    for entry in key:
        if isinstance(entry, str):
            stages.append((entry,))
        elif isinstance(entry, tuple | list) and entry and all(isinstance(n, str) for n in entry):
            stages.append(tuple(entry))
        else:
            raise TypeError(f"{rule}; got {describe(key)}")
    return tuple(stages)


def _plan_current(plan: Plan) -> bool:
    """Whether ``plan``'s module tree is unchanged (a plan that cannot tell is not)."""
    return plan.signature is not None and plan.signature.alive() is not None


def _same_plan(a: Plan, b: Plan) -> bool:
    """Whether two plans of one module freeze, watch and pin exactly the same objects."""
    return (
        a.param_ids == b.param_ids
        and [(id(m), k) for m, k, _ in a.watch] == [(id(m), k) for m, k, _ in b.watch]
        and [id(m) for m, _ in a.scripted] == [id(m) for m, _ in b.scripted]
        and [(id(o), n, id(p)) for o, n, p in a.slots] == [(id(o), n, id(p)) for o, n, p in b.slots]
    )


class FreezeController:
    """Apply freeze schedules to named submodules at epoch (or any tick) granularity.

    :meth:`apply` is idempotent: it freezes and unfreezes only what changed since the
    last call, with the same mechanism (and guarantees) as
    :class:`~freezesched.FrozenStageGuard`, so a frozen module stays frozen, BatchNorm
    pinned, across any number of steps and ``model.train()`` calls until a later tick
    unfreezes it. Names are looked up at every :meth:`apply`, so a submodule replaced
    by assignment (``model.backbone = new``) is followed: the old one is restored and
    the new one frozen as scheduled. Constructing a controller validates everything and
    touches nothing.

    What happens to the optimizer when a module unfreezes is the policy's
    ``on_unfreeze`` (``"reset"`` by default: stale momentum and Adam moments from before
    the frozen phase are dropped) and ``unfreeze_lr`` (an optional learning-rate ramp).

    Adaptive schedules: :meth:`observe` gives a measured value (a validation loss after
    an epoch) to every metric-driven schedule (:class:`~freezesched.schedules.Plateau`,
    also inside combinators); :meth:`record_gradients`, called after each
    ``backward()``, measures the per-stage gradient norms a
    :class:`~freezesched.schedules.GradientFreeze` observes, and the next :meth:`apply`
    of a later tick hands their mean over the tick to it. Under ``torch.distributed``
    both are collectives: every rank's value is gathered and averaged, so every rank
    observes the same value and takes the same decision. :meth:`apply` decides each
    tick for good (:func:`~freezesched.schedules.commit`).

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` (the last tick, the adaptive
    schedules' records and the gradient norms recorded in the current tick) re-enter
    the freeze state of the saved tick without touching any optimizer; restore the
    optimizer from its own checkpoint, in either order (``torch.distributed.checkpoint``'s
    ``set_state_dict`` skips the optimizer state of frozen parameters: restore through
    ``freezesched.distributed.load``, or the optimizer first; the first :meth:`apply`
    after a resume refuses the other order when the lost state would matter). A resumed
    run then makes the same decisions as an uninterrupted one.

    Args:
        model: The model holding the submodules; names are looked up inside a
            ``DataParallel`` / ``DistributedDataParallel`` wrapper's ``.module``.
        schedules: Maps a dotted submodule name (``"backbone"``, ``""`` for the whole
            model) to a schedule. A per-stage schedule is keyed by a tuple with one entry
            per stage, each a name or a tuple of names frozen together. A schedule may be
            given as a config dict.
        optimizers: Optimizers the policy's ``on_unfreeze`` and ``unfreeze_lr`` apply to.
        policy: How to freeze (:class:`~freezesched.FreezePolicy`); the keyword shortcuts
            below replace its fields.
        on_unfreeze: ``"reset"`` (default) or ``"keep"`` the optimizer state of
            parameters that unfreeze.
        bn: BatchNorm policy while frozen.
        dropout: Dropout policy while frozen.
        trainable: Exceptions that stay trainable inside frozen modules.
        unfreeze_lr: An :class:`~freezesched.freezing.LRRamp` for unfrozen modules.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: a name does not exist in ``model``, a module is scheduled twice, a
            per-stage schedule has a different number of stages than names, a policy
            value is unknown, an optimizer moves parameters without gradients (LBFGS),
            ``unfreeze_lr`` is set but a parameter group mixes scheduled and other
            parameters, or ``model`` is a DDP that freezing would break (see
            ``docs/scaling.md``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from freezesched import FreezeController, Step
        >>> model = nn.Sequential()
        >>> model.add_module("backbone", nn.Linear(4, 4))
        >>> model.add_module("head", nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> ctrl = FreezeController(model, {"backbone": Step(5)}, optimizers=opt)
        >>> [ctrl.apply(epoch)["backbone"] for epoch in range(6)]
        [False, True, True, True, True, False]
        >>> ctrl.state_dict()["tick"]
        5
        >>> ctrl.release()
    """

    #: Version of the :meth:`state_dict` layout (version 1, without adaptive state, loads).
    STATE_VERSION = 2

    def __init__(
        self,
        model: nn.Module,
        schedules: Mapping[Any, ScheduleLike | Mapping[str, Any]],
        *,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] = (),
        policy: FreezePolicy | None = None,
        on_unfreeze: OptimizerPolicy | None = None,
        bn: ModePolicy | None = None,
        dropout: ModePolicy | None = None,
        trainable: Sequence[TrainableSpec] | None = None,
        unfreeze_lr: LRRamp | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {describe(model)}")
        if not isinstance(schedules, Mapping) or not schedules:
            raise TypeError(
                "schedules must be a non-empty mapping of submodule name(s) to schedule, "
                f"got {describe(schedules)}"
            )
        self.policy = resolve_policy(
            policy,
            on_unfreeze=on_unfreeze,
            bn=bn,
            dropout=dropout,
            trainable=trainable,
            unfreeze_lr=unfreeze_lr,
        )
        self.optimizers = as_optimizers(optimizers)
        check_optimizers(self.optimizers)
        self.model = model
        self._root: nn.Module = unwrap(model)
        self._targets: list[_Target] = []
        for key, spec in schedules.items():
            stages = _stages_of(key)
            schedule = schedule_from_config(spec) if isinstance(spec, Mapping) else spec
            check_schedule(schedule, f"schedules[{key!r}]")
            n = num_stages(schedule)
            if n not in (None, 1, len(stages)):
                raise ValueError(
                    f"schedules[{key!r}] has {n} stages and needs one entry (a name or a "
                    f"group of names) per stage, got {len(stages)}"
                )
            self._targets.append(_Target(key, stages, schedule))
        modules = self._resolve()  # unknown names and modules scheduled twice fail here
        self._check_adaptive()
        self._signals: dict[int, GradientSignal] = {
            i: GradientSignal(self._stage_modules(target, modules), every=target.schedule.every)
            for i, target in enumerate(self._targets)
            if isinstance(target.schedule, GradientFreeze)
        }
        plans = [plan_freeze(m, self.policy) for m in modules.values()]
        if self.policy.trainable:
            check_patterns_matched(self.policy, plans, "the scheduled modules")
        check_wrapper(
            model,
            [
                (name, plan.params, self._constant(name))
                for name, plan in zip(modules, plans, strict=True)
            ],
            restored_requires_grad,
        )
        self._groups = self._ramp_groups(plans) if self.policy.unfreeze_lr else {}
        self._ramp = LRRampHooks(self.optimizers) if self.policy.unfreeze_lr else None
        self._holds: dict[str, tuple[nn.Module, Hold]] = {}
        #: name -> the module found able to train when it last became trainable.
        self._trainable: dict[str, weakref.ref[nn.Module]] = {}
        self._tick: int | None = None
        #: (optimizer index, parameter name) that had optimizer state in the loaded state,
        #: checked at the first apply() after load_state_dict().
        self._expected_state: list[tuple[int, str]] = []
        self._observed: int | None = None

    def _check_adaptive(self) -> None:
        seen: dict[int, TargetKey] = {}
        for target in self._targets:
            schedule = target.schedule
            if not isinstance(schedule, Schedule):
                continue
            for part in schedule.adaptive_parts:
                if id(part) in seen:
                    raise ValueError(
                        f"schedules must not share an adaptive schedule object: {part!r} is in "
                        f"the schedules of {seen[id(part)]!r} and {target.key!r}; it keeps one "
                        "record of decisions, so give each its own"
                    )
                seen[id(part)] = target.key
            if "gradient_norm" in schedule.signals and not isinstance(schedule, GradientFreeze):
                raise ValueError(
                    f"schedules[{target.key!r}] holds a gradient-driven part inside "
                    f"{schedule.summary()}; the controller measures gradient norms only for a "
                    "GradientFreeze that is the whole schedule of its modules (stage i of it "
                    "is the i-th module or group of the key)"
                )

    @staticmethod
    def _stage_modules(
        target: _Target, modules: Mapping[str, nn.Module]
    ) -> list[tuple[nn.Module, ...]]:
        return [tuple(modules[name] for name in stage) for stage in target.stages]

    @property
    def signals(self) -> frozenset[str]:
        """What the adaptive schedules observe: ``"metric"``, ``"gradient_norm"``; empty if none.

        Examples:
            >>> from torch import nn
            >>> from freezesched import FreezeController, WarmupThenFreeze
            >>> from freezesched.schedules import Plateau
            >>> model = nn.Sequential(nn.Linear(2, 2))
            >>> sorted(FreezeController(model, {"0": WarmupThenFreeze(2, then=Plateau())}).signals)
            ['metric']
        """
        out: set[str] = set()
        for target in self._targets:
            if isinstance(target.schedule, Schedule):
                out |= target.schedule.signals
        return frozenset(out)

    def observe(self, tick: int, value: Any) -> None:
        """Give the value measured after training tick ``tick`` to the metric-driven schedules.

        Every schedule with a metric-driven part (:class:`~freezesched.schedules.Plateau`)
        receives it on its own relative ticks; it can change decisions from tick ``tick +
        1`` on. Observe after applying ``tick`` and before applying a later one, once per
        tick. Under ``torch.distributed`` this is a collective: call it on every rank; the
        ranks' values are averaged (identical values stay exact), so all decide alike.

        Args:
            tick: The tick the value was measured after; not before the last applied one.
            value: A real number or a one-element tensor (a loss, an accuracy).

        Raises:
            TypeError: ``tick`` is not an int, or ``value`` is not a number.
            ValueError: no schedule is metric-driven; the tick is before the last applied
                one, already observed, or the ranks observed different ticks; the value is
                not finite.

        Examples:
            >>> from torch import nn
            >>> from freezesched import FreezeController
            >>> from freezesched.schedules import Plateau
            >>> model = nn.Sequential(nn.Linear(2, 2))
            >>> ctrl = FreezeController(model, {"0": Plateau(patience=0)})
            >>> for epoch, val_loss in enumerate([1.0, 0.5, 0.6, 0.4]):
            ...     frozen = ctrl.apply(epoch)["0"]
            ...     ctrl.observe(epoch, val_loss)
            >>> frozen, ctrl.apply(4)["0"]
            (True, True)
            >>> ctrl.release()
        """
        tick = check_tick(tick, "tick")
        metric = [
            t.schedule
            for t in self._targets
            if isinstance(t.schedule, Schedule) and "metric" in t.schedule.signals
        ]
        if not metric:
            raise ValueError(
                "observe() feeds metric-driven schedules (such as Plateau), but none of this "
                f"controller's schedules is one: {[t.key for t in self._targets]}"
            )
        if self._tick is not None and tick < self._tick:
            raise ValueError(
                f"tick must not be before the last applied tick ({self._tick}): a value "
                f"measured after tick {tick} comes too late for ticks already applied; got {tick}"
            )
        agreed = agree_across_ranks(tick, as_observation(value), what="the monitored value")
        snapshots = [schedule.state_dict() for schedule in metric]
        try:  # all schedules observe it, or none
            for schedule in metric:
                schedule.observe(tick, agreed)
        except BaseException:
            for schedule, snapshot in zip(metric, snapshots, strict=True):
                schedule.load_state_dict(snapshot)
            raise
        self._observed = tick

    @property
    def last_observed(self) -> int | None:
        """The tick of the last :meth:`observe` (``None`` before the first)."""
        return self._observed

    def record_gradients(self) -> None:
        """Measure each GradientFreeze stage's gradient norm for this step.

        Call it after ``backward()`` (after ``scaler.unscale_(optimizer)`` with AMP) and
        before ``zero_grad()``, once per optimizer step, on every rank. One call in the
        schedule's ``every`` measures (one fused norm per stage, no synchronization; the
        others return at once: ``benchmarks/gradient_signal_overhead.py``). The mean over
        the steps measured in a tick is observed, as that tick's value, by the next
        :meth:`apply` of a later tick; a tick without a measured step is not observed.

        Raises:
            ValueError: no schedule is a :class:`~freezesched.schedules.GradientFreeze`.
        """
        if not self._signals:
            raise ValueError(
                "record_gradients() feeds GradientFreeze schedules, but none of this "
                f"controller's schedules is one: {[t.key for t in self._targets]}"
            )
        for signal in self._signals.values():
            signal.record()

    def _observe_gradients(self, tick: int) -> None:
        """Hand the gradient norms recorded during the last applied tick to their schedules."""
        if not self._signals or self._tick is None or tick <= self._tick:
            return
        last = self._tick
        for i, signal in self._signals.items():
            norms = agree_across_ranks(last, signal.take(), what="gradient norms")
            if norms is not None:
                schedule = self._targets[i].schedule
                assert isinstance(schedule, GradientFreeze)
                schedule.observe(last, norms)

    @property
    def on_unfreeze(self) -> OptimizerPolicy:
        """The policy's optimizer-state rule on unfreeze."""
        return self.policy.on_unfreeze

    def _resolve(self) -> dict[str, nn.Module]:
        """Every scheduled name and the module it names now; each module once."""
        out: dict[str, nn.Module] = {}
        seen: dict[int, str] = {}
        for target in self._targets:
            for stage in target.stages:
                for name in stage:
                    module = resolve(self._root, name, f"schedules key {target.key!r}")
                    if id(module) in seen or name in out:
                        other = seen.get(id(module), name)
                        raise ValueError(
                            "schedules must name each module once; "
                            f"{other!r} and {name!r} are the same module"
                            + (f" (under keys {target.key!r} and another)" if other == name else "")
                        )
                    seen[id(module)] = name
                    out[name] = module
        return out

    def _constant(self, name: str) -> bool | None:
        """Whether ``name`` is frozen at every tick (``True``), at none, or may toggle."""
        t, s = self._stage_of(name)
        return constant_decision(self._targets[t].schedule, s)

    def _ramp_groups(self, plans: list[Plan]) -> dict[tuple[int, int], str]:
        """(optimizer, group) -> the scheduled name whose parameters fill that group."""
        owner: dict[int, str] = {}
        for name, plan in zip(self._resolve(), plans, strict=True):
            for p in plan.params:
                owner.setdefault(id(p), name)
        groups: dict[tuple[int, int], str] = {}
        for i, opt in enumerate(self.optimizers):
            for g, group in enumerate(opt.param_groups):
                names = {owner.get(id(p)) for p in group["params"]}
                scheduled = names - {None}
                if not scheduled:
                    continue
                stages = {self._stage_of(n) for n in scheduled if n is not None}
                if None in names or len(stages) > 1:
                    raise ValueError(
                        f"unfreeze_lr needs each unfrozen stage's parameters in parameter "
                        f"groups of their own; optimizers[{i}].param_groups[{g}] mixes "
                        f"{sorted(n or '(not scheduled)' for n in names)}. Build the "
                        "optimizer with one group per scheduled module"
                    )
                groups[(i, g)] = next(iter(sorted(n for n in scheduled if n is not None)))
        return groups

    def _stage_of(self, name: str) -> tuple[int, int]:
        for t, target in enumerate(self._targets):
            for s, stage in enumerate(target.stages):
                if name in stage:
                    return (t, s)
        raise KeyError(name)

    @property
    def tick(self) -> int | None:
        """The tick of the last :meth:`apply` (``None`` before the first)."""
        return self._tick

    @property
    def frozen(self) -> dict[str, bool]:
        """Whether each scheduled submodule is frozen now, by name."""
        return {n: n in self._holds for t in self._targets for stage in t.stages for n in stage}

    def apply(self, tick: int) -> dict[str, bool]:
        """Make the freeze state match the schedules at ``tick``; idempotent.

        Args:
            tick: The epoch or iteration, an int in ``[0, 2**53 - 1]``.

        Returns:
            Whether each scheduled submodule is now frozen, by name.

        Raises:
            TypeError: ``tick`` is not an int.
            ValueError: ``tick`` is out of range, a scheduled name no longer exists, or a
                module becomes trainable although none of its parameters (trainable
                exceptions aside) would require grad: they were frozen outside
                freezesched (by ``peft``, say), which never re-enables them. Nothing is
                changed then.
        """
        return self._apply(tick, resume=False)

    def _apply(self, tick: int, *, resume: bool) -> dict[str, bool]:
        tick = check_tick(tick, "tick")
        if not resume:
            if self._expected_state:
                self._check_restored_optimizer_state()
            self._observe_gradients(tick)
        # Decide, resolve and plan everything before changing anything.
        wanted: dict[str, bool] = {}
        for target in self._targets:
            decisions = commit(target.schedule, tick, len(target.stages))
            for stage, frozen in zip(target.stages, decisions, strict=True):
                for name in stage:
                    wanted[name] = frozen
        modules = self._resolve()
        self._check_trainable(tick, wanted, modules)
        for i, signal in self._signals.items():
            signal.stages = tuple(self._stage_modules(self._targets[i], modules))
        # A module that stays frozen is planned again if its tree changed since it was
        # frozen (a layer appended, a weight or a BatchNorm replaced): what it holds now
        # must be frozen too.
        replanned = {
            name
            for name, (module, hold) in self._holds.items()
            if module is modules[name] and wanted[name] and not _plan_current(hold.plan)
        }
        plans = {
            name: plan_freeze(modules[name], self.policy)
            for name, frozen in wanted.items()
            if frozen
            and (
                name not in self._holds
                or self._holds[name][0] is not modules[name]
                or name in replanned
            )
        }
        for name in list(replanned):  # a change that leaves the plan as it was: keep it
            if _same_plan(self._holds[name][1].plan, plans[name]):
                replanned.discard(name)
                del plans[name]
        leaving = [
            p
            for name, (module, hold) in self._holds.items()
            if module is modules[name] and not wanted[name]
            for p in hold.sole_params()
            if restored_requires_grad(p)  # (what was frozen outside stays frozen)
        ]
        if leaving:  # a wrapper that never synchronizes them would let the ranks diverge
            check_unfreeze(leaving, f"unfreezing at tick {tick}")
        freed: list[nn.Parameter] = []
        #: Released by a replaced module or a new plan: unfrozen if nothing holds them now.
        released: list[nn.Parameter] = []
        for name in list(self._holds):
            module, hold = self._holds[name]
            if module is not modules[name]:  # replaced by assignment: restore the old one
                del self._holds[name]
                released += hold.release()
                self._drop_fast(module)
            elif not wanted[name]:
                del self._holds[name]
                freed += hold.release()
                self._drop_fast(module)
        for name, plan in plans.items():
            hold = Hold(plan)
            hold.acquire()  # a replanned module's old hold is released only once this holds
            old = self._holds.get(name) if name in replanned else None
            self._holds[name] = (modules[name], hold)
            if old is not None:
                released += old[1].release()
        freed += [p for p in released if not is_frozen(p)]
        if not resume and self.on_unfreeze == "reset" and freed and self.optimizers:
            reset_optimizer_state(self.optimizers, freed)
        self._tick = tick
        self._update_ramp()
        return self.frozen

    def _check_trainable(
        self, tick: int, wanted: dict[str, bool], modules: dict[str, nn.Module]
    ) -> None:
        """Refuse a trainable decision for a module that nothing would make train.

        freezesched freezes and restores; it never sets ``requires_grad=True`` on a
        parameter it did not freeze (that would re-enable weights ``peft`` or the user
        froze). A module scheduled trainable whose parameters (trainable exceptions aside)
        were all frozen outside freezesched would therefore silently not train. Checked
        read-only, when a module becomes trainable (and at the first tick).
        """
        for name, frozen in wanted.items():
            module = modules[name]
            if frozen:
                self._trainable.pop(name, None)
                continue
            checked = self._trainable.get(name)
            if checked is not None and checked() is module:
                continue
            params = plan_freeze(module, self.policy).params
            if (
                params
                and not any(map(restored_requires_grad, params))
                and not any(self._replaced_flags().get(id(p), False) for p in params)
            ):
                key = next(t.key for t in self._targets if any(name in s for s in t.stages))
                raise ValueError(
                    f"schedules[{key!r}] makes {name!r} trainable at tick {tick}, but none of "
                    f"its {len(params)} parameters (trainable exceptions aside) requires grad: "
                    "they were frozen outside freezesched (peft freezes every weight of the "
                    "base model, for one). freezesched never re-enables what it did not "
                    "freeze, so this schedule would train nothing there. Make them trainable "
                    "before building the controller (module.requires_grad_(True), and give "
                    "them to the optimizer), or schedule the module with Constant(True) if "
                    "only its BatchNorm and dropout are to be pinned"
                )
            self._trainable[name] = weakref.ref(module)

    def _replaced_flags(self) -> dict[int, bool]:
        """``id`` -> flag to restore, for parameters that replaced one this controller holds.

        A parameter assigned into a frozen slot (``load_state_dict(assign=True)`` while
        frozen) inherits ``requires_grad=False``; releasing the hold gives it the replaced
        parameter's flag, so it is not "frozen outside freezesched".
        """
        out: dict[int, bool] = {}
        for _, hold in self._holds.values():
            for owner, attr, original in hold.plan.slots:
                now = owner._parameters.get(attr)
                if now is not None and now is not original:
                    out[id(now)] = out.get(id(now), False) or restored_requires_grad(original)
        return out

    def _drop_fast(self, module: nn.Module) -> None:
        if self.policy.fast is not None:  # issue 17: its frozen phase ended
            drop_fast(module)

    def _update_ramp(self) -> None:
        ramp = self.policy.unfreeze_lr
        if ramp is None or self._ramp is None or self._tick is None:
            return
        tick = self._tick
        factors: dict[tuple[int, int], float] = {}
        for key, name in self._groups.items():
            t, s = self._stage_of(name)
            target = self._targets[t]
            start = max(0, tick - ramp.ticks)
            line = timeline(target.schedule, tick + 1, start, len(target.stages))[:, s]
            if line[-1]:
                continue  # frozen now: no gradient, nothing to scale
            frozen_at = np.flatnonzero(line)
            if frozen_at.size:  # unfrozen within the ramp: k ticks since
                factors[key] = ramp.factor(len(line) - 1 - int(frozen_at[-1]) - 1)
        self._ramp.factors = factors
        self._ramp.install()

    def _named_params(self, name: str, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters freezing ``module`` freezes, by name in the model.

        Under FSDP2 a module may hold the unsharded copy of a parameter (after a forward
        without backward); the name then stands for the sharded parameter the optimizer
        steps, whatever FSDP2 holds at the moment.
        """
        plan = plan_freeze(module, self.policy)
        out: dict[str, nn.Parameter] = {}
        for owner, attr, param in plan.slots:
            inner = plan.names.get(id(owner), "")
            local = f"{inner}.{attr}" if inner else attr
            sharded = fsdp2_sharded_counterparts([(owner, attr, param)])
            out.setdefault(f"{name}.{local}" if name else local, sharded[0] if sharded else param)
        return out

    def _scheduled_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the schedules freeze, by its name in the model."""
        out: dict[str, nn.Parameter] = {}
        for name, module in self._resolve().items():
            for key, param in self._named_params(name, module).items():
                out.setdefault(key, param)
        return out

    def _optimizer_state_names(self) -> list[list[str]]:
        scheduled = self._scheduled_parameters()
        return [
            sorted(n for n, p in scheduled.items() if opt.state.get(p)) for opt in self.optimizers
        ]

    def _check_restored_optimizer_state(self) -> None:
        expected, self._expected_state = self._expected_state, []
        if self.on_unfreeze != "keep":
            return  # "reset" drops it at the unfreeze anyway: nothing depends on it
        scheduled = self._scheduled_parameters()
        lost = [
            name
            for i, name in expected
            if i < len(self.optimizers)
            and name in scheduled
            and not self.optimizers[i].state.get(scheduled[name])
        ]
        if lost:
            raise ValueError(
                f"the optimizer state of {len(lost)} scheduled parameter(s) (e.g. {lost[0]!r}) "
                "was saved with this controller's state but is missing now. With "
                "on_unfreeze='keep' it is used when they unfreeze, so the run would differ "
                "from the uninterrupted one. torch.distributed.checkpoint's set_state_dict "
                "loads optimizer state only for parameters that require grad: restore it "
                "before this controller (or use freezesched.distributed.load, which restores "
                "in any order)"
            )

    def untrained_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters frozen at every tick from 0 through the last applied one, by name.

        In a run that started at tick 0 (and applied this controller before its first
        step) these were never updated: they still hold the weights the run started from.
        ``freezesched.distributed.save(..., only_trained=True)`` leaves them out of
        checkpoints (and records fingerprints to check them when loading).

        Returns:
            ``{name in the model: parameter}``; empty before the first :meth:`apply`.
        """
        if self._tick is None:
            return {}
        modules = self._resolve()
        out: dict[str, nn.Parameter] = {}
        for target in self._targets:
            line = timeline(target.schedule, self._tick + 1, 0, len(target.stages))
            for s, stage in enumerate(target.stages):
                if not line[:, s].all():
                    continue
                for name in stage:
                    for key, param in self._named_params(name, modules[name]).items():
                        out.setdefault(key, param)
        return out

    def release(self) -> None:
        """Unfreeze everything this controller froze (optimizer state is left alone)."""
        holds, self._holds = self._holds, {}
        self._trainable = {}
        error: BaseException | None = None
        for module, hold in reversed(list(holds.values())):
            try:
                hold.release()
                self._drop_fast(module)
            except BaseException as caught:
                error = error or caught
        if self._ramp is not None:
            self._ramp.remove()
            self._ramp.factors = {}
        self._tick = None
        if error is not None:
            raise error

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _schedule_configs(self) -> list[dict[str, Any]]:
        return [
            {
                "modules": [stage[0] if len(stage) == 1 else list(stage) for stage in t.stages],
                "schedule": t.schedule.to_config() if isinstance(t.schedule, Schedule) else None,
            }
            for t in self._targets
        ]

    def state_dict(self) -> dict[str, Any]:
        """A versioned, plain-data (JSON-compatible) snapshot of what decides from now on.

        Keys: ``tick`` (the last applied tick, ``None`` before the first :meth:`apply`),
        ``targets`` (each key's modules and schedule config, to catch resuming with
        different schedules), ``adaptive`` (per target, its schedule's
        :meth:`~freezesched.schedules.Schedule.state_dict`: the adaptive parts' records;
        ``None`` for a schedule without them), ``gradient_signals`` (per target index, the
        gradient norms recorded in the current tick) and ``last_observed`` (the tick of the
        last :meth:`observe`). Pure schedules need nothing but the tick. With optimizers,
        ``optimizer_state`` lists, per optimizer, the scheduled parameters that have
        optimizer state: the first :meth:`apply` after :meth:`load_state_dict` checks that
        the restored optimizers still have it (``torch.distributed.checkpoint`` drops the
        state of parameters frozen when it loads), so a lost Adam moment is an error, not
        a divergence.
        """
        state: dict[str, Any] = {
            "version": self.STATE_VERSION,
            "tick": self._tick,
            "on_unfreeze": self.on_unfreeze,
            "targets": self._schedule_configs(),
            "adaptive": [
                t.schedule.state_dict()
                if isinstance(t.schedule, Schedule) and t.schedule.adaptive_parts
                else None
                for t in self._targets
            ],
            "gradient_signals": {str(i): sig.state_dict() for i, sig in self._signals.items()},
            "last_observed": self._observed,
        }
        if self.optimizers:
            state["optimizer_state"] = self._optimizer_state_names()
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Re-enter the freeze state of a :meth:`state_dict`, touching no optimizer.

        The modules frozen at the saved tick are frozen (and the others released) exactly
        as :meth:`apply` would, but without ``on_unfreeze`` resets: the optimizer's own
        checkpoint already reflects that tick. The next :meth:`apply` then makes the same
        transitions, resets and learning-rate ramp as the uninterrupted run. A state saved
        before the first :meth:`apply` (``tick`` ``None``) releases everything.

        Adaptive schedules get their saved records back, so the resumed run makes the
        same decisions as the uninterrupted one; with ``strict=False``, a target whose
        modules or schedule config differ from the saved ones keeps its fresh state (its
        decisions up to the saved tick are then those of no observations). A state of
        version 1 (saved before adaptive schedules existed) has no such records.

        Args:
            state: What :meth:`state_dict` returned (also after a JSON round trip).
            strict: If true, the stored schedules must equal this controller's (pass
                ``False`` to continue a run under new schedules, e.g. a finished
                full-training run continued into a DBF phase).

        Raises:
            ValueError: not a state of a known version, no ``tick`` key, a bad tick,
                (``strict``) different modules or schedules, or an adaptive record that
                does not fit. Nothing is changed then.
        """
        if not isinstance(state, Mapping) or state.get("version") not in (1, self.STATE_VERSION):
            found = state.get("version") if isinstance(state, Mapping) else state
            raise ValueError(
                f"state['version'] must be 1 or {self.STATE_VERSION}, got {found!r}; was this "
                "saved by FreezeController.state_dict()?"
            )
        if "tick" not in state:
            raise ValueError(
                "state must have a 'tick' key (the last applied tick, or None before the "
                f"first apply); got keys {sorted(state)}"
            )
        tick = state["tick"]
        if tick is not None:
            tick = check_tick(tick, "state['tick']")
        if strict and state.get("targets") != self._schedule_configs():
            raise ValueError(
                "state['targets'] must equal this controller's modules and schedules "
                f"(pass strict=False to resume with new ones); saved {state.get('targets')!r}, "
                f"now {self._schedule_configs()!r}"
            )
        self._load_adaptive(state, strict=strict)
        if tick is None:
            self.release()
        else:
            self._apply(tick, resume=True)
        saved = state.get("optimizer_state")
        self._expected_state = (
            [(i, str(n)) for i, names in enumerate(saved) for n in names]
            if isinstance(saved, list | tuple)
            else []
        )

    def _load_adaptive(self, state: Mapping[str, Any], *, strict: bool) -> None:
        """Restore the adaptive records and recorded gradient norms (all or nothing)."""
        saved_targets = state.get("targets")
        saved = state.get("adaptive") if state.get("version") == self.STATE_VERSION else None
        saved_signals = state.get("gradient_signals") or {}
        configs = self._schedule_configs()
        observed = state.get("last_observed") if saved is not None else None
        if observed is not None:
            observed = check_tick(observed, "state['last_observed']")
        loads: list[tuple[Schedule, Mapping[str, Any]]] = []
        signal_loads: list[tuple[GradientSignal, Mapping[str, Any]]] = []
        for i, target in enumerate(self._targets):
            schedule = target.schedule
            if not isinstance(schedule, Schedule) or not schedule.adaptive_parts:
                continue
            same = (
                isinstance(saved_targets, list | tuple)
                and i < len(saved_targets)
                and saved_targets[i] == configs[i]
            )
            if not same or not isinstance(saved, list | tuple) or i >= len(saved):
                if strict:  # the saved schedules equal these, so the record must be there
                    raise ValueError(
                        f"state['adaptive'] must hold the record of schedules[{target.key!r}] "
                        f"({schedule.summary()}), got {saved!r}"
                    )
                continue
            if not isinstance(saved[i], Mapping):
                raise ValueError(
                    f"state['adaptive'][{i}] must be the state of {schedule.summary()}, "
                    f"got {saved[i]!r}"
                )
            loads.append((schedule, saved[i]))
            signal = self._signals.get(i)
            if isinstance(saved_signals, Mapping) and str(i) in saved_signals and signal:
                signal_loads.append((signal, saved_signals[str(i)]))
        before = [(s, s.state_dict()) for s, _ in loads]
        signals_before = [(g, g.state_dict()) for g, _ in signal_loads]
        try:
            for schedule, part in loads:
                schedule.load_state_dict(part)
            for signal, part in signal_loads:
                signal.load_state_dict(part)
        except BaseException:
            for schedule, old in before:
                schedule.load_state_dict(old)
            for signal, old_signal in signals_before:
                signal.load_state_dict(old_signal)
            raise
        self._observed = observed
