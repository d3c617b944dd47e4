"""Plain-dict configs: the registry of schedule types and ``schedule_from_config``.

The registry holds freezesched's own schedules under their class names, plus the compact
recipes ``"Layerwise.progressive"`` and ``"Layerwise.gradual_unfreeze"``. A user's own
schedule class joins it only through :func:`register_schedule`, and never under a name
freezesched uses: a class that happens to be called ``Step`` cannot take over configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from freezesched._validation import describe
from freezesched.schedules._adaptive import GradientFreeze, Plateau
from freezesched.schedules._base import And, Not, Or, Schedule, init_fields
from freezesched.schedules._basic import Constant, Cosine, Step, UnfreezeAt, WarmupThenFreeze
from freezesched.schedules._combinators import Sequential
from freezesched.schedules._layerwise import Layerwise

__all__ = ["register_schedule", "schedule_from_config"]

S = TypeVar("S", bound=type[Schedule])

#: Config name -> (a builder taking the config's keyword arguments, the keys it accepts).
_Builder = tuple[Callable[..., Schedule], tuple[str, ...]]


def _class_entry(cls: type[Schedule]) -> _Builder:
    def build(**kwargs: Any) -> Schedule:
        return cls._from_config_kwargs(kwargs)

    return build, init_fields(cls)


_BUILTIN: dict[str, _Builder] = {
    cls.__name__: _class_entry(cls)
    for cls in (
        Constant,
        Step,
        WarmupThenFreeze,
        UnfreezeAt,
        Cosine,
        Sequential,
        And,
        Or,
        Not,
        Layerwise,
        Plateau,
        GradientFreeze,
    )
}
_BUILTIN["And"] = (_BUILTIN["And"][0], ("schedules",))
_BUILTIN["Or"] = (_BUILTIN["Or"][0], ("schedules",))
_BUILTIN["Layerwise.progressive"] = (
    Layerwise.progressive,
    ("num_stages", "first", "last", "spacing"),
)
_BUILTIN["Layerwise.gradual_unfreeze"] = (
    Layerwise.gradual_unfreeze,
    ("num_stages", "begin", "every"),
)
_USER: dict[str, tuple[type[Schedule], _Builder]] = {}


def register_schedule(cls: S, *, name: str | None = None) -> S:
    """Make a schedule class of your own buildable by :func:`schedule_from_config`.

    Usable as a decorator. The class must be a :class:`Schedule` dataclass; its config
    keys are its constructor fields.

    Args:
        cls: The schedule class.
        name: The config ``"type"``; defaults to the class name.

    Returns:
        ``cls``, unchanged.

    Raises:
        TypeError: ``cls`` is not a ``Schedule`` subclass.
        ValueError: the name is one of freezesched's own, or taken by another class.

    Examples:
        >>> from dataclasses import dataclass
        >>> from freezesched.schedules import BinarySchedule, schedule_from_config
        >>> @register_schedule
        ... @dataclass(frozen=True)
        ... class Never(BinarySchedule):
        ...     def _frozen_at(self, ticks):
        ...         return ticks < 0
        >>> schedule_from_config({"type": "Never"})
        Never()
    """
    if not (isinstance(cls, type) and issubclass(cls, Schedule)):
        raise TypeError(f"cls must be a Schedule subclass, got {describe(cls)}")
    key = cls.__name__ if name is None else name
    if not isinstance(key, str) or not key:
        raise TypeError(f"name must be a non-empty str, got {describe(key)}")
    if key in _BUILTIN:
        raise ValueError(f"name must not be one of freezesched's own schedule names, got {key!r}")
    if key in _USER and _USER[key][0] is not cls:
        raise ValueError(f"name {key!r} is already registered for {_USER[key][0]!r}")
    _USER[key] = (cls, _class_entry(cls))
    return cls


def _from_config_value(value: Any) -> Any:
    if isinstance(value, Mapping) and "type" in value:
        return schedule_from_config(value)
    if isinstance(value, list | tuple):
        return tuple(_from_config_value(v) for v in value)
    if isinstance(value, str) and value in ("inf", "+inf", "Infinity"):
        # JSON has no infinity literal; configs written by hand or by a CLI use a string.
        return math.inf
    return value


def schedule_from_config(config: Mapping[str, Any] | Schedule) -> Schedule:
    """Build a schedule from the plain dict that :meth:`Schedule.to_config` returns.

    Nested schedules are dicts with a ``"type"`` key; lists become tuples; the string
    ``"inf"`` stands for ``math.inf`` (JSON has no infinity). A :class:`Schedule` is
    returned unchanged, so configs may also hold ready-made schedules. Besides the class
    names, ``"Layerwise.progressive"`` and ``"Layerwise.gradual_unfreeze"`` take those
    recipes' arguments.

    Args:
        config: A mapping with a ``"type"`` key naming a schedule, plus its arguments.

    Returns:
        The schedule.

    Raises:
        TypeError: ``config`` is not a mapping or a schedule.
        ValueError: the type is unknown, or the keys do not fit that type.

    Examples:
        >>> schedule_from_config({"type": "Step", "rho": "inf"})
        Step(rho=inf)
        >>> schedule_from_config({"type": "Layerwise.progressive", "num_stages": 3,
        ...                       "first": 0, "last": 4})(2)
        (True, True, False)
    """
    if isinstance(config, Schedule):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping with a 'type' key, got {describe(config)}")
    if "type" not in config:
        raise ValueError(f"config must have a 'type' key naming a schedule, got {dict(config)!r}")
    name = config["type"]
    entry = None
    if isinstance(name, str):
        entry = _BUILTIN.get(name) or (_USER[name][1] if name in _USER else None)
    if entry is None:
        known = sorted({*_BUILTIN, *_USER})
        raise ValueError(f"config['type'] must be one of {known}, got {name!r}")
    build, allowed = entry
    kwargs = {k: _from_config_value(v) for k, v in config.items() if k != "type"}
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"config for {name} has unknown keys {unknown}; allowed keys are {sorted(allowed)}"
        )
    return build(**kwargs)
