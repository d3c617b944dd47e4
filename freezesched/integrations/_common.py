"""What every integration shares: its arguments, the controller it builds, log names.

An integration only translates a framework's clock into ticks, and a framework's
metrics into observations; everything it is told (``module=``, ``schedule=``,
``policy=`` and the policy's keyword shortcuts, ``monitor=``) is validated here, once,
when the hook or callback is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from freezesched._validation import describe
from freezesched.freezing import FreezeController, FreezePolicy, LRRamp, resolve_policy
from freezesched.schedules import Schedule, ScheduleLike, check_schedule, schedule_from_config

__all__ = ["FreezeSpec", "ScheduleSpec", "log_name", "metric_value", "resume_state"]

#: A schedule, a callable tick -> bool, or a schedule config dict.
ScheduleSpec = ScheduleLike | Mapping[str, Any]


def _key(value: Any, where: str) -> Any:
    """A name, or (from a config file's lists) one entry per stage: a name or a group."""
    if isinstance(value, str):
        return value
    rule = (
        f"{where} must be a dotted submodule name, or a list with one entry per stage (a "
        "name, or a list of names frozen together)"
    )
    if not isinstance(value, list | tuple) or not value:
        raise TypeError(f"{rule}; got {describe(value)}")
    out: list[Any] = []
    for entry in value:
        if isinstance(entry, str):
            out.append(entry)
        elif (
            isinstance(entry, list | tuple)
            and entry
            and all(isinstance(name, str) for name in entry)
        ):
            out.append(tuple(entry))
        else:
            raise TypeError(f"{rule}; got {describe(value)}")
    return tuple(out)


def _targets(
    module: str | Sequence[Any],
    schedule: ScheduleSpec | None,
    schedules: Mapping[Any, ScheduleSpec] | None,
) -> dict[Any, ScheduleSpec]:
    if schedules is not None:
        if schedule is not None:
            raise TypeError(
                "give schedule= (with module=) or schedules= (a mapping of module name to "
                f"schedule), not both; got schedule={schedule!r}"
            )
        if not isinstance(schedules, Mapping) or not schedules:
            raise TypeError(f"schedules must be a non-empty mapping, got {describe(schedules)}")
        return {_key(k, "a key of schedules"): v for k, v in schedules.items()}
    if schedule is None:
        raise TypeError("schedule is required (or schedules=, a mapping of name to schedule)")
    return {_key(module, "module"): schedule}


@dataclass
class FreezeSpec:
    """The arguments of every integration, validated once, turned into a controller later.

    Args:
        module: Dotted name of the submodule to freeze (``""`` is the whole model), or a
            list with one entry per stage of a per-stage schedule (a name, or a list of
            names frozen together).
        schedule: When ``module`` is frozen: a schedule, a config dict such as
            ``{"type": "Step", "rho": 5}``, or a callable ``tick -> bool``.
        schedules: Instead of ``module``/``schedule``: a mapping of name(s) to schedule.
        by_epoch: Ticks are epochs (``True``) or optimizer steps (``False``).
        policy: How to freeze: a :class:`~freezesched.FreezePolicy` or its fields as a
            dict (from a config file); the shortcuts replace its fields.
        on_unfreeze: Shortcut for the policy's optimizer-state rule on unfreeze.
        bn: Shortcut for the policy's BatchNorm mode while frozen.
        dropout: Shortcut for the policy's dropout mode while frozen.
        trainable: Shortcut for the policy's trainable exceptions.
        unfreeze_lr: Shortcut for the policy's learning-rate ramp (an ``LRRamp`` or its
            fields as a dict).
        monitor: The name of the metric that metric-driven schedules
            (:class:`~freezesched.schedules.Plateau`) observe. Required when a schedule
            is metric-driven, refused otherwise.

    Raises:
        TypeError, ValueError: a bad argument; a metric-driven schedule without
            ``monitor`` or ``monitor`` without one.
    """

    module: str | Sequence[Any] = "backbone"
    schedule: ScheduleSpec | None = None
    schedules: Mapping[Any, ScheduleSpec] | None = None
    by_epoch: bool = True
    policy: FreezePolicy | Mapping[str, Any] | None = None
    on_unfreeze: str | None = None
    bn: str | None = None
    dropout: str | None = None
    trainable: Sequence[Any] | None = None
    unfreeze_lr: LRRamp | Mapping[str, Any] | None = None
    monitor: str | None = None
    targets: dict[Any, ScheduleSpec] = field(init=False, repr=False)
    resolved: FreezePolicy = field(init=False, repr=False)
    signals: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.targets = _targets(self.module, self.schedule, self.schedules)
        if not isinstance(self.by_epoch, bool):
            raise TypeError(f"by_epoch must be a bool, got {describe(self.by_epoch)}")
        ramp = self.unfreeze_lr
        self.resolved = resolve_policy(
            self.policy,
            on_unfreeze=self.on_unfreeze,
            bn=self.bn,
            dropout=self.dropout,
            trainable=self.trainable,
            unfreeze_lr=LRRamp(**ramp) if isinstance(ramp, Mapping) else ramp,
        )
        # Validate schedules now, so a bad config fails when the hook or callback is
        # built rather than when training reaches it.
        signals: set[str] = set()
        for key, spec in self.targets.items():
            schedule = check_schedule(
                schedule_from_config(spec) if isinstance(spec, Mapping) else spec,
                f"schedule for {key!r}",
            )
            if isinstance(schedule, Schedule):
                signals |= schedule.signals
        self.signals = frozenset(signals)
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise TypeError(f"monitor must be a metric name (a str), got {describe(self.monitor)}")
        if "metric" in self.signals and self.monitor is None:
            raise ValueError(
                "a schedule is metric-driven (Plateau), so monitor= must name the metric it "
                "observes, e.g. monitor='val_loss'; got monitor=None"
            )
        if self.monitor is not None and "metric" not in self.signals:
            raise ValueError(
                f"monitor={self.monitor!r} is given, but no schedule observes a metric; give "
                "a metric-driven schedule such as Plateau, or leave monitor out"
            )

    @property
    def names(self) -> list[str]:
        """Every scheduled module name, in order."""
        out: list[str] = []
        for key in self.targets:
            stack = [key]
            while stack:
                item = stack.pop(0)
                if isinstance(item, str):
                    out.append(item)
                else:
                    stack[:0] = list(item)
        return out

    def controller(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        resuming: bool = False,
    ) -> FreezeController:
        """A :class:`~freezesched.FreezeController` for ``model`` (touches nothing yet).

        Args:
            model: The model.
            optimizers: Its optimizers.
            resuming: Whether a checkpoint's state will be loaded into the controller
                (which replaces the adaptive schedules' records).

        Raises:
            ValueError: not ``resuming``, and an adaptive schedule object given to the
                integration already holds decisions from an earlier run.
        """
        if not resuming:
            for key, spec in self.targets.items():
                if not isinstance(spec, Schedule):
                    continue  # a config builds a fresh schedule for each controller
                used = [part for part in spec.adaptive_parts if part.horizon > 1]
                if used:
                    raise ValueError(
                        f"the schedule for {key!r} holds an adaptive schedule that already "
                        f"decided ticks in an earlier run ({used[0]!r}); a new run needs a "
                        "new one (or give its config, or resume from the checkpoint)"
                    )
        return FreezeController(model, self.targets, optimizers=optimizers, policy=self.resolved)


def resume_state(
    spec: FreezeSpec, saved: Mapping[str, Any] | None, *, resuming: bool, where: str
) -> tuple[Mapping[str, Any] | None, bool]:
    """What a (re)started integration loads into its controller, and whether strictly.

    Without adaptive schedules: the saved state, if any, leniently (schedules may have
    changed: the saved tick is re-evaluated under the new ones). With adaptive schedules:
    a run that resumes must find their record (strictly: the same schedules), or it would
    decide differently from the uninterrupted run; a run that starts anew (e.g. MMEngine's
    ``load_from``) ignores a saved state, so its adaptive schedules start fresh.

    Raises:
        ValueError: resuming adaptive schedules without their record.
    """
    if not spec.signals:
        return (saved or None), False
    if not resuming:
        return None, True
    if not saved or "adaptive" not in saved:
        raise ValueError(
            f"resuming an adaptive schedule needs its record, but {where} has none (saved "
            "without this integration, or by an older freezesched); a fresh record would "
            "decide differently from the uninterrupted run. Start the run anew, or resume "
            "with a pure schedule"
        )
    return saved, True


def metric_value(metrics: Mapping[str, Any], monitor: str, where: str) -> Any:
    """``metrics[monitor]``, or a ``ValueError`` naming the metrics there are.

    Examples:
        >>> metric_value({"val_loss": 0.5}, "val_loss", "the logged metrics")
        0.5
    """
    if monitor not in metrics:
        raise ValueError(
            f"monitor={monitor!r} must be one of {where}, got {sorted(metrics)}; log it "
            "(or fix the name) so the metric-driven schedule can observe it"
        )
    return metrics[monitor]


def log_name(module: str) -> str:
    """The scalar name an integration logs a module's state under (1.0 = frozen).

    Examples:
        >>> log_name("backbone"), log_name("")
        ('frozen/backbone', 'frozen/model')
    """
    return f"frozen/{module or 'model'}"
