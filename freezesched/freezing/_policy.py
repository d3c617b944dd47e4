"""FreezePolicy: the one description of *how* to freeze, shared by every API.

The guard, the controller, :func:`~freezesched.freeze` and every integration take a
``policy=``; their keyword shortcuts (``bn=``, ``dropout=``, ``trainable=``,
``on_unfreeze=``) only build or adjust one, through :func:`resolve_policy`, so the rules
are validated in exactly one place.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from freezesched._validation import check_choice, describe
from freezesched.freezing._fast import FastFrozen
from freezesched.freezing._features import FeatureCache
from freezesched.freezing._optim import LRRamp

__all__ = [
    "FreezePolicy",
    "ModePolicy",
    "OptimizerPolicy",
    "TrainableRule",
    "TrainableSpec",
    "resolve_policy",
]

ModePolicy = Literal["eval", "train"]
OptimizerPolicy = Literal["keep", "reset"]


class TrainableRule(abc.ABC):
    """A trainable exception decided by code: for modules a name or a type cannot single out.

    A rule is asked about every submodule of a frozen module (not about the frozen module
    itself, which has no parent) while the freeze is planned; a submodule it matches stays
    trainable with its whole subtree, exactly like one matched by a pattern or a type. A
    ready-made rule recognises the adapters of ``peft``
    (:class:`freezesched.integrations.peft.PeftAdapters`): a LoRA layer wraps the base layer
    it adapts, so neither its type nor a name tells the adapter apart from the base weight.

    Subclasses implement :meth:`matches`; give them a readable ``repr`` (a dataclass does),
    since errors quote it. Like every ``trainable`` entry, a rule must match something.
    A guard reuses its plan of a module tree while the tree is unchanged; a rule whose
    answer depends on anything else (a flag it reads, an active-adapter setting) would
    be asked too rarely, so a guard plans afresh every step for a policy holding a rule,
    unless the rule sets :attr:`tree_only`.

    Attributes:
        tree_only: ``True`` promises that :meth:`matches` depends only on the names,
            types and class attributes of the modules, and their place in the tree;
            ``False`` (the default) is always correct, but slower.

    Examples:
        >>> class SecondChild(TrainableRule):
        ...     def matches(self, name, module, parent):
        ...         return isinstance(parent, nn.Sequential) and parent[1] is module
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> from freezesched import freeze
        >>> with freeze(model, trainable=[SecondChild()]):
        ...     model[0].weight.requires_grad, model[1].weight.requires_grad
        (False, True)
    """

    tree_only: ClassVar[bool] = False

    @abc.abstractmethod
    def matches(self, name: str, module: nn.Module, parent: nn.Module) -> bool:
        """Whether ``module`` stays trainable, with everything below it.

        Args:
            name: Its qualified name relative to the frozen module.
            module: The submodule.
            parent: The module it is a child of.
        """


TrainableSpec = str | type[nn.Module] | TrainableRule

_MODES = ("eval", "train")
_OPTIMIZER_POLICIES = ("keep", "reset")


@dataclass(frozen=True)
class FreezePolicy:
    """How a frozen module behaves; one immutable object accepted by every API.

    Args:
        bn: ``"eval"`` (default) runs BatchNorm/InstanceNorm layers of a frozen module in
            eval mode during each of their forward calls, so their running statistics stay
            bitwise unchanged whatever ``model.train()`` or a framework does meanwhile;
            ``"train"`` leaves their mode alone, so the statistics keep updating.
        dropout: ``"eval"`` (default) does the same for dropout-like layers
            (``nn.Dropout*``, ``nn.RReLU``, torchvision's ``StochasticDepth``, timm's
            ``DropPath``) and
            for modules that draw dropout functionally, gated by their own ``training``
            flag (``nn.MultiheadAttention``, ``nn.LSTM``; timm and Hugging Face attention
            cells, recognised by a dropout child or a positive rate attribute named
            ``*drop*``): a frozen module is a deterministic feature extractor.
            ``"train"`` leaves them alone (frozen features with dropout noise).
        trainable: Exceptions that stay trainable inside a frozen module: glob patterns
            (:func:`fnmatch.fnmatchcase`, ``*`` also matches dots) on qualified names
            relative to the frozen module, and module types. A pattern matching a
            submodule's name, or a type matching it, exempts that whole submodule
            (parameters, buffers and mode); a pattern matching a parameter's name exempts
            that parameter. A :class:`TrainableRule` decides in code (the adapters of a
            ``peft`` model: :class:`freezesched.integrations.peft.PeftAdapters`). Exempt
            parameters keep their own ``requires_grad``. Each entry must match something.
        on_unfreeze: What the controller does with the optimizer state (momentum, Adam
            moments) of parameters when they unfreeze: ``"reset"`` (default) drops it,
            so a parameter resumes as if new to the optimizer; ``"keep"`` reuses the
            state from before the frozen phase (what the official DBF code does).
        unfreeze_lr: An :class:`LRRamp`: after an unfreeze, the controller starts the
            module's learning rate at a fraction of the optimizer's and ramps it back
            (the usual recipe of Lightning's ``BackboneFinetuning``); ``None`` (default)
            leaves learning rates alone.
        fast: A :class:`~freezesched.freezing.FastFrozen`: run each frozen module as a
            cheaper, checked twin (BatchNorm folded, channels-last, low precision,
            compiled, a per-sample feature cache; see ``docs/fast.md``). ``None``
            (default) runs frozen modules plainly. It needs ``bn="eval"``,
            ``dropout="eval"`` and no ``trainable`` exceptions.

    Raises:
        ValueError: an unknown mode or optimizer policy, or ``fast`` combined with
            ``bn="train"``, ``dropout="train"`` or ``trainable`` exceptions.
        TypeError: ``trainable`` is not a sequence of patterns, module types and rules,
            or ``fast`` is not a ``FastFrozen``.

    Examples:
        >>> FreezePolicy(bn="train", trainable=("*adapter*", nn.LayerNorm)).bn
        'train'
        >>> FreezePolicy().replace(on_unfreeze="keep").on_unfreeze
        'keep'
        >>> from freezesched.freezing import FastFrozen
        >>> FreezePolicy(fast=FastFrozen(channels_last=True)).fast.fold_bn
        True
    """

    bn: ModePolicy = "eval"
    dropout: ModePolicy = "eval"
    trainable: tuple[TrainableSpec, ...] = ()
    on_unfreeze: OptimizerPolicy = "reset"
    unfreeze_lr: LRRamp | None = None
    fast: FastFrozen | None = None

    def __post_init__(self) -> None:
        if self.unfreeze_lr is not None and not isinstance(self.unfreeze_lr, LRRamp):
            raise TypeError(
                f"unfreeze_lr must be an LRRamp or None, got {describe(self.unfreeze_lr)}"
            )
        check_choice(self.bn, "bn", _MODES)
        check_choice(self.dropout, "dropout", _MODES)
        check_choice(self.on_unfreeze, "on_unfreeze", _OPTIMIZER_POLICIES)
        given: object = self.trainable
        if isinstance(given, str | type) or not isinstance(given, Iterable):
            raise TypeError(
                "trainable must be a sequence of name patterns, module types and "
                f"TrainableRule objects, got {describe(given)}"
            )
        specs = tuple(given)
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                if not spec:
                    raise ValueError(f"trainable[{i}] must be a non-empty pattern, got ''")
                continue
            if isinstance(spec, TrainableRule):
                continue
            if not (isinstance(spec, type) and issubclass(spec, nn.Module)):
                hint = (
                    " (a TrainableRule class: pass an instance, e.g. PeftAdapters())"
                    if isinstance(spec, type) and issubclass(spec, TrainableRule)
                    else ""
                )
                raise TypeError(
                    f"trainable[{i}] must be a name pattern (str), an nn.Module subclass or a "
                    f"TrainableRule, got {describe(spec)}{hint}"
                )
        object.__setattr__(self, "trainable", specs)
        self._check_fast()

    def _check_fast(self) -> None:
        fast = self.fast
        if fast is None:
            return
        if not isinstance(fast, FastFrozen):
            raise TypeError(f"fast must be a FastFrozen or None, got {describe(fast)}")
        # A twin is a copy: it can only stand in for a module that computes a fixed
        # function and owns no trainable parameter.
        if self.bn != "eval":
            raise ValueError(
                "fast needs bn='eval': a fast twin computes with fixed BatchNorm statistics "
                f"(and folds them into the convolutions), got bn={self.bn!r}. Use bn='eval', "
                "or leave fast out"
            )
        if self.dropout != "eval":
            raise ValueError(
                "fast needs dropout='eval': a fast twin is a fixed function, and dropout noise "
                f"in it would differ from the module's, got dropout={self.dropout!r}"
            )
        if self.trainable:
            raise ValueError(
                "fast cannot keep trainable exceptions inside a frozen module: a fast twin is "
                "a copy, so their gradients would not reach the originals; got "
                f"trainable={self.trainable!r}. Freeze the frozen part by name instead "
                "(modules=[...]), or leave fast out"
            )

    def replace(self, **changes: Any) -> FreezePolicy:
        """A copy with some fields changed (validated like a new policy)."""
        return dataclasses.replace(self, **changes)


def resolve_policy(
    policy: FreezePolicy | Mapping[str, Any] | None = None, **shortcuts: Any
) -> FreezePolicy:
    """``policy`` (default: ``FreezePolicy()``) with the given shortcuts replacing fields.

    Shortcuts whose value is ``None`` are not given. This is how every API turns its
    ``policy=`` and keyword shortcuts into one validated policy. A plain dict (from a
    config file) is read as the policy's fields, ``unfreeze_lr`` as an ``LRRamp``'s and
    ``fast`` as a ``FastFrozen``'s (its ``cache`` as a ``FeatureCache``'s; ``fast=True`` is
    ``FastFrozen()``).

    Raises:
        TypeError: ``policy`` is not a :class:`FreezePolicy` or a mapping, or a field is
            unknown.

    Examples:
        >>> resolve_policy(None, bn="train", dropout=None).bn
        'train'
        >>> resolve_policy({"on_unfreeze": "keep", "unfreeze_lr": {"start": 0.5}}).unfreeze_lr
        LRRamp(start=0.5, ticks=5)
        >>> resolve_policy({"fast": {"channels_last": True}}).fast.channels_last
        True
    """
    known = {f.name for f in dataclasses.fields(FreezePolicy)}
    if policy is None:
        policy = FreezePolicy()
    elif isinstance(policy, Mapping):
        unknown = sorted(set(policy) - known)
        if unknown:
            raise TypeError(f"policy has unknown fields {unknown}; known: {sorted(known)}")
        fields = dict(policy)
        if isinstance(fields.get("unfreeze_lr"), Mapping):
            fields["unfreeze_lr"] = LRRamp(**fields["unfreeze_lr"])
        if "trainable" in fields and isinstance(fields["trainable"], list):
            fields["trainable"] = tuple(fields["trainable"])
        if "fast" in fields:
            fields["fast"] = _fast_from_config(fields["fast"])
        policy = FreezePolicy(**fields)
    elif not isinstance(policy, FreezePolicy):
        raise TypeError(f"policy must be a FreezePolicy, a dict or None, got {describe(policy)}")
    unknown = sorted(set(shortcuts) - known)
    if unknown:
        raise TypeError(f"unknown policy fields {unknown}; known: {sorted(known)}")
    changes = {k: v for k, v in shortcuts.items() if v is not None}
    if "fast" in changes:
        changes["fast"] = _fast_from_config(changes["fast"])
    return policy.replace(**changes) if changes else policy


def _fast_from_config(value: object) -> object:
    """``fast`` from a config: a mapping of ``FastFrozen`` fields, ``True`` or ``False``."""
    if value is True:
        return FastFrozen()
    if value is False:
        return None
    if isinstance(value, Mapping):
        fields = dict(value)
        if isinstance(fields.get("cache"), Mapping):
            fields["cache"] = FeatureCache(**fields["cache"])
        known = {f.name for f in dataclasses.fields(FastFrozen)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"fast has unknown fields {unknown}; known: {sorted(known)}")
        return FastFrozen(**fields)
    return value
