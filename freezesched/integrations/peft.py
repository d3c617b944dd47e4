"""Freezing that composes with ``peft``: LoRA and the other tuners, on a frozen base model.

``peft`` (``get_peft_model`` / ``inject_adapter_in_model``) sets ``requires_grad=False``
on every weight of the base model and wraps each adapted layer in a tuner layer that
holds the base layer *and* the adapters. freezesched adds what ``peft`` does not do: the
base model's BatchNorm statistics and every other buffer stay bitwise unchanged, dropout
follows the policy, and a schedule decides when the adapters, or blocks of the base made
trainable, train. :class:`PeftAdapters` is the trainable exception that keeps the
adapters trainable inside a frozen module, without a pattern::

    from peft import LoraConfig, get_peft_model
    from freezesched import FrozenStageGuard, Constant
    from freezesched.integrations.peft import PeftAdapters

    model = get_peft_model(backbone, LoraConfig(r=8, target_modules=["qkv"]))
    guard = FrozenStageGuard(Constant(True), trainable=[PeftAdapters()])
    with guard(model, step):   # base frozen bitwise, BN pinned; LoRA trains
        loss = criterion(model(x), y)
        loss.backward()

freezesched never sets ``requires_grad=True`` on a weight it did not freeze: releasing a
freeze gives every parameter back the flag it had, so the base weights ``peft`` froze
stay frozen whatever a schedule says, and the controller (and every callback built on
it) refuses a schedule that would leave such a module "trainable" with nothing to train.
To train blocks of the base on a schedule, make them trainable first
(:func:`make_trainable`). Install with ``pip install freezesched[peft]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from freezesched._validation import describe
from freezesched.freezing import TrainableRule

__all__ = ["PeftAdapters", "adapter_names", "make_trainable"]

#: Modules that hold adapters, each naming its adapter containers in ``adapter_layer_names``.
_HOLDERS = (BaseTunerLayer, AuxiliaryTrainingWrapper)


def _is_adapter(name: str, parent: nn.Module) -> bool:
    attribute = name.rsplit(".", 1)[-1]
    return isinstance(parent, _HOLDERS) and attribute in parent.adapter_layer_names


@dataclass(frozen=True)
class PeftAdapters(TrainableRule):
    """The adapters ``peft`` trains, as a trainable exception: ``trainable=[PeftAdapters()]``.

    Matches, inside a frozen module, every adapter container of a ``peft`` tuner layer
    (the names in its ``adapter_layer_names``: LoRA's ``lora_A``, ``lora_B``,
    ``lora_embedding_A/B`` and DoRA's ``lora_magnitude_vector``; IA³'s ``ia3_l``; LoHa,
    LoKr, OFT, ... alike) and the trainable copies of ``modules_to_save``
    (``ModulesToSaveWrapper.modules_to_save``); so the base layer a LoRA layer wraps is
    frozen while its adapters are not. Exempt adapters keep the ``requires_grad`` peft
    gave them (an inactive adapter stays frozen). Prompt-learning methods (prefix, prompt
    tuning) keep their trainable tensors outside the model's layers and are not
    recognised: give their module (``prompt_encoder``) by name.

    Examples:
        >>> import torch
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> from freezesched import freeze
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), model)
        >>> with freeze(model, trainable=[PeftAdapters()]):
        ...     sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['0.lora_A.default.weight', '0.lora_B.default.weight']
    """

    tree_only = True  # names and peft's class attributes only

    def matches(self, name: str, module: nn.Module, parent: nn.Module) -> bool:
        """Whether ``module`` is an adapter container of the ``peft`` layer ``parent``."""
        return _is_adapter(name, parent)


def adapter_names(model: nn.Module) -> list[str]:
    """Dotted names of every adapter container of the ``peft`` tuner layers in ``model``.

    In module order. The trainable copies of ``modules_to_save`` (a classifier, usually)
    are not adapters and are not listed. With these names the adapters themselves can be
    scheduled, as one group (frozen together) for a guard or one stage per name for the
    controller, e.g. to warm up the adapters with the base frozen before unfreezing
    blocks of the base::

        FreezeController(model, {tuple(adapter_names(model)): UnfreezeAt(0)})

    Raises:
        ValueError: ``model`` has no ``peft`` adapter.

    Examples:
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"]), model)
        >>> adapter_names(model)  # doctest: +NORMALIZE_WHITESPACE
        ['0.lora_A', '0.lora_B', '0.lora_embedding_A', '0.lora_embedding_B',
         '0.lora_magnitude_vector', '2.lora_A', '2.lora_B', '2.lora_embedding_A',
         '2.lora_embedding_B', '2.lora_magnitude_vector']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {describe(model)}")
    names = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, BaseTunerLayer):
            continue
        for attribute in parent.adapter_layer_names:
            if isinstance(parent._modules.get(attribute), nn.Module):
                names.append(f"{parent_name}.{attribute}" if parent_name else attribute)
    if not names:
        raise ValueError(
            f"model must contain peft adapters (tuner layers from get_peft_model or "
            f"inject_adapter_in_model); this {type(model).__name__} has none"
        )
    return names


def make_trainable(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Make the named submodules of a ``peft`` model trainable, for a schedule to freeze.

    ``peft`` freezes every weight of the base model, and freezesched never re-enables
    what it did not freeze; so to train blocks of the base on a schedule (warm up the
    adapters, then unfreeze the top blocks every ρ ticks), make those blocks trainable
    once, give them to the optimizer, and let the schedule freeze them. Everything under
    each name gets ``requires_grad=True`` except the original modules that
    ``modules_to_save`` replaced (never used in the forward) and adapters of inactive
    ``peft`` adapters, whose flags are left alone.

    Args:
        model: The ``peft`` model (or any model containing ``peft`` layers).
        names: Dotted names of the submodules, relative to ``model``.

    Returns:
        The names of the parameters it switched on, in module order.

    Raises:
        TypeError: ``names`` is not a name or a sequence of names.
        ValueError: a name ``model`` does not have.

    Examples:
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"]), model)
        >>> make_trainable(model, ["2"])
        ['2.base_layer.weight', '2.base_layer.bias']
    """
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a dotted name or a sequence of them, got {describe(names)}")
    modules = []
    for i, name in enumerate(names):
        try:
            modules.append((name, model.get_submodule(name)))
        except AttributeError:
            raise ValueError(
                f"names[{i}] must name a submodule of the {type(model).__name__}; it has none "
                f"called {name!r}"
            ) from None
    switched: list[str] = []
    for name, module in modules:
        for qualified, param in _base_parameters(module, name):
            if not param.requires_grad:
                param.requires_grad_(True)
                switched.append(qualified)
    return switched


def _base_parameters(module: nn.Module, prefix: str) -> Iterable[tuple[str, nn.Parameter]]:
    """Parameters of ``module`` that the base model's forward uses.

    Replaced originals (``modules_to_save``) and adapters (which keep the flag ``peft``
    gave them) are left out.
    """
    skip: list[str] = []
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, AuxiliaryTrainingWrapper):
            skip += [f"{name}.original_module", f"{name}.modules_to_save"]
        if isinstance(sub, _HOLDERS):
            skip += [f"{name}.{a}" for a in (*sub.adapter_layer_names, *sub.other_param_names)]
    for name, param in module.named_parameters(prefix=prefix):
        if not any(name == s or name.startswith(s + ".") for s in skip):
            yield name, param
