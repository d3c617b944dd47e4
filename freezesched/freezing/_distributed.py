"""The one check that a distributed wrapper is configured so that freezing cannot break it.

``DistributedDataParallel`` all-reduces the gradients of the parameters it manages, which
are those that required grad when it was built. With ``find_unused_parameters=False`` (or
``static_graph=True``) it expects every one of them to get a gradient every step, so a
parameter frozen *after* wrapping makes it fail (``Expected to have finished reduction in
the prior iteration``) one step after the first frozen one, after the ranks already
diverged. Freezing before wrapping and never unfreezing is fine: DDP leaves such
parameters out. Every API that freezes (the controller, the integrations, and the
guard, through the forward hook that sees the wrapper being called) asks here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["check_ddp_call", "check_ddp_settings", "managed_parameters", "unwrap"]

DDP_RECIPE = (
    "Either build DistributedDataParallel(..., find_unused_parameters=True, "
    "static_graph=False), or, if the frozen part stays frozen for the whole run, freeze it "
    "before wrapping (DDP then leaves it out of its buckets)"
)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel``, else ``model``."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def check_ddp_settings(
    find_unused_parameters: bool | None,
    static_graph: bool,
    *,
    where: str,
    fix: str = DDP_RECIPE,
) -> None:
    """Raise ``ValueError`` if DDP with these settings breaks once a parameter freezes.

    Args:
        find_unused_parameters: The wrapper's setting (``None``: unknown, left alone).
        static_graph: The wrapper's setting.
        where: What was checked, for the message (e.g. ``"runner.model"``).
        fix: What to do instead, in the words of the framework at hand.

    Raises:
        ValueError: ``find_unused_parameters`` is ``False`` or ``static_graph`` is true.

    Examples:
        >>> check_ddp_settings(True, False, where="model")
        >>> check_ddp_settings(False, False, where="model", fix="Use X.")
        Traceback (most recent call last):
        ...
        ValueError: model is DistributedDataParallel with find_unused_parameters=False and ...
    """
    if find_unused_parameters is False or static_graph:
        raise ValueError(
            f"{where} is DistributedDataParallel with find_unused_parameters="
            f"{find_unused_parameters} and static_graph={static_graph}: it expects a gradient "
            "for every parameter it manages at every step, so freezing one of them after "
            "wrapping makes the ranks' gradients go out of sync and DDP fail at the next step "
            f"('Expected to have finished reduction in the prior iteration'). {fix}"
        )


_MANAGED: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()


def managed_parameters(ddp: nn.parallel.DistributedDataParallel) -> list[torch.Tensor]:
    """The parameters whose gradients ``ddp`` all-reduces (those trainable when it was built).

    Read from the reducer's buckets once per wrapper; where that is unavailable, every
    parameter of the module is assumed managed (so a doubt leads to a refusal, not a hang).
    """
    cached = _MANAGED.get(ddp)
    if cached is not None:
        return cached
    reducer = getattr(ddp, "reducer", None)
    buckets = getattr(reducer, "_get_zeros_like_grad_buckets", None)
    try:
        params = [p for bucket in buckets() for p in bucket.parameters()] if buckets else None
    except (RuntimeError, AttributeError, TypeError):
        params = None
    if params is None:
        params = list(ddp.module.parameters())
    _MANAGED[ddp] = params
    return params


def check_ddp_call(module: nn.Module, is_frozen: Callable[[torch.Tensor], bool]) -> None:
    """At a forward call of ``module``: refuse a DDP wrapper that manages a frozen parameter.

    Called by the mechanism for every module call while a freeze is active; cheap for
    everything that is not a DDP wrapper.

    Raises:
        ValueError: ``module`` is a DDP with ``find_unused_parameters=False`` or
            ``static_graph=True`` and one of the parameters it manages is frozen now.
    """
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        return
    if module.find_unused_parameters and not getattr(module, "static_graph", False):
        return
    frozen = [p for p in managed_parameters(module) if is_frozen(p)]
    if frozen:
        check_ddp_settings(
            module.find_unused_parameters,
            bool(getattr(module, "static_graph", False)),
            where=f"the model being called ({len(frozen)} of its parameters are frozen now)",
        )
