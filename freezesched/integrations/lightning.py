"""A Lightning callback that freezes submodules of a ``LightningModule`` on a schedule.

Example::

    import lightning.pytorch as pl
    from freezesched import Step, WarmupThenFreeze
    from freezesched.integrations.lightning import FreezeScheduleCallback

    freeze = FreezeScheduleCallback("backbone", WarmupThenFreeze(12, then=Step(5)))
    pl.Trainer(callbacks=[freeze], max_epochs=60).fit(model)

Unlike Lightning's ``BaseFinetuning``, the optimizer keeps every parameter from the
start (a frozen parameter simply gets no gradient, so no optimizer updates it, weight
decay included): there are no parameter groups to add on unfreeze, and resuming needs
no replay of past unfreezes. BatchNorm is pinned to eval mode while frozen instead of
having ``track_running_stats`` flipped (which makes BatchNorm normalise with batch
statistics and changes the model's outputs), and the pin survives the ``model.train()``
calls Lightning makes after each validation.

Adaptive schedules: with ``monitor="val_loss"`` (as for ``EarlyStopping``), a
:class:`~freezesched.schedules.Plateau` observes that logged metric after each
validation; a :class:`~freezesched.schedules.GradientFreeze` gets the per-stage gradient
norms before each optimizer step. Their records are saved in the checkpoint::

    freeze = FreezeScheduleCallback(
        "backbone", WarmupThenFreeze(2, then=Plateau(patience=2)), monitor="val_loss"
    )
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from freezesched.freezing import FreezeController, FreezePolicy, check_ddp_settings
from freezesched.integrations._common import (
    FreezeSpec,
    ScheduleSpec,
    log_name,
    metric_value,
    resume_state,
)

__all__ = ["FreezeScheduleCallback"]


class FreezeScheduleCallback(pl.Callback):
    """Freeze submodules of the ``LightningModule`` by epoch or by optimizer step.

    The schedule is applied at ``trainer.current_epoch`` before each training epoch
    (``by_epoch=True``) or at ``trainer.global_step`` before each batch. The state of
    each module is logged as ``frozen/<module>`` (1.0 = frozen), the controller's state
    (with adaptive schedules' records) is saved in Lightning checkpoints so that
    ``fit(ckpt_path=...)`` continues with the same decisions (and the same
    ``on_unfreeze`` resets) as an uninterrupted run, and everything is unfrozen when
    training ends.

    A metric-driven schedule observes ``trainer.callback_metrics[monitor]`` at the end
    of each validation run during fitting (not the sanity check), as the value of the
    tick just trained; under DDP the ranks' values are averaged, so every rank decides
    alike. With epoch ticks, validation must run at most once per epoch
    (``val_check_interval=1.0``); ``check_val_every_n_epoch`` may skip epochs. A
    :class:`~freezesched.schedules.GradientFreeze` gets the gradient norms in
    ``on_before_optimizer_step`` (after AMP unscaling).

    Args:
        module: Dotted name of the submodule of the ``LightningModule`` (``""`` for all
            of it), or a list of names for a per-stage schedule.
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
        log: Log ``frozen/<module>`` through ``LightningModule.log``.
        monitor: The logged metric a metric-driven schedule observes (``"val_loss"``);
            required with one, refused without.

    Raises:
        TypeError, ValueError: a bad argument (at construction); a module name the model
            lacks, DDP without ``find_unused_parameters=True``, ``monitor`` with no
            validation to read it from or several validations per epoch tick, resuming
            an adaptive schedule from a checkpoint without its record, or an adaptive
            schedule object that already ran (when training starts); a ``monitor`` that
            was not logged (after validation).

    Examples:
        >>> from freezesched import Step
        >>> FreezeScheduleCallback("backbone", Step(5)).state_key
        "FreezeScheduleCallback{'modules': ['backbone']}"
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
        self._resumed: Mapping[str, Any] | None = None

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints (unique per set of modules)."""
        return self._generate_state_key(modules=self.spec.names)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the DDP setup, build the controller, re-enter a resumed checkpoint's state."""
        wrapped = trainer.strategy.model
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            check_ddp_settings(
                wrapped.find_unused_parameters,
                bool(getattr(wrapped, "static_graph", False)),
                where="the Trainer's model",
                fix="Use Trainer(strategy='ddp_find_unused_parameters_true') or "
                "DDPStrategy(find_unused_parameters=True)",
            )
        if self.spec.monitor is not None:
            self._check_validation(trainer)
        resuming = trainer.global_step > 0
        saved, strict = resume_state(
            self.spec, self._resumed, resuming=resuming, where="the checkpoint"
        )
        self._resumed = None
        self.controller = self.spec.controller(
            pl_module, list(trainer.optimizers), resuming=saved is not None
        )
        if saved is not None:
            self.controller.load_state_dict(saved, strict=strict)

    def _check_validation(self, trainer: pl.Trainer) -> None:
        if not trainer.enable_validation:
            raise ValueError(
                f"monitor={self.spec.monitor!r} is read after each validation run, but this "
                "Trainer runs none (no val_dataloader, no validation_step, or "
                "limit_val_batches=0); log the metric in validation_step"
            )
        interval = trainer.val_check_interval
        if self.spec.by_epoch and not (isinstance(interval, float) and interval == 1.0):
            raise ValueError(
                "with epoch ticks a metric-driven schedule observes one value per epoch, so "
                f"validation must run once per epoch: val_check_interval must be 1.0, got "
                f"{interval!r} (or use by_epoch=False for step ticks)"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give ``callback_metrics[monitor]`` to the metric-driven schedules (fitting only)."""
        controller = self.controller
        if (
            self.spec.monitor is None
            or controller is None
            or controller.tick is None
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        value = metric_value(
            trainer.callback_metrics, self.spec.monitor, "trainer.callback_metrics"
        )
        controller.observe(controller.tick, value)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Record the gradient norms a GradientFreeze observes (grads are unscaled here)."""
        if self.controller is not None and "gradient_norm" in self.spec.signals:
            self.controller.record_gradients()

    def _apply(self, tick: int, pl_module: pl.LightningModule) -> None:
        if self.controller is None:
            raise RuntimeError("FreezeScheduleCallback: on_train_start was not called")
        frozen = self.controller.apply(tick)
        if self.log:
            for module, state in frozen.items():
                pl_module.log(log_name(module), float(state), on_step=True, batch_size=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the schedule at ``trainer.current_epoch`` (by-epoch ticks)."""
        if self.spec.by_epoch and self.controller is not None:
            self.controller.apply(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Apply the schedule at ``trainer.global_step`` (by-step ticks); log the state."""
        self._apply(trainer.current_epoch if self.spec.by_epoch else trainer.global_step, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unfreeze everything."""
        if self.controller is not None:
            self.controller.release()

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (its last tick, adaptive records), saved in checkpoints."""
        if self.controller is None or self.controller.tick is None:
            return {}
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's controller state; ``on_train_start`` re-enters it."""
        self._resumed = state_dict or None
