"""Optimizers and freezing: which ones are safe, state on unfreeze, a learning-rate ramp."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from freezesched._validation import check_int, describe

__all__ = [
    "LRRamp",
    "LRRampHooks",
    "as_optimizers",
    "check_optimizers",
    "reset_optimizer_state",
]


def as_optimizers(
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer], name: str = "optimizers"
) -> tuple[torch.optim.Optimizer, ...]:
    """One optimizer or several, as a tuple; ``TypeError`` for anything else."""
    if isinstance(optimizers, torch.optim.Optimizer):
        return (optimizers,)
    given: object = optimizers
    if isinstance(given, str) or not isinstance(given, Iterable):
        raise TypeError(
            f"{name} must be an Optimizer or a sequence of them, got {describe(optimizers)}"
        )
    out = tuple(optimizers)
    for i, opt in enumerate(out):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{name}[{i}] must be a torch Optimizer, got {describe(opt)}")
    return out


def check_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Refuse optimizers that move parameters without gradients.

    Every ``torch.optim`` optimizer skips a parameter whose ``.grad`` is ``None`` except
    ``LBFGS``, which steps all parameters of its group along a direction built from past
    steps: a parameter frozen for a step would still move.

    Raises:
        ValueError: an optimizer is ``torch.optim.LBFGS``.
    """
    for i, opt in enumerate(optimizers):
        if isinstance(opt, torch.optim.LBFGS):
            raise ValueError(
                f"optimizers[{i}] is torch.optim.LBFGS, which moves every parameter of its "
                "groups along a direction built from past steps, gradient or not, so a "
                "frozen parameter would still move. Give the parameters you freeze to a "
                "separate optimizer that skips parameters without gradients (SGD, Adam, ...)"
            )


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
    opts = as_optimizers(optimizers)
    dropped = 0
    for param in params:
        for opt in opts:
            if opt.state.pop(param, None) is not None:
                dropped += 1
    return dropped


@dataclass(frozen=True)
class LRRamp:
    """A learning-rate ramp after an unfreeze: from ``start`` x back to 1x in ``ticks``.

    On unfreeze, a module's learning rate starts at ``start`` x the rate the optimizer
    (and its LR scheduler) give, and ramps linearly back to 1x over ``ticks`` ticks.
    The factor at ``k`` ticks after the unfreeze (``k = 0`` is the first trainable tick)
    is ``start + (1 - start) * min(1, k / ticks)``. It is applied only around each
    ``optimizer.step()`` (the group's ``lr`` is put back exactly afterwards), so any
    LR scheduler keeps computing from its own values, and it is a pure function of the
    schedule and the tick, so a resumed run ramps exactly as an uninterrupted one. A
    module trainable from tick 0 is not ramped. The unfrozen module's parameters must
    have parameter groups of their own.

    Args:
        start: The factor on the first trainable tick, in ``(0, 1]``.
        ticks: Ticks to reach 1x, an int ``>= 1``.

    Examples:
        >>> ramp = LRRamp(start=0.1, ticks=4)
        >>> [round(ramp.factor(k), 3) for k in range(6)]
        [0.1, 0.325, 0.55, 0.775, 1.0, 1.0]
    """

    start: float = 0.1
    ticks: int = 5

    def __post_init__(self) -> None:
        start: object = self.start
        if isinstance(start, bool) or not isinstance(start, numbers.Real):
            raise TypeError(f"start must be a real number in (0, 1], got {describe(start)}")
        if not 0.0 < float(start) <= 1.0:
            raise ValueError(f"start must be a real number in (0, 1], got {start!r}")
        object.__setattr__(self, "start", float(start))
        object.__setattr__(self, "ticks", check_int(self.ticks, "ticks", minimum=1))

    def factor(self, since_unfreeze: int) -> float:
        """The learning-rate factor ``since_unfreeze`` ticks after the unfreeze."""
        return self.start + (1.0 - self.start) * min(1.0, since_unfreeze / self.ticks)


class LRRampHooks:
    """Step hooks that scale the ``lr`` of chosen parameter groups around ``step()``."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.factors: dict[tuple[int, int], float] = {}  # (optimizer, group) -> factor
        self._saved: dict[tuple[int, int], Any] = {}
        self._handles: list[Any] = []

    def install(self) -> None:
        if self._handles:
            return
        for i, opt in enumerate(self.optimizers):
            self._handles.append(opt.register_step_pre_hook(self._pre(i)))
            self._handles.append(opt.register_step_post_hook(self._post(i)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, index: int) -> Callable[..., None]:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for g, group in enumerate(opt.param_groups):
                if (index, g) in self._saved:  # a step that raised skipped the post-hook
                    group["lr"] = self._saved.pop((index, g))
                factor = self.factors.get((index, g), 1.0)
                if factor != 1.0:
                    self._saved[(index, g)] = group["lr"]
                    group["lr"] = group["lr"] * factor

        return hook

    def _post(self, index: int) -> Callable[..., None]:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for g, group in enumerate(opt.param_groups):
                if (index, g) in self._saved:
                    group["lr"] = self._saved.pop((index, g))

        return hook
