"""The schedule types and their algebra: ``Schedule``, ``BinarySchedule``, ``&``, ``|``, ``~``.

A schedule is a pure function of one explicit counter, the *tick* (an epoch or an
iteration; the caller decides), and, for adaptive schedules, of the observations it was
given. Every schedule implements one vectorized method, ``_frozen_at(ticks)``; calling a
schedule on one tick and building a timeline over a million ticks both go through it, so
the two can never disagree.

Adaptive schedules (:mod:`freezesched.schedules._adaptive`) are the leaves that hold
state: the record of what they decided. Composite schedules hold none; they only tell
how their children's ticks relate to theirs (:meth:`Schedule._parts`), and the methods
here (:meth:`Schedule.observe`, :meth:`Schedule.commit`, :attr:`Schedule.horizon`,
:meth:`Schedule.state_dict`) route through them with the same relative ticks that
evaluation uses.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import MAX_TICK, check_int, check_tick, describe

__all__ = ["And", "BinarySchedule", "Not", "Or", "Schedule", "UndecidedTickError"]

#: One past the largest tick: the end of a range that never ends.
END = MAX_TICK + 1

#: Version of the layout of :meth:`Schedule.state_dict`.
STATE_VERSION = 1


class UndecidedTickError(ValueError):
    """A tick an adaptive schedule has not decided yet was asked about.

    An adaptive schedule decides tick ``t`` from the observations of ticks before ``t``
    when ``t`` is applied (:meth:`FreezeController.apply <freezesched.FreezeController.apply>`,
    a guard region) or committed (:meth:`Schedule.commit`). Until then, asking about it
    would have to invent an answer, so it raises this (a ``ValueError``). Ticks before
    :attr:`Schedule.horizon` are decided.

    Attributes:
        tick: The first undecided tick that was asked about.
        horizon: The schedule's first undecided tick.
    """

    def __init__(self, message: str, *, tick: int, horizon: int) -> None:
        super().__init__(message)
        self.tick = tick
        self.horizon = horizon


UndecidedTickError.__module__ = "freezesched.schedules"


def _undecided(schedule: Schedule, tick: int, horizon: int) -> UndecidedTickError:
    return UndecidedTickError(
        f"tick {tick} of {schedule.summary()} has not been decided yet (its first undecided "
        f"tick is {horizon}). A tick is decided from the observations before "
        "it when it is applied (FreezeController.apply, a guard region) or committed "
        f"(schedule.commit({tick})); ask again after that",
        tick=tick,
        horizon=horizon,
    )


#: An adaptive leaf reached from a schedule: the leaf, the tick where its tick 0 is, and
#: one past the last tick it owns (``END`` if it never stops).
Leaf = tuple["Schedule", int, int]


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

    Every schedule also takes part in adaptive freezing: :meth:`observe` routes an
    observation to its adaptive parts (on their relative ticks), :meth:`commit` fixes
    decisions, :attr:`horizon` is the first undecided tick and :meth:`state_dict` /
    :meth:`load_state_dict` save and restore the adaptive parts' records. For a schedule
    without adaptive parts these are trivial: everything is decided, nothing is stored.
    """

    #: ``True`` for the adaptive leaves (:mod:`freezesched.schedules._adaptive`).
    _adaptive_leaf: ClassVar[bool] = False

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
        self._check_decided(start, stop)
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

    # --- adaptive parts: routing through composites ---------------------------------

    def _parts(self) -> tuple[tuple[Schedule, int, int], ...]:
        """The children: each with the tick where its tick 0 is and where its range ends.

        A child at ``(child, offset, end)`` decides ticks ``[offset, end)`` of this
        schedule, seeing ``t - offset``; this is the same mapping evaluation uses, so
        observations reach a child on the ticks it is evaluated on. Leaves have none.
        """
        return ()

    def _leaves(self) -> list[Leaf]:
        """Every adaptive leaf below this schedule, with its range in this schedule's ticks."""
        if self._adaptive_leaf:
            return [(self, 0, END)]
        out: list[Leaf] = []
        for child, offset, end in self._parts():
            for leaf, start, stop in child._leaves():
                lo, hi = offset + start, min(offset + stop, end)
                if lo < hi:
                    out.append((leaf, lo, hi))
        return out

    @property
    def adaptive_parts(self) -> tuple[Schedule, ...]:
        """The adaptive schedules inside this one (itself if it is one), in a fixed order.

        This order is that of :meth:`state_dict`'s entries.

        Examples:
            >>> from freezesched import Step, WarmupThenFreeze
            >>> from freezesched.schedules import Plateau
            >>> p = Plateau()
            >>> WarmupThenFreeze(3, then=p | Step(2)).adaptive_parts == (p,)
            True
        """
        return tuple(leaf for leaf, _, _ in self._leaves())

    @property
    def signals(self) -> frozenset[str]:
        """What the adaptive parts observe (``"metric"``, ``"gradient_norm"``); empty if none.

        Examples:
            >>> from freezesched import Step
            >>> from freezesched.schedules import Plateau
            >>> sorted((Step(2) & Plateau()).signals), sorted(Step(2).signals)
            (['metric'], [])
        """
        return frozenset(str(getattr(leaf, "signal", "")) for leaf, _, _ in self._leaves())

    @property
    def horizon(self) -> int:
        """The first tick not decided yet; ``2**53`` (one past the last tick) if none.

        A schedule without adaptive parts has decided every tick. An adaptive one has
        decided the ticks it was asked to apply or commit, and the tick after its last
        observation (which depends only on the observations before it).
        """
        first = END
        for leaf, start, stop in self._leaves():
            at = start + leaf._leaf_horizon()
            if at < stop:
                first = min(first, at)
        return first

    def _check_decided(self, start: int, stop: int) -> None:
        """Raise :class:`UndecidedTickError` if a tick of ``[start, stop)`` is undecided."""
        first = END
        for leaf, lo, hi in self._leaves():
            undecided = max(lo + leaf._leaf_horizon(), start)
            if undecided < min(hi, stop):
                first = min(first, undecided)
        if first != END:
            raise _undecided(self, first, self.horizon)

    def _leaf_horizon(self) -> int:
        return END

    def observe(self, tick: int, value: Any) -> None:
        """Give the adaptive parts the value measured after training tick ``tick``.

        Each adaptive part active at ``tick`` receives it on its own relative tick (a
        child of ``WarmupThenFreeze(w, then=...)`` sees ``tick - w``; a child of
        :class:`~freezesched.schedules.Sequential` only the ticks it owns). An
        observation of tick ``t`` can change decisions from tick ``t + 1`` on. Observe
        each tick at most once, in increasing order, before tick ``t + 1`` is decided.
        Every part is checked before any is changed.

        Args:
            tick: The tick the value was measured after (an int in ``[0, 2**53 - 1]``).
            value: What the adaptive parts observe: a number for a metric-driven part
                (:class:`~freezesched.schedules.Plateau`), one number per stage for a
                gradient-driven one (:class:`~freezesched.schedules.GradientFreeze`).

        Raises:
            TypeError: ``tick`` or ``value`` has the wrong type.
            ValueError: the schedule has no adaptive part; the tick is out of range, not
                after the last observed one, or the tick after it is already decided; the
                value is not finite.

        Examples:
            >>> from freezesched import WarmupThenFreeze
            >>> from freezesched.schedules import Plateau
            >>> s = WarmupThenFreeze(2, then=Plateau(patience=0))
            >>> for tick, loss in enumerate([3.0, 2.0, 1.0, 1.5]):
            ...     s.observe(tick, loss)
            >>> s.timeline(5).astype(int).tolist()
            [0, 0, 0, 0, 1]
        """
        tick = check_tick(tick, "tick")
        leaves = self._leaves()
        if not leaves:
            raise ValueError(
                f"{self.summary()} has no adaptive part to observe; observations are for "
                "schedules such as Plateau or GradientFreeze (or combinations holding one)"
            )
        active = [(leaf, tick - start) for leaf, start, stop in leaves if start <= tick < stop]
        checked = [(leaf, t, leaf._leaf_check_observe(t, value)) for leaf, t in active]
        for leaf, t, normalized in checked:
            leaf._leaf_observe(t, normalized)

    def commit(self, tick: int) -> None:
        """Decide every tick up to ``tick`` from the observations given so far.

        Decisions are recorded: asking about a committed tick later returns the same
        answer, and an observation of a tick before ``tick`` is refused from now on.
        Idempotent; a no-op for a schedule without adaptive parts. The controller and the
        guard commit each tick they apply.

        Raises:
            TypeError, ValueError: ``tick`` is not a valid tick.
        """
        tick = check_tick(tick, "tick")
        for leaf, start, stop in self._leaves():
            if tick >= start:
                leaf._leaf_commit(min(tick, stop - 1) - start)

    def state_dict(self) -> dict[str, Any]:
        """The adaptive parts' records and counters, as plain data (JSON-compatible).

        Parameters are not state: they are in :meth:`to_config`. A schedule without
        adaptive parts has an empty list of them.

        Examples:
            >>> from freezesched import Step
            >>> Step(2).state_dict()
            {'version': 1, 'adaptive': []}
        """
        return {
            "version": STATE_VERSION,
            "adaptive": [leaf._leaf_state() for leaf, _, _ in self._leaves()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from this schedule or an equal one).

        Every part is checked before any is changed.

        Raises:
            ValueError: the state is not of this version, does not have one entry per
                adaptive part, or an entry does not fit its part (another type or other
                parameters, or inconsistent values).
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else state
            raise ValueError(
                f"state['version'] must be {STATE_VERSION}, got {found!r}; was this saved by "
                "Schedule.state_dict()?"
            )
        parts = state.get("adaptive")
        leaves = self._leaves()
        if not isinstance(parts, list | tuple) or len(parts) != len(leaves):
            have = len(parts) if isinstance(parts, list | tuple) else parts
            raise ValueError(
                f"state['adaptive'] must hold one entry per adaptive part of {self.summary()} "
                f"({len(leaves)}), got {have!r}"
            )
        loaded = [
            leaf._leaf_check_state(part, f"state['adaptive'][{i}]")
            for i, ((leaf, _, _), part) in enumerate(zip(leaves, parts, strict=True))
        ]
        for (leaf, _, _), part in zip(leaves, loaded, strict=True):
            leaf._leaf_load(part)

    # Implemented by the adaptive leaves (see ``_adaptive.AdaptiveSchedule``).
    def _leaf_check_observe(self, tick: int, value: Any) -> Any:
        raise NotImplementedError

    def _leaf_observe(self, tick: int, value: Any) -> None:
        raise NotImplementedError

    def _leaf_commit(self, tick: int) -> None:
        raise NotImplementedError

    def _leaf_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _leaf_check_state(self, state: object, name: str) -> Any:
        raise NotImplementedError

    def _leaf_load(self, state: Any) -> None:
        raise NotImplementedError


def check_unshared(children: Iterable[Schedule], name: str) -> None:
    """Refuse one adaptive schedule object reached twice (its record would be fed twice)."""
    seen: set[int] = set()
    for child in children:
        for leaf, _, _ in child._leaves():
            if id(leaf) in seen:
                raise ValueError(
                    f"{name} must not hold the same adaptive schedule object twice, got "
                    f"{leaf!r} twice: it keeps one record of decisions, so each use needs "
                    "its own (build it once per use)"
                )
            seen.add(id(leaf))


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
        self._check_decided(tick, tick + 1)
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
        children = binary_tuple(schedules, "schedules")
        check_unshared(children, "schedules")
        object.__setattr__(self, "schedules", children)

    def _parts(self) -> tuple[tuple[Schedule, int, int], ...]:
        return tuple((child, 0, END) for child in self.schedules)

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

    def _parts(self) -> tuple[tuple[Schedule, int, int], ...]:
        return ((self.schedule, 0, END),)

    def _summary(self) -> str:
        return f"~({self.schedule._summary()})"

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        return ~self.schedule._frozen_at(ticks)
