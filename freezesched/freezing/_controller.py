"""FreezeController: apply schedules to named submodules for whole epochs, resumably."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from typing_extensions import Self

from freezesched._validation import check_tick, describe
from freezesched.freezing._distributed import check_ddp_settings, managed_parameters, unwrap
from freezesched.freezing._fast import drop_fast
from freezesched.freezing._mechanism import Hold, Plan, check_patterns_matched, plan_freeze
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
from freezesched.freezing._targets import resolve
from freezesched.schedules import (
    Schedule,
    ScheduleLike,
    check_schedule,
    evaluate,
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

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` (the tick is the whole state,
    since schedules are pure) re-enter the freeze state of the saved tick without
    touching any optimizer; restore the optimizer from its own checkpoint, in either
    order.

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

    #: Version of the :meth:`state_dict` layout.
    STATE_VERSION = 1

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
        plans = [plan_freeze(m, self.policy) for m in modules.values()]
        if self.policy.trainable:
            check_patterns_matched(self.policy, plans, "the scheduled modules")
        self._check_ddp(plans)
        self._groups = self._ramp_groups(plans) if self.policy.unfreeze_lr else {}
        self._ramp = LRRampHooks(self.optimizers) if self.policy.unfreeze_lr else None
        self._holds: dict[str, tuple[nn.Module, Hold]] = {}
        self._tick: int | None = None

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

    def _check_ddp(self, plans: list[Plan]) -> None:
        if not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return
        ddp = self.model
        if ddp.find_unused_parameters and not getattr(ddp, "static_graph", False):
            return
        managed = {id(p) for p in managed_parameters(ddp)}
        if any(id(p) in managed for plan in plans for p in plan.params):
            check_ddp_settings(
                ddp.find_unused_parameters,
                bool(getattr(ddp, "static_graph", False)),
                where="model",
            )

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
            ValueError: ``tick`` is out of range, or a scheduled name no longer exists.
        """
        return self._apply(tick, resume=False)

    def _apply(self, tick: int, *, resume: bool) -> dict[str, bool]:
        tick = check_tick(tick, "tick")
        # Decide, resolve and plan everything before changing anything.
        wanted: dict[str, bool] = {}
        for target in self._targets:
            decisions = evaluate(target.schedule, tick, len(target.stages))
            for stage, frozen in zip(target.stages, decisions, strict=True):
                for name in stage:
                    wanted[name] = frozen
        modules = self._resolve()
        plans = {
            name: plan_freeze(modules[name], self.policy)
            for name, frozen in wanted.items()
            if frozen and (name not in self._holds or self._holds[name][0] is not modules[name])
        }
        freed: list[nn.Parameter] = []
        for name in list(self._holds):
            module, hold = self._holds[name]
            if module is not modules[name]:  # replaced by assignment: restore the old one
                del self._holds[name]
                hold.release()
                self._drop_fast(module)
            elif not wanted[name]:
                del self._holds[name]
                freed += hold.release()
                self._drop_fast(module)
        for name, plan in plans.items():
            hold = Hold(plan)
            hold.acquire()
            self._holds[name] = (modules[name], hold)
        if not resume and self.on_unfreeze == "reset" and freed and self.optimizers:
            reset_optimizer_state(self.optimizers, freed)
        self._tick = tick
        self._update_ramp()
        return self.frozen

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

    def release(self) -> None:
        """Unfreeze everything this controller froze (optimizer state is left alone)."""
        holds, self._holds = self._holds, {}
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
        """A versioned, plain-data snapshot: the last tick and what was scheduled.

        Schedules are pure, so the tick is the whole state; the schedule configs are
        stored to catch resuming with different schedules. ``tick`` is ``None`` before
        the first :meth:`apply`.
        """
        return {
            "version": self.STATE_VERSION,
            "tick": self._tick,
            "on_unfreeze": self.on_unfreeze,
            "targets": self._schedule_configs(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Re-enter the freeze state of a :meth:`state_dict`, touching no optimizer.

        The modules frozen at the saved tick are frozen (and the others released) exactly
        as :meth:`apply` would, but without ``on_unfreeze`` resets: the optimizer's own
        checkpoint already reflects that tick. The next :meth:`apply` then makes the same
        transitions, resets and learning-rate ramp as the uninterrupted run. A state saved
        before the first :meth:`apply` (``tick`` ``None``) releases everything.

        Args:
            state: What :meth:`state_dict` returned.
            strict: If true, the stored schedules must equal this controller's (pass
                ``False`` to continue a run under new schedules, e.g. a finished
                full-training run continued into a DBF phase).

        Raises:
            ValueError: not a state of this version, no ``tick`` key, a bad tick, or
                (``strict``) different modules or schedules. Nothing is changed then.
        """
        if not isinstance(state, Mapping) or state.get("version") != self.STATE_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else state
            raise ValueError(
                f"state['version'] must be {self.STATE_VERSION}, got {found!r}; was this "
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
        if tick is None:
            self.release()
        else:
            self._apply(tick, resume=True)
