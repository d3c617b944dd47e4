"""Base classes, tick validation and the config registry shared by all schedules.

A schedule is a pure function of one explicit counter, the *tick* (an epoch or an
iteration; the caller decides). Every schedule implements one vectorized method,
``_frozen_at(ticks)``; calling a schedule on one tick and building a timeline over a
million ticks both go through it, so the two can never disagree.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "BinarySchedule",
    "Schedule",
    "check_tick",
    "schedule_from_config",
]

_REGISTRY: dict[str, type[Schedule]] = {}


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(value: object, name: str, *, minimum: int = 0) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``; raise otherwise.

    ``bool`` is rejected although it is an ``int`` subclass: ``True`` as a tick or a count
    is almost always a bug.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_tick(t: object, name: str = "t") -> int:
    """Validate a tick: an ``int`` (or NumPy integer) ``>= 0``; ``bool`` is rejected.

    Args:
        t: The tick to validate.
        name: The argument name used in error messages.

    Returns:
        ``t`` as a Python ``int``.

    Raises:
        TypeError: ``t`` is not an integer.
        ValueError: ``t`` is negative.

    Examples:
        >>> check_tick(3)
        3
        >>> check_tick(-1)
        Traceback (most recent call last):
        ...
        ValueError: t must be an int >= 0, got -1
    """
    return check_int(t, name, minimum=0)


def _field_names(cls: type) -> tuple[str, ...]:
    fields: Mapping[str, Any] = getattr(cls, "__dataclass_fields__", {})
    return tuple(fields)


def _to_config_value(value: Any) -> Any:
    if isinstance(value, Schedule):
        return value.to_config()
    if isinstance(value, tuple):
        return [_to_config_value(v) for v in value]
    return value


def _from_config_value(value: Any) -> Any:
    if isinstance(value, Mapping) and "type" in value:
        return schedule_from_config(value)
    if isinstance(value, list | tuple):
        return tuple(_from_config_value(v) for v in value)
    if isinstance(value, str) and value in ("inf", "+inf", "Infinity"):
        # JSON has no infinity literal; configs written by hand or by a CLI use a string.
        return math.inf
    return value


class Schedule(abc.ABC):
    """Common base of binary and per-stage freeze schedules.

    Subclasses are frozen dataclasses: immutable, hashable, with structural equality and
    a readable ``repr``. Each implements :meth:`_frozen_at` on a 1-D array of ticks.
    """

    @property
    def num_stages(self) -> int:
        """Number of stages the schedule decides for (``1`` for binary schedules)."""
        return 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _REGISTRY[cls.__name__] = cls

    @abc.abstractmethod
    def __call__(self, t: int) -> bool | tuple[bool, ...]:
        """The decision at tick ``t``: a bool, or one bool per stage (``True`` = frozen)."""

    @abc.abstractmethod
    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Freeze decisions for a 1-D array of non-negative ticks.

        Returns a boolean array of shape ``(len(ticks),)`` for binary schedules and
        ``(len(ticks), num_stages)`` for per-stage schedules; ``True`` means frozen.
        """

    def timeline(self, stop: int, start: int = 0) -> NDArray[np.bool_]:
        """Evaluate the schedule on every tick of ``[start, stop)`` at once (vectorized).

        Args:
            stop: One past the last tick.
            start: The first tick.

        Returns:
            A boolean array, ``True`` where frozen: shape ``(stop - start,)`` for a binary
            schedule, ``(stop - start, num_stages)`` for a per-stage one.

        Raises:
            TypeError: ``start`` or ``stop`` is not an integer.
            ValueError: ``start`` is negative or greater than ``stop``.

        Examples:
            >>> from freezesched import Step
            >>> Step(3).timeline(7).astype(int).tolist()
            [0, 1, 1, 0, 1, 1, 0]
        """
        start = check_tick(start, "start")
        stop = check_tick(stop, "stop")
        if stop < start:
            raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
        return self._frozen_at(np.arange(start, stop, dtype=np.int64))

    def to_config(self) -> dict[str, Any]:
        """A plain-dict description that :func:`schedule_from_config` turns back into it.

        Examples:
            >>> from freezesched import Step, WarmupThenFreeze
            >>> WarmupThenFreeze(50, then=Step(5)).to_config()
            {'type': 'WarmupThenFreeze', 'warmup': 50, 'then': {'type': 'Step', 'rho': 5}}
        """
        config: dict[str, Any] = {"type": type(self).__name__}
        for name in _field_names(type(self)):
            config[name] = _to_config_value(getattr(self, name))
        return config

    @classmethod
    def _from_config_kwargs(cls, kwargs: dict[str, Any]) -> Schedule:
        return cls(**kwargs)


class BinarySchedule(Schedule):
    """A schedule that decides one thing per tick: frozen (``True``) or trainable.

    Binary schedules compose with ``&`` (frozen iff both), ``|`` (frozen iff either)
    and ``~`` (frozen iff not).
    """

    def __call__(self, t: int) -> bool:
        """Whether the module is frozen at tick ``t``.

        Raises:
            TypeError: ``t`` is not an integer.
            ValueError: ``t`` is negative.
        """
        tick = check_tick(t)
        return bool(self._frozen_at(np.array([tick], dtype=np.int64))[0])

    def __and__(self, other: BinarySchedule) -> BinarySchedule:
        from freezesched.schedules._combinators import And

        return And(self, other)

    def __or__(self, other: BinarySchedule) -> BinarySchedule:
        from freezesched.schedules._combinators import Or

        return Or(self, other)

    def __invert__(self) -> BinarySchedule:
        from freezesched.schedules._combinators import Not

        return Not(self)


def schedule_from_config(config: Mapping[str, Any] | Schedule) -> Schedule:
    """Build a schedule from the plain dict that :meth:`Schedule.to_config` returns.

    Nested schedules are dicts with a ``"type"`` key; lists become tuples; the string
    ``"inf"`` stands for ``math.inf`` (JSON has no infinity). A :class:`Schedule` is
    returned unchanged, so configs may also hold ready-made schedules.

    Args:
        config: A mapping with a ``"type"`` key naming a schedule class, plus that
            class's constructor arguments.

    Returns:
        The schedule.

    Raises:
        TypeError: ``config`` is not a mapping or a schedule.
        ValueError: the type is unknown, or the keys do not fit that type.

    Examples:
        >>> schedule_from_config({"type": "Step", "rho": "inf"})
        Step(rho=inf)
    """
    if isinstance(config, Schedule):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping with a 'type' key, got {_describe(config)}")
    if "type" not in config:
        raise ValueError(f"config must have a 'type' key naming a schedule, got {dict(config)!r}")
    name = config["type"]
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or not _field_names(cls):
        known = sorted(k for k, v in _REGISTRY.items() if _field_names(v))
        raise ValueError(f"config['type'] must be one of {known}, got {name!r}")
    kwargs = {k: _from_config_value(v) for k, v in config.items() if k != "type"}
    allowed = set(_field_names(cls))
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"config for {name} has unknown keys {unknown}; allowed keys are {sorted(allowed)}"
        )
    return cls._from_config_kwargs(kwargs)
