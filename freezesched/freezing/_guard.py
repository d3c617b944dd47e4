"""FrozenStageGuard: freeze modules for one region of code, restore them exactly after."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

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
from freezesched.freezing._targets import ScheduleLike, as_modules, check_schedule, decide

__all__ = ["FrozenRegion", "FrozenStageGuard"]


class FrozenRegion:
    """The context manager returned by ``guard(modules, tick)``; enter it once.

    Attributes:
        modules: The guarded modules, in the order given.
        frozen: One decision per module (``True`` = frozen in this region).
    """

    def __init__(
        self, modules: tuple[nn.Module, ...], frozen: tuple[bool, ...], policy: FreezePolicy
    ) -> None:
        self.modules = modules
        self.frozen = frozen
        self._policy = policy
        self._handles: list[FreezeHandle] | None = None

    def __repr__(self) -> str:
        return f"FrozenRegion(frozen={self.frozen}, entered={self._handles is not None})"

    def __enter__(self) -> FrozenRegion:
        if self._handles is not None:
            raise RuntimeError("this region was already entered; call guard(...) for a new one")
        # Plan everything first (read-only), so that bad input leaves the model untouched.
        plans = [
            plan_freeze(m, self._policy)
            for m, f in zip(self.modules, self.frozen, strict=True)
            if f
        ]
        if plans:
            check_patterns_matched(self._policy, plans, "the frozen modules")
        handles: list[FreezeHandle] = []
        try:
            for plan in plans:
                handles.append(freeze(plan))
        except BaseException:
            for handle in reversed(handles):
                handle.release()
            raise
        self._handles = handles
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handles, self._handles = self._handles or [], []
        for handle in reversed(handles):
            handle.release()


class FrozenStageGuard:
    """Freeze a submodule for a region of code when the schedule says so.

    ``guard(module, tick)`` returns a context manager. Inside it, when the schedule is
    frozen at ``tick``:

    * the module's parameters have ``requires_grad=False`` and ``.grad is None``, so no
      optimizer (momentum, weight decay, Adam moments, decoupled decay) moves them, even
      when the loop calls ``zero_grad(set_to_none=False)``. Any gradient accumulated in
      them before the region is discarded;
    * its forward runs under :func:`torch.no_grad` when no input and no parameter inside
      it requires grad, so no activations are kept for backward (unlike the DBF paper's
      ``out.detach()``, which still builds and keeps the backbone's graph); when an input
      requires grad (a frozen middle stage), input gradients still flow through it, but
      no weight gradients are computed;
    * BatchNorm and dropout layers follow ``bn`` / ``dropout`` (see :class:`FreezePolicy`);
    * exceptions named in ``trainable`` stay trainable, with correct gradients.

    On exit, also when the body raises, every ``requires_grad`` flag, train/eval mode and
    ``forward`` is restored exactly, and nothing stays wrapped. Constructing a guard, or
    calling it, touches nothing; only entering the region does.

    Nesting and overlap: holds are counted per parameter and module, so nested or
    overlapping regions (e.g. ``backbone`` and ``backbone.layer1``) freeze the union and
    each object returns to its original state when the last region holding it exits.
    Where policies differ, the stricter one wins (a layer pinned to eval by one region
    stays in eval until that region ends).

    Args:
        schedule: A :class:`~freezesched.Schedule`, or any pure function of the tick that
            returns ``bool`` (frozen) or a tuple of bools (one per stage).
        bn: BatchNorm policy while frozen, ``"eval"`` (default) or ``"train"``.
        dropout: Dropout policy while frozen, ``"eval"`` (default) or ``"train"``.
        trainable: Name patterns and module types that stay trainable inside a frozen
            module (adapters, LoRA, norms); each must match something.

    Raises:
        TypeError: ``schedule`` is not callable, or ``trainable`` is malformed.
        ValueError: ``bn`` or ``dropout`` is not ``"eval"`` or ``"train"``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from freezesched import FrozenStageGuard, Step
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> backbone, head = model[0], model[2]
        >>> guard = FrozenStageGuard(Step(2))  # trainable on even ticks
        >>> with guard(backbone, 1) as region:
        ...     out = model(torch.randn(3, 4)).sum()
        ...     out.backward()
        ...     region.frozen, backbone.weight.requires_grad, backbone.weight.grad
        ((True,), False, None)
        >>> backbone.weight.requires_grad, head.weight.grad is not None
        (True, True)
    """

    def __init__(
        self,
        schedule: ScheduleLike,
        *,
        bn: ModePolicy = "eval",
        dropout: ModePolicy = "eval",
        trainable: Sequence[TrainableSpec] = (),
    ) -> None:
        self.schedule = check_schedule(schedule)
        self.policy = FreezePolicy(bn=bn, dropout=dropout, trainable=trainable)

    def __repr__(self) -> str:
        p = self.policy
        return (
            f"FrozenStageGuard({self.schedule!r}, bn={p.bn!r}, dropout={p.dropout!r}, "
            f"trainable={list(p.trainable)!r})"
        )

    def decide(self, tick: int, num_modules: int = 1) -> tuple[bool, ...]:
        """The decision per module at ``tick`` (``True`` = frozen), touching nothing.

        Examples:
            >>> from freezesched import Layerwise
            >>> FrozenStageGuard(Layerwise.gradual_unfreeze(3)).decide(1, num_modules=3)
            (True, False, False)
        """
        return decide(self.schedule, tick, num_modules)

    def __call__(self, modules: nn.Module | Sequence[nn.Module], tick: int) -> FrozenRegion:
        """A region freezing ``modules`` as the schedule decides at ``tick``.

        Args:
            modules: One module, or one module per stage for a per-stage schedule (a
                binary schedule applies the same decision to every module given).
            tick: The current epoch or iteration, an ``int >= 0``.

        Raises:
            TypeError: ``modules`` is not a module or a sequence of modules, or ``tick``
                is not an int.
            ValueError: ``tick`` is negative or the module count does not fit the schedule.
        """
        mods = as_modules(modules)
        return FrozenRegion(mods, decide(self.schedule, tick, len(mods)), self.policy)
