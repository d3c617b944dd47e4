"""A Hugging Face ``transformers.TrainerCallback`` that freezes submodules on a schedule.

Example::

    from transformers import Trainer
    from freezesched import Step
    from freezesched.integrations.hf import FreezeScheduleCallback

    freeze = FreezeScheduleCallback("model.encoder", Step(5))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[freeze]).train()

The optimizer keeps every parameter; a frozen one gets no gradient, so the optimizer
(weight decay included) leaves it alone.

Adaptive schedules: with ``monitor="eval_loss"``, a
:class:`~freezesched.schedules.Plateau` observes that evaluation metric after each
evaluation; a :class:`~freezesched.schedules.GradientFreeze` gets the per-stage gradient
norms before each optimizer step. Their records travel in the checkpoint's
``trainer_state.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from freezesched.freezing import FreezeController, FreezePolicy, check_ddp_settings
from freezesched.integrations._common import FreezeSpec, ScheduleSpec, log_name, metric_value

__all__ = ["FreezeScheduleCallback"]

#: Where the callback keeps adaptive schedules' records in ``TrainerState``: under
#: ``state.stateful_callbacks[STATE_KEY + module names]``, so ``trainer_state.json`` in
#: every checkpoint holds them.
STATE_KEY = "freezesched:"


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

    A metric-driven schedule observes ``metrics[monitor]`` in each ``on_evaluate`` during
    training, as the value of the tick just trained (HF gathers evaluation results from
    every rank; the ranks' values are averaged anyway, so every rank decides alike). As
    for ``metric_for_best_model``, a name without the ``eval_`` prefix gets it. With epoch
    ticks, evaluate once per epoch (``eval_strategy="epoch"``). A
    :class:`~freezesched.schedules.GradientFreeze` gets the gradient norms in
    ``on_pre_optimizer_step``. Adaptive records are kept in
    ``state.stateful_callbacks["freezesched:<modules>"]``, so every checkpoint's
    ``trainer_state.json`` holds them and a resumed run decides exactly as an
    uninterrupted one; resuming an adaptive schedule from a checkpoint without them is
    refused.

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
        monitor: The evaluation metric a metric-driven schedule observes
            (``"eval_loss"``; ``"loss"`` means the same); required with one, refused
            without.

    Raises:
        TypeError, ValueError: a bad argument (at construction); a module name the model
            lacks, distributed training with ``ddp_find_unused_parameters=False`` or
            ``ddp_static_graph=True``, ``monitor`` without evaluation or with several
            evaluations per epoch tick, or resuming an adaptive schedule from a checkpoint
            without its record (when training starts); a ``monitor`` missing from the
            evaluation metrics.
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
        monitor: str | None = None,
    ) -> None:
        if isinstance(monitor, str) and monitor and not monitor.startswith("eval_"):
            monitor = f"eval_{monitor}"
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
            monitor=monitor,
        )
        self.log = log
        self.controller: FreezeController | None = None

    @property
    def state_key(self) -> str:
        """Key of this callback's adaptive records in ``state.stateful_callbacks``."""
        return STATE_KEY + "+".join(self.spec.names)

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
        if self.spec.monitor is not None:
            self._check_evaluation(args)
        # Accelerate wraps the optimizer; its state lives in the wrapped one.
        inner = getattr(optimizer, "optimizer", optimizer)
        optimizers = [inner] if isinstance(inner, torch.optim.Optimizer) else []
        self.controller = self.spec.controller(model, optimizers, resuming=state.global_step > 0)
        if state.global_step > 0:
            # Resuming: re-enter the freeze state of the last step before the checkpoint
            # (optimizer state untouched: the Trainer restored it from the checkpoint).
            last = max(
                math.ceil(state.epoch or 0.0) - 1 if self.spec.by_epoch else state.global_step - 1,
                0,
            )
            saved = self.controller.state_dict()
            if self.spec.signals:
                saved = self._saved_record(state, last)
            saved["tick"] = last
            self.controller.load_state_dict(saved)

    def _check_evaluation(self, args: TrainingArguments) -> None:
        strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
        if strategy == "no":
            raise ValueError(
                f"monitor={self.spec.monitor!r} is read after each evaluation, but "
                "TrainingArguments(eval_strategy='no') never evaluates; set eval_strategy"
            )
        if self.spec.by_epoch and strategy != "epoch":
            raise ValueError(
                "with epoch ticks a metric-driven schedule observes one value per epoch, so "
                f"TrainingArguments(eval_strategy=...) must be 'epoch', got {strategy!r} (or "
                "use by_epoch=False for step ticks)"
            )

    def _saved_record(self, state: TrainerState, tick: int) -> dict[str, Any]:
        records: Any = state.stateful_callbacks  # a dict once TrainerState is built
        saved = records.get(self.state_key) if isinstance(records, dict) else None
        if not isinstance(saved, Mapping):
            raise ValueError(
                f"resuming an adaptive schedule needs its record, but the checkpoint's "
                f"trainer_state.json has no stateful_callbacks[{self.state_key!r}] (saved "
                "without this callback, or by an older freezesched); start from the beginning "
                "or with a pure schedule"
            )
        if saved.get("tick") != tick:
            raise ValueError(
                f"the checkpoint's freezesched record is at tick {saved.get('tick')!r}, but the "
                f"Trainer resumes after tick {tick}; the record does not belong to it"
            )
        return dict(saved)

    def _store(self, state: TrainerState) -> None:
        """Keep the adaptive records where HF saves them with each checkpoint."""
        if self.spec.signals and self.controller is not None and self.controller.tick is not None:
            records: Any = state.stateful_callbacks  # a dict once TrainerState is built
            if not isinstance(records, dict):
                records = {}
                setattr(state, "stateful_callbacks", records)  # noqa: B010 (typed as a list)
            records[self.state_key] = self.controller.state_dict()

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

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Record the gradient norms a GradientFreeze observes."""
        if self.controller is not None and "gradient_norm" in self.spec.signals:
            self.controller.record_gradients()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Keep the adaptive records up to date for a checkpoint saved after this step."""
        self._store(state)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Give ``metrics[monitor]`` to the metric-driven schedules (during training)."""
        controller = self.controller
        if self.spec.monitor is None or controller is None or controller.tick is None:
            return
        value = metric_value(metrics or {}, self.spec.monitor, "the evaluation metrics")
        controller.observe(controller.tick, value)
        self._store(state)

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
