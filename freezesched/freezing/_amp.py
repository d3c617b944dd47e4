"""A GradScaler that accepts optimizers whose parameters are all frozen for a step."""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

__all__ = ["FreezeAwareGradScaler", "has_grads"]


def has_grads(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter of ``optimizer`` has a gradient this step.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> has_grads(opt)
        False
        >>> w.grad = torch.ones(2)
        >>> has_grads(opt)
        True
    """
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


class FreezeAwareGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that skips optimizers with no gradients, instead of failing.

    With one optimizer per part of the model (say the backbone and the head), a step in
    which the backbone is frozen leaves its optimizer with no gradients, and
    ``GradScaler.step`` then fails with ``AssertionError: No inf checks were recorded
    for this optimizer``. This subclass treats such an optimizer as having nothing to
    do: :meth:`unscale_` and :meth:`step` skip it (a step without gradients updates
    nothing anyway), and :meth:`update` keeps the scale unchanged when no optimizer had
    gradients at all, since no gradient was checked for infs. Every other step is
    exactly ``GradScaler``'s.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> backbone, head = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (backbone, head)]
        >>> scaler = FreezeAwareGradScaler("cpu")
        >>> backbone.requires_grad_(False)  # frozen for this step
        Linear(in_features=2, out_features=2, bias=True)
        >>> scaler.scale(head(backbone(torch.ones(1, 2))).sum()).backward()
        >>> [scaler.step(opt) for opt in opts]  # plain GradScaler raises here
        [None, None]
        >>> scaler.update()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checked_since_update = False

    @override
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Like ``GradScaler.unscale_``; does nothing for an optimizer with no gradients."""
        if self.is_enabled() and not has_grads(optimizer):
            return
        self._checked_since_update = True
        super().unscale_(optimizer)

    @override
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> float | None:
        """Like ``GradScaler.step``; skips (returns ``None``) an optimizer with no gradients."""
        if self.is_enabled() and not has_grads(optimizer):
            return None
        self._checked_since_update = True
        return super().step(optimizer, *args, **kwargs)

    @override
    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Like ``GradScaler.update``; keeps the scale if no optimizer had gradients."""
        checked, self._checked_since_update = self._checked_since_update, False
        if self.is_enabled() and new_scale is None and not checked:
            return
        super().update(new_scale)
