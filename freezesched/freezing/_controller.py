"""FreezeController: apply schedules to named submodules for whole epochs, resumably."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from freezesched.freezing._mechanism import (
    FreezeHandle,
    FreezePolicy,
    ModePolicy,
    TrainableSpec,
    check_patterns_matched,
    freeze,
    plan_freeze,
)
from freezesched.freezing._targets import ScheduleLike, check_schedule, decide
from freezesched.schedules import BinarySchedule, Schedule, check_tick, schedule_from_config
from freezesched.schedules._base import _describe

__all__ = ["FreezeController", "OptimizerPolicy", "reset_optimizer_state"]

OptimizerPolicy = Literal["keep", "reset"]


def reset_optimizer_state(
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    params: Iterable[torch.Tensor],
) -> int:
    """Forget the optimizer state (momentum, Adam moments and step) of ``params``.

    The next step then treats each parameter as new to the optimizer: SGD starts a fresh
    momentum buffer from the current gradient, Adam restarts its bias correction.

    Args:
        optimizers: One optimizer or several.
        params: The parameters whose state to drop.

    Returns:
        How many (optimizer, parameter) states were dropped.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2); opt.step()
        >>> reset_optimizer_state(opt, [w]), len(opt.state)
        (1, 0)
    """
    opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    dropped = 0
    for param in params:
        for opt in opts:
            if opt.state.pop(param, None) is not None:
                dropped += 1
    return dropped


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        inner: nn.Module = model.module
        return inner
    return model


def _check_wrapper(model: nn.Module) -> None:
    """Fail fast on a DDP setup that breaks as soon as a module is frozen for a step."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    if not model.find_unused_parameters:
        raise ValueError(
            "model is DistributedDataParallel with find_unused_parameters=False; frozen "
            "parameters produce no gradient, so DDP fails ('Expected to have finished "
            "reduction in the prior iteration') at the step after the first frozen one. "
            "Wrap the model with DistributedDataParallel(..., find_unused_parameters=True)"
        )
    if getattr(model, "static_graph", False):
        raise ValueError(
            "model is DistributedDataParallel with static_graph=True, which assumes the same "
            "parameters receive gradients every step; freezing changes that set. Use "
            "static_graph=False with find_unused_parameters=True"
        )


class FreezeController:
    """Apply freeze schedules to named submodules at epoch (or any tick) granularity.

    :meth:`apply` is idempotent: it freezes and unfreezes only what changed since the
    last call, with the same mechanism (and guarantees) as :class:`FrozenStageGuard`,
    so a frozen module stays frozen, BatchNorm pinned, across any number of steps and
    ``model.train()`` calls until a later tick unfreezes it. Constructing a controller
    validates everything and touches nothing.

    On unfreeze, ``on_unfreeze`` decides what happens to the optimizer state of the
    parameters that were frozen: ``"keep"`` reuses it (what the official DBF code does,
    so SGD momentum from before the frozen phase is applied again), ``"reset"`` drops it
    (see :func:`reset_optimizer_state`).

    Args:
        model: The model holding the submodules; names are looked up inside a
            ``DataParallel`` / ``DistributedDataParallel`` wrapper's ``.module``. A DDP
            model must have ``find_unused_parameters=True`` (checked).
        schedules: Maps a dotted submodule name (``"backbone"``, ``""`` for the whole
            model) to a schedule; a per-stage schedule is keyed by a tuple of names, one
            per stage. A schedule may be given as a config dict.
        optimizers: Optimizers whose state ``on_unfreeze`` applies to.
        on_unfreeze: ``"keep"`` (default) or ``"reset"``.
        bn: BatchNorm policy while frozen (see :class:`FreezePolicy`).
        dropout: Dropout policy while frozen.
        trainable: Exceptions that stay trainable inside frozen modules.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: a name does not exist in ``model``, a per-stage schedule has a
            different number of stages than names, a policy value is unknown, or ``model``
            is a DDP without ``find_unused_parameters=True``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from freezesched import FreezeController, Step
        >>> model = nn.Sequential()
        >>> model.add_module("backbone", nn.Linear(4, 4))
        >>> model.add_module("head", nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> ctrl = FreezeController(model, {"backbone": Step(5)}, optimizers=opt,
        ...                         on_unfreeze="reset")
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
        schedules: Mapping[str | tuple[str, ...], ScheduleLike | Mapping[str, Any]],
        *,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] = (),
        on_unfreeze: OptimizerPolicy = "keep",
        bn: ModePolicy = "eval",
        dropout: ModePolicy = "eval",
        trainable: Sequence[TrainableSpec] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {_describe(model)}")
        if not isinstance(schedules, Mapping) or not schedules:
            raise TypeError(
                "schedules must be a non-empty mapping of submodule name(s) to schedule, "
                f"got {_describe(schedules)}"
            )
        if on_unfreeze not in ("keep", "reset"):
            raise ValueError(f"on_unfreeze must be 'keep' or 'reset', got {_describe(on_unfreeze)}")
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = (optimizers,)
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizers[{i}] must be a torch Optimizer, got {_describe(opt)}")
        _check_wrapper(model)
        self.policy = FreezePolicy(bn=bn, dropout=dropout, trainable=trainable)
        self.on_unfreeze: OptimizerPolicy = on_unfreeze
        self.optimizers = tuple(optimizers)
        self.model = model
        # Names are resolved inside (Distributed)DataParallel's wrapped module.
        self._root: nn.Module = _unwrap(model)
        self._targets: list[tuple[tuple[str, ...], tuple[nn.Module, ...], ScheduleLike]] = []
        for key, spec in schedules.items():
            names = (key,) if isinstance(key, str) else key
            if (
                not isinstance(names, tuple)
                or not names
                or not all(isinstance(n, str) for n in names)
            ):
                raise TypeError(
                    "schedules keys must be a submodule name or a tuple of names, "
                    f"got {_describe(key)}"
                )
            schedule = schedule_from_config(spec) if isinstance(spec, Mapping) else spec
            check_schedule(schedule, f"schedules[{key!r}]")
            if (
                isinstance(schedule, Schedule)
                and not isinstance(schedule, BinarySchedule)
                and schedule.num_stages != len(names)
            ):
                raise ValueError(
                    f"schedules[{key!r}] has {schedule.num_stages} stages and needs as many "
                    f"module names, got {len(names)}"
                )
            self._targets.append((names, tuple(self._submodule(n) for n in names), schedule))
        if self.policy.trainable:
            plans = [plan_freeze(m, self.policy) for _, mods, _ in self._targets for m in mods]
            check_patterns_matched(self.policy, plans, "the scheduled modules")
        self._handles: dict[str, FreezeHandle] = {}
        self._tick: int | None = None

    def _submodule(self, name: str) -> nn.Module:
        try:
            return self._root.get_submodule(name)
        except AttributeError:
            known = [n for n, _ in self._root.named_modules() if n][:12]
            raise ValueError(
                f"schedules key {name!r} must name a submodule of model; it has none of that "
                f"name (some it has: {known})"
            ) from None

    @property
    def tick(self) -> int | None:
        """The tick of the last :meth:`apply` (``None`` before the first)."""
        return self._tick

    @property
    def frozen(self) -> dict[str, bool]:
        """Whether each scheduled submodule is frozen now, by name."""
        return {n: n in self._handles for names, _, _ in self._targets for n in names}

    def apply(self, tick: int) -> dict[str, bool]:
        """Make the freeze state match the schedules at ``tick``; idempotent.

        Args:
            tick: The epoch or iteration, an ``int >= 0``.

        Returns:
            Whether each scheduled submodule is now frozen, by name.

        Raises:
            TypeError: ``tick`` is not an int.
            ValueError: ``tick`` is negative.
        """
        return self._apply(tick, reset=self.on_unfreeze == "reset")

    def restore(self, tick: int) -> dict[str, bool]:
        """Enter the freeze state of ``tick`` as a resumed run: optimizer state untouched.

        Use it once, when resuming, with the tick of the last :meth:`apply` before the
        checkpoint (the optimizer state restored from the checkpoint already reflects
        that tick); the next :meth:`apply` then makes the same transitions, and the same
        ``on_unfreeze`` resets, as the uninterrupted run. :meth:`load_state_dict` does
        this with a saved tick.

        Examples:
            >>> from torch import nn
            >>> from freezesched import FreezeController, Step
            >>> model = nn.Sequential(nn.Linear(2, 2))
            >>> ctrl = FreezeController(model, {"0": Step(2)})
            >>> ctrl.restore(1), ctrl.apply(2)
            ({'0': True}, {'0': False})
            >>> ctrl.release()
        """
        return self._apply(tick, reset=False)

    def _apply(self, tick: int, *, reset: bool) -> dict[str, bool]:
        tick = check_tick(tick, "tick")
        wanted = [decide(s, tick, len(mods)) for _, mods, s in self._targets]  # all or nothing
        freed: list[nn.Parameter] = []
        for (names, modules, _), decisions in zip(self._targets, wanted, strict=True):
            for name, module, frozen in zip(names, modules, decisions, strict=True):
                handle = self._handles.get(name)
                if frozen and handle is None:
                    self._handles[name] = freeze(plan_freeze(module, self.policy))
                elif not frozen and handle is not None:
                    freed += self._handles.pop(name).release()
        if reset and freed and self.optimizers:
            reset_optimizer_state(self.optimizers, freed)
        self._tick = tick
        return self.frozen

    def release(self) -> None:
        """Unfreeze everything this controller froze (optimizer state is left alone)."""
        for name in reversed(list(self._handles)):
            self._handles.pop(name).release()
        self._tick = None

    def __enter__(self) -> FreezeController:
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
                "modules": list(names),
                "schedule": s.to_config() if isinstance(s, Schedule) else None,
            }
            for names, _, s in self._targets
        ]

    def state_dict(self) -> dict[str, Any]:
        """A versioned, plain-data snapshot: the last tick and what was scheduled.

        Schedules are pure, so the tick is the whole state; the schedule configs are
        stored to catch resuming with different schedules.
        """
        return {
            "version": self.STATE_VERSION,
            "tick": self._tick,
            "on_unfreeze": self.on_unfreeze,
            "targets": self._schedule_configs(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Re-derive the freeze state from a :meth:`state_dict` (re-applies its tick).

        Loading never touches optimizer state: restore the optimizer from its own
        checkpoint.

        Args:
            state: What :meth:`state_dict` returned.
            strict: If true, the stored schedules must equal this controller's.

        Raises:
            ValueError: unknown version, or (``strict``) different modules or schedules.
        """
        if not isinstance(state, Mapping) or state.get("version") != self.STATE_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else state
            raise ValueError(
                f"state['version'] must be {self.STATE_VERSION}, got {found!r}; was this "
                "saved by FreezeController.state_dict()?"
            )
        if strict and state.get("targets") != self._schedule_configs():
            raise ValueError(
                "state['targets'] must equal this controller's modules and schedules "
                f"(pass strict=False to resume with new ones); saved {state.get('targets')!r}, "
                f"now {self._schedule_configs()!r}"
            )
        tick = state.get("tick")
        if tick is None:
            self.release()
        else:
            self.restore(tick)
