"""The schedule types and their algebra: ``Schedule``, ``BinarySchedule``, ``&``, ``|``, ``~``.

A schedule is a pure function of one explicit counter, the *tick* (an epoch or an
iteration; the caller decides). Every schedule implements one vectorized method,
``_frozen_at(ticks)``; calling a schedule on one tick and building a timeline over a
million ticks both go through it, so the two can never disagree.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import MAX_TICK, check_int, check_tick, describe

__all__ = ["And", "BinarySchedule", "Not", "Or", "Schedule"]


def init_fields(cls: type) -> tuple[str, ...]:
    """Names of a dataclass's constructor fields (``init=False`` fields are not config)."""
    if not dataclasses.is_dataclass(cls):
        return ()
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _to_config_value(value: Any) -> Any:
    if isinstance(value, Schedule):
        return value.to_config()
    if isinstance(value, tuple):
        return [_to_config_value(v) for v in value]
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

    @abc.abstractmethod
    def __call__(self, t: int) -> bool | tuple[bool, ...]:
        """The decision at tick ``t``: a bool, or one bool per stage (``True`` = frozen)."""

    @abc.abstractmethod
    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Freeze decisions for a 1-D array of ticks in ``[0, MAX_TICK]``.

        Returns a boolean array of shape ``(len(ticks),)`` for binary schedules and
        ``(len(ticks), num_stages)`` for per-stage schedules; ``True`` means frozen.
        """

    def timeline(self, stop: int, start: int = 0) -> NDArray[np.bool_]:
        """Evaluate the schedule on every tick of ``[start, stop)`` at once (vectorized).

        Args:
            stop: One past the last tick (at most ``MAX_TICK + 1``).
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
        stop = check_int(stop, "stop", maximum=MAX_TICK + 1)
        if stop < start:
            raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
        return self._frozen_at(np.arange(start, stop, dtype=np.int64))

    def to_config(self) -> dict[str, Any]:
        """A plain-dict description that ``schedule_from_config`` turns back into it.

        Examples:
            >>> from freezesched import Step, WarmupThenFreeze
            >>> WarmupThenFreeze(50, then=Step(5)).to_config()
            {'type': 'WarmupThenFreeze', 'warmup': 50, 'then': {'type': 'Step', 'rho': 5}}
        """
        config: dict[str, Any] = {"type": type(self).__name__}
        for name in init_fields(type(self)):
            config[name] = _to_config_value(getattr(self, name))
        return config

    def summary(self, width: int = 48) -> str:
        """A short, human-readable description for tables and plot titles.

        The full form is ``repr(schedule)`` (and :meth:`to_config`); this one is at most
        ``width`` characters, cut with ``...`` if needed.

        Examples:
            >>> from freezesched import Step, WarmupThenFreeze
            >>> WarmupThenFreeze(50, then=Step(5)).summary()
            'WarmupThenFreeze(50, then=Step(5))'
        """
        text = self._summary()
        return text if len(text) <= width else text[: width - 3] + "..."

    def _summary(self) -> str:
        return repr(self)

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
            ValueError: ``t`` is negative or above ``MAX_TICK``.
        """
        tick = check_tick(t)
        return bool(self._frozen_at(np.array([tick], dtype=np.int64))[0])

    def __and__(self, other: BinarySchedule) -> BinarySchedule:
        return And(self, other)

    def __or__(self, other: BinarySchedule) -> BinarySchedule:
        return Or(self, other)

    def __invert__(self) -> BinarySchedule:
        return Not(self)


def binary_tuple(schedules: object, name: str) -> tuple[BinarySchedule, ...]:
    """A non-empty sequence of binary schedules as a tuple; ``TypeError`` otherwise."""
    if isinstance(schedules, BinarySchedule | Mapping) or not isinstance(schedules, Iterable):
        raise TypeError(f"{name} must be a sequence of BinarySchedule, got {describe(schedules)}")
    items = tuple(schedules)
    if not items:
        raise ValueError(f"{name} must hold at least one schedule, got an empty sequence")
    for i, item in enumerate(items):
        if not isinstance(item, BinarySchedule):
            raise TypeError(f"{name}[{i}] must be a BinarySchedule, got {describe(item)}")
    return items


class _Variadic(BinarySchedule):
    """Shared constructor for logical combinators that take any number of children."""

    schedules: tuple[BinarySchedule, ...]

    def __init__(self, *schedules: BinarySchedule) -> None:
        object.__setattr__(self, "schedules", binary_tuple(schedules, "schedules"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.schedules))})"

    _symbol = ""

    def _summary(self) -> str:
        return f" {self._symbol} ".join(f"({s._summary()})" for s in self.schedules)

    @classmethod
    def _from_config_kwargs(cls, kwargs: dict[str, Any]) -> Schedule:
        unknown = sorted(set(kwargs) - {"schedules"})
        if unknown:
            raise ValueError(f"config for {cls.__name__} has unknown keys {unknown}")
        return cls(*binary_tuple(kwargs.get("schedules", ()), "schedules"))


@dataclass(frozen=True, init=False, repr=False)
class And(_Variadic):
    """Frozen iff *every* child is frozen (``a & b``).

    Examples:
        >>> from freezesched import Step
        >>> (Step(2) & Step(3)).timeline(7).astype(int).tolist()
        [0, 1, 0, 0, 0, 1, 0]
    """

    schedules: tuple[BinarySchedule, ...]
    _symbol = "&"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        out = self.schedules[0]._frozen_at(ticks)
        for child in self.schedules[1:]:
            out = out & child._frozen_at(ticks)
        return out


@dataclass(frozen=True, init=False, repr=False)
class Or(_Variadic):
    """Frozen iff *any* child is frozen (``a | b``).

    Examples:
        >>> from freezesched import Step
        >>> (Step(2) | Step(3)).timeline(7).astype(int).tolist()
        [0, 1, 1, 1, 1, 1, 0]
    """

    schedules: tuple[BinarySchedule, ...]
    _symbol = "|"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        out = self.schedules[0]._frozen_at(ticks)
        for child in self.schedules[1:]:
            out = out | child._frozen_at(ticks)
        return out


@dataclass(frozen=True)
class Not(BinarySchedule):
    """Frozen iff the child is trainable (``~s``); ``~Not(s)`` is ``s`` itself.

    Examples:
        >>> from freezesched import Step
        >>> (~Step(3)).timeline(4).astype(int).tolist()
        [1, 0, 0, 1]
        >>> ~~Step(3) == Step(3)
        True
    """

    schedule: BinarySchedule

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, BinarySchedule):
            raise TypeError(f"schedule must be a BinarySchedule, got {describe(self.schedule)}")

    def __invert__(self) -> BinarySchedule:
        return self.schedule

    def _summary(self) -> str:
        return f"~({self.schedule._summary()})"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return ~self.schedule._frozen_at(ticks)
