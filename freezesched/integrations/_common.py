"""What every integration shares: ``module=`` / ``schedule=`` arguments and log names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from freezesched.freezing import FreezeController, OptimizerPolicy, ScheduleLike
from freezesched.freezing._mechanism import FreezePolicy, ModePolicy, TrainableSpec
from freezesched.freezing._targets import check_schedule
from freezesched.schedules import schedule_from_config
from freezesched.schedules._base import _describe

__all__ = ["FreezeSpec", "ScheduleSpec", "log_name"]

#: A schedule, a callable tick -> bool, or a schedule config dict.
ScheduleSpec = ScheduleLike | Mapping[str, Any]


def _keys(
    module: str | Sequence[str],
    schedule: ScheduleSpec | None,
    schedules: Mapping[Any, ScheduleSpec] | None,
) -> dict[str | tuple[str, ...], ScheduleSpec]:
    if schedules is not None:
        if schedule is not None:
            raise TypeError(
                "give schedule= (with module=) or schedules= (a mapping of module name to "
                f"schedule), not both; got schedule={schedule!r}"
            )
        if not isinstance(schedules, Mapping) or not schedules:
            raise TypeError(f"schedules must be a non-empty mapping, got {_describe(schedules)}")
        # A config file can only hold lists; a list key names one module per stage.
        return {tuple(k) if isinstance(k, list) else k: v for k, v in schedules.items()}
    if schedule is None:
        raise TypeError("schedule is required (or schedules=, a mapping of name to schedule)")
    if isinstance(module, str):
        return {module: schedule}
    if isinstance(module, Sequence) and module and all(isinstance(m, str) for m in module):
        return {tuple(module): schedule}
    raise TypeError(
        f"module must be a dotted submodule name or a list of names, got {_describe(module)}"
    )


@dataclass
class FreezeSpec:
    """The arguments of every integration, validated once, turned into a controller later.

    Args:
        module: Dotted name of the submodule to freeze (``""`` is the whole model), or a
            list of names, one per stage of a per-stage schedule.
        schedule: When ``module`` is frozen: a schedule, a config dict such as
            ``{"type": "Step", "rho": 5}``, or a callable ``tick -> bool``.
        schedules: Instead of ``module``/``schedule``: a mapping of name(s) to schedule.
        by_epoch: Ticks are epochs (``True``) or optimizer steps (``False``).
        on_unfreeze: Optimizer state of unfrozen parameters: ``"keep"`` or ``"reset"``.
        bn: BatchNorm policy while frozen (see :class:`~freezesched.FreezePolicy`).
        dropout: Dropout policy while frozen.
        trainable: Exceptions that stay trainable inside frozen modules.
    """

    module: str | Sequence[str] = "backbone"
    schedule: ScheduleSpec | None = None
    schedules: Mapping[Any, ScheduleSpec] | None = None
    by_epoch: bool = True
    on_unfreeze: OptimizerPolicy = "keep"
    bn: ModePolicy = "eval"
    dropout: ModePolicy = "eval"
    trainable: Sequence[TrainableSpec] = ()
    targets: dict[str | tuple[str, ...], ScheduleSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.targets = _keys(self.module, self.schedule, self.schedules)
        if not isinstance(self.by_epoch, bool):
            raise TypeError(f"by_epoch must be a bool, got {_describe(self.by_epoch)}")
        if self.on_unfreeze not in ("keep", "reset"):
            raise ValueError(
                f"on_unfreeze must be 'keep' or 'reset', got {_describe(self.on_unfreeze)}"
            )
        # Validate policies and schedules now, so a bad config fails when the hook or
        # callback is built rather than when training reaches it.
        FreezePolicy(bn=self.bn, dropout=self.dropout, trainable=self.trainable)
        for key, spec in self.targets.items():
            check_schedule(
                schedule_from_config(spec) if isinstance(spec, Mapping) else spec,
                f"schedule for {key!r}",
            )

    def controller(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]
    ) -> FreezeController:
        """A :class:`~freezesched.FreezeController` for ``model`` (touches nothing yet)."""
        return FreezeController(
            model,
            self.targets,
            optimizers=optimizers,
            on_unfreeze=self.on_unfreeze,
            bn=self.bn,
            dropout=self.dropout,
            trainable=self.trainable,
        )


def log_name(module: str) -> str:
    """The scalar name an integration logs a module's state under (1.0 = frozen).

    Examples:
        >>> log_name("backbone"), log_name("")
        ('frozen/backbone', 'frozen/model')
    """
    return f"frozen/{module or 'model'}"
