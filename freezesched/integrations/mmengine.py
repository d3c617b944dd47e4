"""An MMEngine hook, so that a config file alone schedules freezing.

Importing this module registers :class:`FreezeScheduleHook` in MMEngine's ``HOOKS``
registry. In an MMDetection 3.x / MMRotate 1.x config::

    custom_imports = dict(imports=["freezesched.integrations.mmengine"],
                          allow_failed_imports=False)
    custom_hooks = [
        dict(type="FreezeScheduleHook", module="backbone",
             schedule=dict(type="WarmupThenFreeze", warmup=12,
                           then=dict(type="Step", rho=5))),
    ]

The hook builds a :class:`~freezesched.FreezeController` over ``runner.model`` (inside
its DDP / ``MMDistributedDataParallel`` wrapper) and the runner's optimizers, applies
the schedule at ``runner.epoch`` (``by_epoch=True``, default for epoch-based loops) or
``runner.iter`` before each epoch or iteration, logs ``frozen/<module>`` (1.0 = frozen)
through the message hub (so it shows in the text log, TensorBoard and friends), saves
the controller's state into checkpoints and restores it on resume, and unfreezes
everything after training.

Adaptive schedules: with ``monitor="accuracy"`` (a key of the validation metrics), a
:class:`~freezesched.schedules.Plateau` observes that metric after each validation::

    custom_hooks = [
        dict(type="FreezeScheduleHook", module="backbone", monitor="dota/mAP",
             schedule=dict(type="WarmupThenFreeze", warmup=12,
                           then=dict(type="Plateau", mode="max", patience=2))),
    ]
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from torch import nn

from freezesched.freezing import FreezeController, FreezePolicy, check_ddp_settings
from freezesched.integrations._common import (
    FreezeSpec,
    ScheduleSpec,
    log_name,
    metric_value,
    resume_state,
)

__all__ = ["FreezeScheduleHook"]

#: Where the hook keeps its controller's state in an MMEngine checkpoint.
CHECKPOINT_KEY = "freezesched"


@HOOKS.register_module()
class FreezeScheduleHook(Hook):
    """Freeze submodules of an MMEngine model on a schedule of epochs or iterations.

    Args:
        module: Dotted name of the submodule inside the (unwrapped) model, e.g.
            ``"backbone"`` or ``"backbone.layer4"``; a list of names for a per-stage
            schedule such as ``Layerwise``.
        schedule: A schedule, or its config dict (``dict(type="Step", rho=5)``).
        schedules: Instead of ``module``/``schedule``, a dict of name to schedule.
        by_epoch: Ticks are epochs or iterations; ``None`` (default) follows the train
            loop (iterations for ``IterBasedTrainLoop``, else epochs).
        policy: How to freeze: a :class:`~freezesched.FreezePolicy` or, in a config
            file, a dict of its fields (``dict(bn="eval", on_unfreeze="keep")``).
        on_unfreeze: Shortcut: optimizer state of parameters when they unfreeze,
            ``"reset"`` (the policy's default) or ``"keep"`` (what the official DBF code
            does).
        bn: Shortcut: BatchNorm mode while frozen, ``"eval"`` (running statistics stay
            put) or ``"train"``.
        dropout: Shortcut: dropout mode while frozen.
        trainable: Shortcut: patterns or module types that stay trainable inside frozen
            modules.
        unfreeze_lr: Shortcut: a learning-rate ramp after an unfreeze (``LRRamp`` or
            ``dict(start=0.1, ticks=5)``).
        name: Key of this hook's state in checkpoints; defaults to the module names.
        monitor: The validation metric a metric-driven schedule observes (a key of the
            evaluator's metrics, e.g. ``"accuracy"`` or ``"coco/bbox_mAP"``); required
            with one, refused without.

    A metric-driven schedule observes ``metrics[monitor]`` in ``after_val_epoch`` during
    training, as the value of the tick just trained (the evaluator's metrics are the
    same on every rank; they are averaged anyway, so every rank decides alike). MMEngine
    saves a checkpoint *before* the validation of the same epoch (or iteration), so the
    checkpoint lacks that observation: when a run with a metric-driven schedule resumes
    from a checkpoint after which the train loop would have validated, the hook runs that
    validation once more before training continues (same weights, same data, so the same
    value), and the resumed run decides exactly as the uninterrupted one. Gradient-driven
    schedules (:class:`~freezesched.schedules.GradientFreeze`) are refused: MMEngine's
    optimizer wrapper runs backward, step and ``zero_grad`` inside ``train_step``, with no
    hook in between to measure gradients; use the controller in a plain loop, or the
    Lightning or Hugging Face callback.

    Raises:
        TypeError, ValueError: at construction, for a bad argument (a config typo fails
            before any data is loaded) or a gradient-driven schedule; in
            ``before_train``, for a module name the model lacks, a
            ``MMDistributedDataParallel`` without ``find_unused_parameters=True``, a
            ``monitor`` without a validation loop, resuming an adaptive schedule from a
            checkpoint without its record, or resuming a metric-driven schedule under a
            train loop other than ``EpochBasedTrainLoop`` and ``IterBasedTrainLoop``; in
            ``after_val_epoch``, a ``monitor`` that is not among the metrics. (With
            ``load_from`` and no ``resume``, adaptive schedules start afresh.)
    """

    priority = "ABOVE_NORMAL"  # decide before other hooks see the iteration

    def __init__(
        self,
        module: str | Sequence[str] = "backbone",
        schedule: ScheduleSpec | None = None,
        schedules: Mapping[Any, ScheduleSpec] | None = None,
        by_epoch: bool | None = None,
        policy: FreezePolicy | Mapping[str, Any] | None = None,
        on_unfreeze: str | None = None,
        bn: str | None = None,
        dropout: str | None = None,
        trainable: Sequence[Any] | None = None,
        unfreeze_lr: Any = None,
        name: str | None = None,
        monitor: str | None = None,
    ) -> None:
        self.spec = FreezeSpec(
            module=module,
            schedule=schedule,
            schedules=schedules,
            by_epoch=True if by_epoch is None else by_epoch,
            policy=policy,
            on_unfreeze=on_unfreeze,
            bn=bn,
            dropout=dropout,
            trainable=trainable,
            unfreeze_lr=unfreeze_lr,
            monitor=monitor,
        )
        if "gradient_norm" in self.spec.signals:
            raise ValueError(
                "FreezeScheduleHook cannot feed a gradient-driven schedule (GradientFreeze): "
                "MMEngine's optimizer wrapper runs backward, step and zero_grad inside "
                "train_step, with no hook in between to measure gradients. Use "
                "FreezeController.record_gradients() in your own loop, or the Lightning or "
                "Hugging Face callback"
            )
        self._by_epoch = by_epoch
        self.name = name or "+".join(self.spec.names)
        self.controller: FreezeController | None = None
        self._resumed: Mapping[str, Any] | None = None

    def _controller(self, runner: Any, *, resuming: bool = False) -> FreezeController:
        if self.controller is None:
            model: nn.Module = runner.model
            if is_model_wrapper(model) and not isinstance(
                model, nn.parallel.DistributedDataParallel
            ):
                inner = model.module  # MMDataParallel and other registered wrappers
                if not isinstance(inner, nn.Module):
                    raise TypeError(f"runner.model.module must be an nn.Module, got {inner!r}")
                model = inner
            if isinstance(model, nn.parallel.DistributedDataParallel):
                check_ddp_settings(
                    model.find_unused_parameters,
                    bool(getattr(model, "static_graph", False)),
                    where="runner.model",
                    fix="Add model_wrapper_cfg=dict(type='MMDistributedDataParallel', "
                    "find_unused_parameters=True) to the config",
                )
            self.controller = self.spec.controller(model, _optimizers(runner), resuming=resuming)
        return self.controller

    def by_epoch(self, runner: Any) -> bool:
        """Whether ticks are epochs for ``runner`` (explicit, or from its train loop)."""
        if self._by_epoch is not None:
            return self._by_epoch
        return not isinstance(runner.train_loop, IterBasedTrainLoop)

    def _apply(self, runner: Any, tick: int) -> None:
        frozen = self._controller(runner).apply(tick)
        for module, state in frozen.items():
            runner.message_hub.update_scalar(f"train/{log_name(module)}", float(state))

    def before_train(self, runner: Any) -> None:
        """Build the controller; after a resume, re-enter the checkpoint's freeze state.

        With a metric-driven schedule, also re-run the validation that followed the
        checkpoint in the original run if the checkpoint does not hold its value.
        """
        if self.spec.monitor is not None and runner.val_loop is None:
            raise ValueError(
                f"monitor={self.spec.monitor!r} is read from the validation metrics, but this "
                "runner has no validation loop (val_dataloader, val_cfg, val_evaluator)"
            )
        # after_load_checkpoint runs for load_from too; only a resumed loop has advanced.
        resuming = runner.iter > 0
        saved, strict = resume_state(
            self.spec, self._resumed, resuming=resuming, where="the checkpoint"
        )
        self._resumed = None
        controller = self._controller(runner, resuming=saved is not None)
        if saved is None:
            return
        controller.load_state_dict(saved, strict=strict)
        tick = controller.tick
        if (
            self.spec.monitor is not None
            and tick is not None
            and controller.last_observed != tick
            and self._validated_after(runner, tick)
        ):
            runner.val_loop.run()  # after_val_epoch observes it, as in the original run

    def _validated_after(self, runner: Any, tick: int) -> bool:
        """Whether the train loop validated right after training ``tick`` (MMEngine's rule)."""
        loop = runner.train_loop
        if isinstance(loop, EpochBasedTrainLoop) and self.by_epoch(runner):
            done, last = tick + 1, loop.max_epochs
        elif isinstance(loop, IterBasedTrainLoop) and not self.by_epoch(runner):
            done, last = tick + 1, loop.max_iters
        else:
            raise ValueError(
                "resuming a metric-driven schedule needs to know whether the train loop "
                "validated after the checkpoint (MMEngine saves checkpoints before "
                f"validating); it knows EpochBasedTrainLoop with epoch ticks and "
                f"IterBasedTrainLoop with iteration ticks, got {type(loop).__name__} with "
                f"by_epoch={self.by_epoch(runner)}"
            )
        step = bisect.bisect(loop.dynamic_milestones, done + 1)
        interval = loop.dynamic_intervals[step - 1]
        return bool(done >= loop.val_begin and (done % interval == 0 or done == last))

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        """Give ``metrics[monitor]`` to the metric-driven schedules (during training)."""
        controller = self.controller
        if self.spec.monitor is None or controller is None or controller.tick is None:
            return
        value = metric_value(metrics or {}, self.spec.monitor, "the validation metrics")
        controller.observe(controller.tick, value)

    def before_train_epoch(self, runner: Any) -> None:
        """Apply the schedule at ``runner.epoch`` (by-epoch ticks)."""
        if self.by_epoch(runner):
            self._apply(runner, runner.epoch)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        """Apply the schedule at ``runner.iter`` (by-iteration ticks); log the state."""
        if self.by_epoch(runner):
            self._apply(runner, runner.epoch)  # idempotent; keeps the logged value fresh
        else:
            self._apply(runner, runner.iter)

    def after_train(self, runner: Any) -> None:
        """Unfreeze everything, leaving the model as it would be without the hook."""
        if self.controller is not None:
            self.controller.release()

    def before_save_checkpoint(self, runner: Any, checkpoint: dict[str, Any]) -> None:
        """Store the controller's state (the last tick) under ``checkpoint["freezesched"]``."""
        if self.controller is not None and self.controller.tick is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})[self.name] = self.controller.state_dict()

    def after_load_checkpoint(self, runner: Any, checkpoint: dict[str, Any]) -> None:
        """Keep the saved controller state; ``before_train`` re-enters it.

        The next ``apply`` then sees the same transition (and ``on_unfreeze`` reset) as
        an uninterrupted run would. Schedules may differ from the saved ones (e.g. a
        finished full-training run continued into a DBF phase): the saved tick is then
        re-evaluated under the new schedules. Loading touches no module, so ``load_from``
        in a test run leaves the model alone.
        """
        self._resumed = checkpoint.get(CHECKPOINT_KEY, {}).get(self.name)


def _optimizers(runner: Any) -> list[torch.optim.Optimizer]:
    wrapper = runner.optim_wrapper
    if isinstance(wrapper, OptimWrapperDict):
        return [w.optimizer for w in wrapper.values()]
    optimizer = getattr(wrapper, "optimizer", None)
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else []
