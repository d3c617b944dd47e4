"""What to freeze: modules, dotted names, and groups of them, one entry per stage.

A *target spec* is a module, a dotted name (resolved against a root module), or a
sequence with one entry per stage, each entry a module, a name, or a group (a sequence of
modules and names frozen together). A binary schedule applies its one decision to every
stage; a per-stage schedule needs exactly one entry per stage.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TypeAlias

from torch import nn

from freezesched._validation import describe

__all__ = ["Member", "StageSpec", "TargetSpec", "parse_stages", "resolve_stages"]

Member: TypeAlias = nn.Module | str
StageSpec: TypeAlias = Member | Sequence[Member]
TargetSpec: TypeAlias = Member | Sequence[StageSpec]


def _member(value: object, where: str) -> Member:
    if isinstance(value, nn.Module | str):
        return value
    raise TypeError(f"{where} must be an nn.Module or a dotted module name, got {describe(value)}")


def parse_stages(spec: object, name: str = "modules") -> tuple[tuple[Member, ...], ...]:
    """Normalize a target spec to stages, each a tuple of members; nothing is resolved.

    Raises:
        TypeError: an entry is neither a module, a name, nor a sequence of them.
        ValueError: the spec or a group is empty.

    Examples:
        >>> parse_stages("backbone")
        (('backbone',),)
        >>> parse_stages([["conv1", "bn1"], "layer1"])
        (('conv1', 'bn1'), ('layer1',))
    """
    if isinstance(spec, nn.Module | str):
        return ((spec,),)
    if not isinstance(spec, Sequence) or not spec:
        raise TypeError(
            f"{name} must be a module, a dotted name, or a non-empty sequence with one "
            f"entry per stage (a module, a name, or a list of them), got {describe(spec)}"
        )
    stages: list[tuple[Member, ...]] = []
    for i, entry in enumerate(spec):
        if isinstance(entry, nn.Module | str):
            stages.append((entry,))
        elif isinstance(entry, Sequence) and entry:
            stages.append(tuple(_member(m, f"{name}[{i}][{j}]") for j, m in enumerate(entry)))
        else:
            raise TypeError(
                f"{name}[{i}] must be a module, a dotted name, or a non-empty list of them "
                f"(a group frozen together), got {describe(entry)}"
            )
    return tuple(stages)


def resolve(root: nn.Module | None, member: Member, where: str) -> nn.Module:
    """The module a member stands for: itself, or ``root.get_submodule(name)``.

    Raises:
        ValueError: a name without a root, or a name the root does not have.
    """
    if isinstance(member, nn.Module):
        return member
    if root is None:
        raise ValueError(
            f"{where} is the name {member!r}, which needs a model to be looked up in; pass "
            "the model (guard(model, tick)) or the module itself"
        )
    try:
        return root.get_submodule(member)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(member, names, n=3)
        hint = f"; did you mean {close}?" if close else f"; some it has: {names[:8]}"
        raise ValueError(
            f"{where} must name a submodule of the {type(root).__name__}; it has none "
            f"called {member!r}{hint}"
        ) from None


def resolve_stages(
    stages: tuple[tuple[Member, ...], ...], root: nn.Module | None, name: str = "modules"
) -> tuple[tuple[nn.Module, ...], ...]:
    """Resolve every member; the same module twice is an error naming both places.

    Raises:
        ValueError: an unknown name, or one module given twice.
    """
    seen: dict[int, str] = {}
    out: list[tuple[nn.Module, ...]] = []
    for i, stage in enumerate(stages):
        modules = []
        for j, member in enumerate(stage):
            where = f"{name}[{i}]" if len(stage) == 1 else f"{name}[{i}][{j}]"
            module = resolve(root, member, where)
            label = f"{where} ({member!r})" if isinstance(member, str) else where
            if id(module) in seen:
                raise ValueError(
                    f"{name} must name each module once; {seen[id(module)]} and {label} are "
                    "the same module"
                )
            seen[id(module)] = label
            modules.append(module)
        out.append(tuple(modules))
    return tuple(out)
