"""timm backbones: their block structure, by name, as stages for layer-wise schedules.

timm models work with freezesched as they are (their ``set_grad_checkpointing``,
``features_only`` wrappers, ``DropPath`` and layer-decay parameter groups included; see
the tests). What timm adds is a description of each model's block structure,
``model.group_matcher()``, the same one its layer-wise learning-rate decay uses. With
:func:`timm_stages` a :class:`~freezesched.Layerwise` schedule addresses those blocks
without listing modules::

    import timm
    from freezesched import FrozenStageGuard, Layerwise
    from freezesched.integrations.timm import timm_stages

    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    stages = timm_stages(model)  # [("blocks.0",), ..., ("blocks.11", "norm")]
    guard = FrozenStageGuard(Layerwise.progressive(len(stages), 0, 30), modules=stages)

Install with ``pip install freezesched[timm]``.
"""

from __future__ import annotations

import re
from collections import defaultdict

from timm.models import group_parameters
from torch import nn

from freezesched._validation import describe

__all__ = ["timm_stages"]


def _timm_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The first module (in module order) with timm's ``group_matcher``, and its name."""
    for name, module in model.named_modules():
        if callable(getattr(type(module), "group_matcher", None)):
            return name, module
    raise ValueError(
        f"model must be (or contain) a timm model, which describes its blocks with "
        f"group_matcher(); this {type(model).__name__} has no module that does"
    )


def _owned(module: nn.Module, prefix: str, group_of: dict[str, int]) -> dict[int, list[str]]:
    """The largest submodules whose parameters all fall in one group, by group.

    Submodules without parameters are covered by their parent's group when the parent is
    wholly in one; otherwise they belong to no group.
    """
    out: dict[int, list[str]] = defaultdict(list)
    stack = [(prefix, module)]
    while stack:
        name, sub = stack.pop()
        groups = {group_of[f"{name}.{p}" if name else p] for p, _ in sub.named_parameters()}
        if len(groups) == 1 and name:
            out[groups.pop()].append(name)
            continue
        children = [(f"{name}.{k}" if name else k, m) for k, m in sub._modules.items() if m]
        stack.extend(reversed(children))
    return out


def timm_stages(model: nn.Module, *, stem: bool = False) -> list[tuple[str, ...]]:
    """The blocks of a timm model as stages, front first, from timm's ``group_matcher``.

    Each stage is one of timm's coarse block groups (ViT ``blocks.0`` .. ``blocks.11``,
    the final ``norm`` joining the last; Swin ``layers.0`` .. ``layers.3``; ResNet
    ``layer1`` .. ``layer4``; ConvNeXt ``stages.0`` .. ``stages.3``), given as the
    largest submodules that lie wholly in it, so the blocks' dropout and ``DropPath``
    layers are part of their stage. The head (what timm leaves ungrouped) is never a
    stage. Names are relative to ``model``: a timm model inside a wrapper (a ``peft``
    model, a task model's ``backbone``) is found and its names prefixed.

    Args:
        model: A timm model, or a module containing one.
        stem: Also return timm's stem group (patch embedding, first convolution) as the
            first stage.

    Returns:
        One tuple of dotted module names per stage, for ``FrozenStageGuard(modules=...)``,
        ``freeze(model, ...)`` or the key of a ``FreezeController`` schedule.

    Raises:
        ValueError: ``model`` contains no timm model; or ``stem=True`` and the stem has
            trainable parameters that belong to the model itself (ViT's ``cls_token``
            and ``pos_embed``), which no module name can freeze.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=3)
        >>> timm_stages(vit)
        [('blocks.0',), ('blocks.1',), ('blocks.2', 'norm')]
        >>> swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1))
        >>> timm_stages(swin, stem=True)
        [('patch_embed',), ('layers.0',), ('layers.1',), ('layers.2',), ('layers.3',)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {describe(model)}")
    prefix, inner = _timm_model(model)
    matcher = inner.group_matcher(coarse=True)  # type: ignore[operator]
    group_of: dict[str, int] = group_parameters(inner, matcher, reverse=True)
    # Unmatched parameters (the head) are mapped by timm to the last, largest ordinal.
    head = max(group_of.values()) if _ungrouped(inner, matcher) else None
    owned = _owned(inner, "", group_of)
    ids = sorted(g for g in owned if g != head)
    if not stem and ids:
        stem_id = _stem_group(inner, group_of, matcher)
        ids = [g for g in ids if g != stem_id]
    elif ids:
        stem_id = _stem_group(inner, group_of, matcher)
        loose = [
            name
            for name, p in inner.named_parameters(recurse=False)
            if group_of.get(name) == stem_id and p.requires_grad
        ]
        if loose:
            raise ValueError(
                f"stem=True needs a stem that module names can freeze; the stem of this "
                f"{type(inner).__name__} includes its own trainable parameters {loose}. "
                "Freeze them for the run (model.pos_embed.requires_grad_(False), ...) or "
                "leave stem=False"
            )
    full = f"{prefix}." if prefix else ""
    return [tuple(full + name for name in owned[g]) for g in ids]


def _ungrouped(inner: nn.Module, matcher: object) -> bool:
    """Whether some parameter matches none of the matcher's groups (timm: the head)."""
    if not isinstance(matcher, dict):
        return False
    patterns: list[str] = []
    for spec in matcher.values():
        if spec is None:
            continue
        if isinstance(spec, list | tuple):
            patterns += [s[0] for s in spec]
        else:
            patterns.append(spec)
    compiled = [re.compile(p) for p in patterns]
    return any(not any(c.match(n) for c in compiled) for n, _ in inner.named_parameters())


def _stem_group(inner: nn.Module, group_of: dict[str, int], matcher: object) -> int | None:
    """The group id of timm's ``stem`` entry (the first key of a dict matcher), if any."""
    if not isinstance(matcher, dict) or "stem" not in matcher:
        return None
    pattern = re.compile(matcher["stem"])
    ids = {g for n, g in group_of.items() if pattern.match(n)}
    return min(ids) if ids else None
