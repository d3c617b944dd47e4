"""A Hugging Face ``transformers.TrainerCallback`` that freezes submodules on a schedule.

Example::

    from transformers import Trainer
    from freezesched import Step
    from freezesched.integrations.hf import FreezeScheduleCallback

    freeze = FreezeScheduleCallback("model.encoder", Step(5))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[freeze]).train()

The optimizer keeps every parameter; a frozen one gets no gradient, so the optimizer
(weight decay included) leaves it alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from freezesched.freezing import FreezeController, FreezePolicy, check_ddp_settings
from freezesched.integrations._common import FreezeSpec, ScheduleSpec, log_name

__all__ = ["FreezeScheduleCallback"]


class FreezeScheduleCallback(TrainerCallback):
    """Freeze submodules of the Trainer's model by epoch or by optimizer step.

    Ticks are ``floor(state.epoch)`` (``by_epoch=True``) or ``state.global_step``,
    applied before each optimizer step (gradient-accumulation micro-batches share a
    tick). On ``train(resume_from_checkpoint=...)`` the freeze state of the last step
    before the checkpoint is re-derived from ``state.global_step`` and ``state.epoch``
    (Hugging Face checkpoints always fall on a step boundary), so the run continues
    with the same decisions and ``on_unfreeze`` resets as an uninterrupted one.
    Each entry the Trainer logs gains ``frozen/<module>`` (1.0 = frozen), in
    ``state.log_history`` and in the ``logs`` later callbacks receive.

    Args:
        module: Dotted name of the submodule of the model (``""`` for all of it), or a
            list of names for a per-stage schedule.
        schedule: A schedule, its config dict, or a callable ``tick -> bool``.
        schedules: Instead of ``module``/``schedule``: a mapping of name to schedule.
        by_epoch: Ticks are epochs (default) or optimizer steps.
        policy: How to freeze (:class:`~freezesched.FreezePolicy`, or a dict of its
            fields); the shortcuts below replace its fields.
        on_unfreeze: Shortcut: ``"reset"`` or ``"keep"`` the optimizer state of
            unfrozen parameters.
        bn: Shortcut: BatchNorm mode while frozen.
        dropout: Shortcut: dropout mode while frozen.
        trainable: Shortcut: patterns or module types that stay trainable inside frozen
            modules.
        unfreeze_lr: Shortcut: a learning-rate ramp after an unfreeze.
        log: Add ``frozen/<module>`` to the Trainer's logs.

    Raises:
        TypeError, ValueError: a bad argument (at construction); a module name the model
            lacks, or distributed training with ``ddp_find_unused_parameters=False`` or
            ``ddp_static_graph=True`` (when training starts).
    """

    def __init__(
        self,
        module: str | Sequence[str] = "backbone",
        schedule: ScheduleSpec | None = None,
        *,
        schedules: Mapping[Any, ScheduleSpec] | None = None,
        by_epoch: bool = True,
        policy: FreezePolicy | Mapping[str, Any] | None = None,
        on_unfreeze: str | None = None,
        bn: str | None = None,
        dropout: str | None = None,
        trainable: Sequence[Any] | None = None,
        unfreeze_lr: Any = None,
        log: bool = True,
    ) -> None:
        self.spec = FreezeSpec(
            module=module,
            schedule=schedule,
            schedules=schedules,
            by_epoch=by_epoch,
            policy=policy,
            on_unfreeze=on_unfreeze,
            bn=bn,
            dropout=dropout,
            trainable=trainable,
            unfreeze_lr=unfreeze_lr,
        )
        self.log = log
        self.controller: FreezeController | None = None

    def _tick(self, state: TrainerState) -> int:
        return math.floor(state.epoch or 0.0) if self.spec.by_epoch else state.global_step

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Check the DDP settings, build the controller, re-derive a resumed run's state."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"the Trainer passed no model to the callback, got {model!r}")
        if args.world_size > 1:
            check_ddp_settings(
                args.ddp_find_unused_parameters,
                bool(args.ddp_static_graph),
                where="the Trainer's model (TrainingArguments)",
                fix="Set TrainingArguments(ddp_find_unused_parameters=True, "
                "ddp_static_graph=False)",
            )
        # Accelerate wraps the optimizer; its state lives in the wrapped one.
        inner = getattr(optimizer, "optimizer", optimizer)
        optimizers = [inner] if isinstance(inner, torch.optim.Optimizer) else []
        self.controller = self.spec.controller(model, optimizers)
        if state.global_step > 0:
            # Resuming: re-enter the freeze state of the last step before the checkpoint
            # (optimizer state untouched: the Trainer restored it from the checkpoint).
            last = (
                math.ceil(state.epoch or 0.0) - 1 if self.spec.by_epoch else state.global_step - 1
            )
            saved = self.controller.state_dict()
            saved["tick"] = max(last, 0)
            self.controller.load_state_dict(saved)

    def _apply(self, state: TrainerState) -> None:
        if self.controller is not None:
            self.controller.apply(self._tick(state))

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Apply the schedule at the epoch's tick."""
        self._apply(state)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Apply the schedule before each optimizer step (idempotent within a tick)."""
        self._apply(state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add ``frozen/<module>`` to the entry being logged."""
        if not self.log or self.controller is None or self.controller.tick is None:
            return
        values = {log_name(m): float(f) for m, f in self.controller.frozen.items()}
        if logs is not None:
            logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Unfreeze everything."""
        if self.controller is not None:
            self.controller.release()
