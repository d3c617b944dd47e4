r"""Adaptive schedules: decisions driven by what training measures, recorded tick by tick.

An adaptive schedule is a pure function of the tick *and of the observations it was
given*: the decision at tick ``t`` depends only on the observations of ticks before
``t``. It keeps a record of its decisions, so asking about a past tick returns what was
decided then, and :meth:`~freezesched.schedules.Schedule.state_dict` saves that record
(and the counters behind it) as plain data.

The rules, shared by every adaptive schedule:

* ``observe(t, value)`` gives it the value measured after training tick ``t`` (a
  validation loss after epoch ``t``, the gradient norms of step ``t``). Ticks are observed
  at most once and in increasing order, and ``t`` must be observed before tick ``t + 1``
  is decided. An observation of ``t`` can change decisions from ``t + 1`` on.
* A tick is *decided* once it is applied (``FreezeController.apply``, a guard region),
  committed (``commit(t)``), or is the tick right after the last observation. Decided
  ticks never change. Tick 0 is decided from the start.
* Asking about a tick that is not decided yet raises
  :class:`~freezesched.schedules.UndecidedTickError`: answering would mean guessing
  observations that have not been made.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from freezesched._validation import MAX_TICK, check_choice, check_int, check_tick, describe
from freezesched.schedules._base import END, BinarySchedule, Schedule, UndecidedTickError

__all__ = ["GradientFreeze", "Plateau"]

Mode = Literal["min", "max"]
ThresholdMode = Literal["rel", "abs"]


@dataclass
class _Record:
    """The decisions of an adaptive schedule, as change points, and how far they go."""

    #: ``(first tick, code)``, the first at tick 0; the code holds until the next one.
    changes: list[tuple[int, int]]
    #: The first tick not decided yet (ticks ``[0, horizon)`` are).
    horizon: int = 1
    #: The last tick observed, ``None`` before the first observation.
    last_observed: int | None = None

    @property
    def current(self) -> int:
        return self.changes[-1][1]


def _real(value: object, name: str, *, allow_negative: bool = True) -> float:
    """A finite real number as a float (``bool`` is not a number here)."""
    rule = f"{name} must be a finite real number" + ("" if allow_negative else " >= 0")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{rule}, got {describe(value)}")
    number = float(value)
    if not math.isfinite(number) or (not allow_negative and number < 0):
        raise ValueError(f"{rule}, got {value!r}")
    return number


def _state_int(value: object, name: str, minimum: int = 0, maximum: int = END) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value!r}")
    return value


def _state_float(value: object, name: str) -> float | None:
    if value is None:
        return None
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, 'inf' or None, got {value!r}")
    return float(value)


def _plain(value: float | None) -> float | str | None:
    """A float for JSON: infinity is written as ``"inf"`` (JSON has no such literal)."""
    return "inf" if value == math.inf else value


class AdaptiveSchedule(Schedule):
    """Common base of the adaptive schedules: the record, observing, committing, state.

    A subclass defines what it observes (``signal``), how a value is checked
    (:meth:`_check_value`), how an observation changes its decision (:meth:`_update`),
    how a decision code maps to decisions (:meth:`_decisions`), and its counters.
    """

    _adaptive_leaf: ClassVar[bool] = True
    #: What the schedule observes: ``"metric"`` or ``"gradient_norm"``.
    signal: ClassVar[str] = ""
    #: Whether decision codes only grow (a frozen stage stays frozen).
    _monotone: ClassVar[bool] = False
    _record: _Record

    def _start(self) -> None:
        """Start with an empty record (called by ``__post_init__``)."""
        object.__setattr__(self, "_record", _Record(changes=[(0, self._initial_code())]))
        self._reset_counters()

    @property
    def changes(self) -> tuple[tuple[int, Any], ...]:
        """Where the decisions changed so far: ``(first tick, decision)``, from tick 0.

        Ticks are this schedule's own (relative to where it starts inside a composite).
        """
        return tuple((tick, self._describe_code(code)) for tick, code in self._record.changes)

    @property
    def last_observed(self) -> int | None:
        """The last tick observed (this schedule's own ticks), ``None`` before any."""
        return self._record.last_observed

    # --- what a subclass defines --------------------------------------------------------

    @abc.abstractmethod
    def _initial_code(self) -> int: ...

    @abc.abstractmethod
    def _describe_code(self, code: int) -> Any: ...

    @abc.abstractmethod
    def _check_code(self, code: object, name: str) -> int: ...

    @abc.abstractmethod
    def _check_value(self, value: object, code: int) -> Any: ...

    @abc.abstractmethod
    def _update(self, value: Any, code: int) -> int: ...

    @abc.abstractmethod
    def _decisions(self, codes: NDArray[np.int64]) -> NDArray[np.bool_]: ...

    @abc.abstractmethod
    def _reset_counters(self) -> None: ...

    @abc.abstractmethod
    def _counters_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _check_counters(self, state: Mapping[str, Any], name: str, code: int) -> Any: ...

    @abc.abstractmethod
    def _load_counters(self, counters: Any) -> None: ...

    # --- the record ---------------------------------------------------------------------

    def _frozen_at(self, ticks: NDArray[np.int64]) -> NDArray[np.bool_]:
        record = self._record
        if ticks.size and int(ticks.max()) >= record.horizon:
            first = int(ticks[ticks >= record.horizon].min())
            raise UndecidedTickError(
                f"tick {first} of {self.summary()} (its own tick) has not been decided yet: "
                f"ticks [0, {record.horizon}) are. Observe and apply (or commit) the ticks "
                "before it first",
                tick=first,
                horizon=record.horizon,
            )
        starts = np.array([tick for tick, _ in record.changes], dtype=np.int64)
        codes = np.array([code for _, code in record.changes], dtype=np.int64)
        return self._decisions(codes[np.searchsorted(starts, ticks, side="right") - 1])

    def _leaf_horizon(self) -> int:
        return self._record.horizon

    def _leaf_check_observe(self, tick: int, value: Any) -> Any:
        record = self._record
        if record.last_observed is not None and tick <= record.last_observed:
            raise ValueError(
                f"tick must be after the last observed tick ({record.last_observed}) of "
                f"{self.summary()}: observe each tick at most once, in increasing order; "
                f"got tick {tick} (its own tick)"
            )
        if tick + 1 < record.horizon:
            raise ValueError(
                f"tick {tick} (its own tick) of {self.summary()} is observed too late: tick "
                f"{record.horizon - 1} was already decided without it. Observe a tick before "
                "the next one is applied or committed"
            )
        return self._check_value(value, record.current)

    def _leaf_observe(self, tick: int, value: Any) -> None:
        record = self._record
        self._leaf_commit(tick)  # ticks up to `tick` depend only on earlier observations
        code = self._update(value, record.current)
        record.last_observed = tick
        if code != record.current and tick < MAX_TICK:
            record.changes.append((tick + 1, code))
        record.horizon = max(record.horizon, min(tick + 2, END))

    def _leaf_commit(self, tick: int) -> None:
        self._record.horizon = max(self._record.horizon, tick + 1)

    def _leaf_state(self) -> dict[str, Any]:
        record = self._record
        return {
            "type": type(self).__name__,
            "config": self.to_config(),
            "changes": [[tick, code] for tick, code in record.changes],
            "horizon": record.horizon,
            "last_observed": record.last_observed,
            "counters": self._counters_state(),
        }

    def _leaf_check_state(self, state: object, name: str) -> Any:
        if not isinstance(state, Mapping):
            raise ValueError(f"{name} must be a mapping, got {describe(state)}")
        if state.get("type") != type(self).__name__ or state.get("config") != self.to_config():
            raise ValueError(
                f"{name} was saved by {state.get('type')!r} with config {state.get('config')!r}, "
                f"not by this {type(self).__name__} ({self.to_config()!r}); a state only "
                "loads into a schedule with the same parameters"
            )
        changes = state.get("changes")
        if not isinstance(changes, list | tuple) or not changes:
            raise ValueError(f"{name}['changes'] must be a non-empty list, got {changes!r}")
        parsed: list[tuple[int, int]] = []
        for i, entry in enumerate(changes):
            if not isinstance(entry, list | tuple) or len(entry) != 2:
                raise ValueError(f"{name}['changes'][{i}] must be [tick, code], got {entry!r}")
            tick = _state_int(entry[0], f"{name}['changes'][{i}][0]", 0, MAX_TICK)
            code = self._check_code(entry[1], f"{name}['changes'][{i}][1]")
            out_of_order = bool(parsed) and (
                tick <= parsed[-1][0]
                or code == parsed[-1][1]
                or (self._monotone and code < parsed[-1][1])
            )
            if (i == 0) != (tick == 0) or out_of_order:
                raise ValueError(
                    f"{name}['changes'] must start at tick 0 and change the decision at "
                    f"strictly increasing ticks, got {changes!r}"
                )
            parsed.append((tick, code))
        horizon = _state_int(state.get("horizon"), f"{name}['horizon']", 1, END)
        last = state.get("last_observed")
        if last is not None:
            last = _state_int(last, f"{name}['last_observed']", 0, MAX_TICK)
        if parsed[-1][0] >= horizon or (last is not None and horizon < min(last + 2, END)):
            raise ValueError(
                f"{name}['horizon'] ({horizon}) must be past every change and the tick "
                f"after the last observed one ({last})"
            )
        if len(parsed) > 1 and (last is None or parsed[-1][0] > last + 1):
            raise ValueError(
                f"{name}['changes'] must only change after an observation, got changes "
                f"{changes!r} with last observed tick {last!r}"
            )
        counters = state.get("counters")
        if not isinstance(counters, Mapping):
            raise ValueError(f"{name}['counters'] must be a mapping, got {describe(counters)}")
        checked = self._check_counters(counters, f"{name}['counters']", parsed[-1][1])
        return _Record(parsed, horizon, last), checked

    def _leaf_load(self, state: Any) -> None:
        record, counters = state
        object.__setattr__(self, "_record", record)
        self._load_counters(counters)


# --- Plateau --------------------------------------------------------------------------------


@dataclass
class _PlateauCounters:
    best: float | None = None
    bad: int = 0
    cooldown_left: int = 0
    switches: int = 0


@dataclass(frozen=True)
class Plateau(AdaptiveSchedule, BinarySchedule):
    r"""Freeze (or unfreeze) when a monitored value stops improving, as ``ReduceLROnPlateau``.

    It starts trainable (or frozen, with ``start_frozen=True``) and *switches* when the
    observed value has not improved for more than ``patience`` observations in a row,
    at most ``max_switches`` times. Observations are the value measured after a tick
    (``observe(t, value)``, e.g. the validation loss after epoch ``t``); a switch decided
    by the observation of tick ``t`` takes effect at tick ``t + 1``. For each observation
    ``v``, in order:

    1. ``v`` *improves* on the best value so far if (``mode="min"``)
       ``v < best - threshold * |best|`` (``threshold_mode="rel"``) or
       ``v < best - threshold`` (``"abs"``); with ``mode="max"``, ``v > best + ...``. The
       first observation always improves. An improvement sets ``best = v`` and the count
       of bad observations to 0; anything else adds 1 to it.
    2. During a cooldown (the ``cooldown`` observations after a switch) the count of bad
       observations is reset to 0.
    3. When the count exceeds ``patience`` and fewer than ``max_switches`` switches were
       made, the decision flips, the count resets to 0 and the cooldown starts.

    So with ``patience=2`` it switches at the third observation in a row that does not
    improve by the threshold. The best value is kept across switches: after a freeze it
    keeps waiting for an improvement over the best value seen while training. This is
    ``ReduceLROnPlateau``'s rule with the relative threshold taken on ``|best|`` (so it is
    also right for negative values); its ``min_delta``-style absolute form is
    ``threshold_mode="abs"``.

    Args:
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        patience: Bad observations in a row that are tolerated, an int ``>= 0``.
        threshold: The improvement that counts, a finite real ``>= 0``.
        threshold_mode: ``"rel"`` (a fraction of ``|best|``) or ``"abs"``.
        cooldown: Observations after a switch during which bad ones are not counted,
            an int ``>= 0``.
        max_switches: At most this many switches (an int ``>= 1``), or ``None`` for no
            limit. The default ``1`` freezes once, for good.
        start_frozen: The decision before the first switch.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range or not one of the choices.

    Examples:
        >>> s = Plateau(mode="min", patience=1)
        >>> for epoch, loss in enumerate([1.0, 0.8, 0.81, 0.79, 0.8, 0.8]):
        ...     s.observe(epoch, loss)
        >>> s.timeline(7).astype(int).tolist()  # bad at 4 and 5: frozen from 6
        [0, 0, 0, 0, 0, 0, 1]
        >>> s.changes
        ((0, False), (6, True))
        >>> s(8)
        Traceback (most recent call last):
        ...
        freezesched.schedules.UndecidedTickError: tick 8 of Plateau(min, patience 1) has not
        been decided yet (its first undecided tick is 7)...
    """

    mode: Mode = "min"
    patience: int = 3
    threshold: float = 1e-4
    threshold_mode: ThresholdMode = "rel"
    cooldown: int = 0
    max_switches: int | None = 1
    start_frozen: bool = False

    signal: ClassVar[str] = "metric"
    _counters: _PlateauCounters = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", ("min", "max"))
        object.__setattr__(self, "patience", check_int(self.patience, "patience"))
        object.__setattr__(
            self, "threshold", _real(self.threshold, "threshold", allow_negative=False)
        )
        check_choice(self.threshold_mode, "threshold_mode", ("rel", "abs"))
        object.__setattr__(self, "cooldown", check_int(self.cooldown, "cooldown"))
        if self.max_switches is not None:
            object.__setattr__(
                self,
                "max_switches",
                check_int(self.max_switches, "max_switches (or None for no limit)", minimum=1),
            )
        if not isinstance(self.start_frozen, bool | np.bool_):
            raise TypeError(f"start_frozen must be a bool, got {describe(self.start_frozen)}")
        object.__setattr__(self, "start_frozen", bool(self.start_frozen))
        self._start()

    def _summary(self) -> str:
        start = ", start frozen" if self.start_frozen else ""
        return f"Plateau({self.mode}, patience {self.patience}{start})"

    def _initial_code(self) -> int:
        return int(self.start_frozen)

    def _describe_code(self, code: int) -> bool:
        return bool(code)

    def _check_code(self, code: object, name: str) -> int:
        return _state_int(code, name, 0, 1)

    def _check_value(self, value: object, code: int) -> float:
        return _real(value, "the observed value")

    def _improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        margin = self.threshold * abs(best) if self.threshold_mode == "rel" else self.threshold
        return value < best - margin if self.mode == "min" else value > best + margin

    def _update(self, value: float, code: int) -> int:
        c = self._counters
        if self._improves(value, c.best):
            c.best, c.bad = value, 0
        else:
            c.bad += 1
        if c.cooldown_left > 0:
            c.cooldown_left -= 1
            c.bad = 0
        if c.bad > self.patience and (self.max_switches is None or c.switches < self.max_switches):
            c.switches += 1
            c.bad = 0
            c.cooldown_left = self.cooldown
            return 1 - code
        return code

    def _decisions(self, codes: NDArray[np.int64]) -> NDArray[np.bool_]:
        return np.asarray(codes == 1)

    def _reset_counters(self) -> None:
        object.__setattr__(self, "_counters", _PlateauCounters())

    def _counters_state(self) -> dict[str, Any]:
        c = self._counters
        return {
            "best": c.best,
            "bad": c.bad,
            "cooldown_left": c.cooldown_left,
            "switches": c.switches,
        }

    def _check_counters(self, state: Mapping[str, Any], name: str, code: int) -> _PlateauCounters:
        best = _state_float(state.get("best"), f"{name}['best']")
        if best is not None and not math.isfinite(best):
            raise ValueError(f"{name}['best'] must be finite or None, got {best!r}")
        limit = END if self.max_switches is None else self.max_switches
        return _PlateauCounters(
            best=best,
            bad=_state_int(state.get("bad"), f"{name}['bad']"),
            cooldown_left=_state_int(
                state.get("cooldown_left"), f"{name}['cooldown_left']", 0, self.cooldown
            ),
            switches=_state_int(state.get("switches"), f"{name}['switches']", 0, limit),
        )

    def _load_counters(self, counters: Any) -> None:
        object.__setattr__(self, "_counters", counters)


# --- GradientFreeze ---------------------------------------------------------------------------


def _rate(before: float, now: float) -> float:
    """Relative change of a gradient norm: ``|now - before| / before``."""
    if before == 0.0:
        return 0.0 if now == 0.0 else math.inf
    return abs(now - before) / before


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (NumPy's default method).

    Examples:
        >>> _percentile([4.0, 1.0, 3.0, 2.0], 50)
        2.5
    """
    xs = sorted(values)
    position = (len(xs) - 1) * (q / 100.0)
    lo = math.floor(position)
    hi = min(lo + 1, len(xs) - 1)
    t = position - lo
    a, b = xs[lo], xs[hi]
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


@dataclass
class _GradientCounters:
    previous: list[float | None] | None = None
    rates: list[float | None] | None = None


@dataclass(frozen=True)
class GradientFreeze(AdaptiveSchedule):
    r"""Freeze stages front to back when their gradient norm stops changing (AutoFreeze-style).

    Each observation is one gradient norm per stage, front stage first (``observe(t,
    norms)``; :class:`freezesched.freezing.GradientSignal` measures them, and the
    controller does it for you). Between two observations, a trainable stage's *rate* is
    the relative change of its norm, :math:`r_i = |g_i - g_i'| / g_i'` (``g'`` the
    previous observation; ``0/0`` is 0 and ``x/0`` infinite). After each observation with
    rates, the front-most trainable stage freezes if its rate is at or below the cutoff,
    then the next one if its rate also is, and so on: **front to back only**, so a stage
    never freezes before the stages in front of it, and a frozen stage stays frozen. The
    cutoff is ``threshold``, or the ``percentile``-th percentile (linear interpolation,
    NumPy's default) of the finite rates of all trainable stages in that observation; an
    infinite rate is never at or below it. The decision takes effect from the tick after
    the observation. The first observation only sets the reference.

    Norms of frozen stages are ignored (they have no gradient: pass ``None`` or ``nan``);
    those of trainable stages must be finite and ``>= 0``.

    How the norms are measured is up to whoever observes; the controller and the
    integrations average, over a tick, the norms of one optimizer step in ``every``
    (counted over the whole run), which keeps the measurement far below 1 % of a step
    (``benchmarks/gradient_signal_overhead.py``). With step ticks, ``every`` is the
    evaluation interval: one observation every ``every`` ticks.

    Args:
        stages: Number of stages, an int ``>= 1``.
        threshold: Freeze a stage whose rate is at most this (a finite real ``>= 0``).
        percentile: Or freeze a stage whose rate is at most this percentile of the
            trainable stages' rates, a real in ``(0, 100]``. Give exactly one of the two.
        max_frozen: At most this many stages freeze (an int in ``[1, stages]``); ``None``
            lets all of them.
        every: For whoever measures the norms: one optimizer step in this many (an int
            ``>= 1``). The decisions depend only on the observations.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, or not exactly one of ``threshold`` and
            ``percentile`` is given.

    Examples:
        >>> s = GradientFreeze(3, threshold=0.1)
        >>> s.observe(0, [1.0, 2.0, 4.0])
        >>> s.observe(1, [1.05, 2.1, 3.0])   # rates 0.05, 0.05, 0.25: stages 0 and 1
        >>> s.observe(2, [None, None, 2.9])  # frozen stages have no norm
        >>> s(1), s(2), s(3)
        ((False, False, False), (True, True, False), (True, True, True))
    """

    stages: int
    threshold: float | None = None
    percentile: float | None = None
    max_frozen: int | None = None
    every: int = 10

    signal: ClassVar[str] = "gradient_norm"
    _monotone: ClassVar[bool] = True
    _counters: _GradientCounters = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = check_int(self.stages, "stages", minimum=1)
        object.__setattr__(self, "stages", n)
        if (self.threshold is None) == (self.percentile is None):
            raise ValueError(
                "give exactly one of threshold and percentile, got "
                f"threshold={self.threshold!r}, percentile={self.percentile!r}"
            )
        if self.threshold is not None:
            object.__setattr__(
                self, "threshold", _real(self.threshold, "threshold", allow_negative=False)
            )
        if self.percentile is not None:
            q = _real(self.percentile, "percentile")
            if not 0.0 < q <= 100.0:
                raise ValueError(f"percentile must be a real in (0, 100], got {self.percentile!r}")
            object.__setattr__(self, "percentile", q)
        if self.max_frozen is not None:
            object.__setattr__(
                self, "max_frozen", check_int(self.max_frozen, "max_frozen", minimum=1, maximum=n)
            )
        object.__setattr__(self, "every", check_int(self.every, "every", minimum=1))
        self._start()

    @property
    def num_stages(self) -> int:
        """Number of stages this schedule decides for."""
        return self.stages

    @property
    def rates(self) -> tuple[float | None, ...] | None:
        """The rates of the last observation, per stage (``None``: frozen, or no rate yet)."""
        rates = self._counters.rates
        return None if rates is None else tuple(rates)

    def __call__(self, t: int) -> tuple[bool, ...]:
        """Per-stage decisions at tick ``t``, front stage first (``True`` = frozen).

        Raises:
            TypeError: ``t`` is not an integer.
            ValueError: ``t`` is out of range (:class:`UndecidedTickError` if not decided).
        """
        tick = check_tick(t)
        self._check_decided(tick, tick + 1)
        row = self._frozen_at(np.array([tick], dtype=np.int64))[0]
        return tuple(bool(x) for x in row)

    def _summary(self) -> str:
        cutoff = (
            f"rate <= {self.threshold:g}"
            if self.threshold is not None
            else (f"rate <= p{self.percentile:g}")
        )
        return f"GradientFreeze({self.stages} stages, {cutoff})"

    @property
    def _limit(self) -> int:
        return self.stages if self.max_frozen is None else self.max_frozen

    def _initial_code(self) -> int:
        return 0

    def _describe_code(self, code: int) -> int:
        return code

    def _check_code(self, code: object, name: str) -> int:
        return _state_int(code, name, 0, self._limit)

    def _check_value(self, value: object, code: int) -> list[float | None]:
        rule = f"the observed value must be a sequence of {self.stages} gradient norms"
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            raise TypeError(f"{rule}, one per stage; got {describe(value)}")
        if len(value) != self.stages:
            raise ValueError(f"{rule}, one per stage; got {len(value)}: {value!r}")
        norms: list[float | None] = [None] * code
        for i in range(code, self.stages):
            name = f"the gradient norm of trainable stage {i}"
            norms.append(_real(value[i], name, allow_negative=False))
        return norms

    def _update(self, value: list[float | None], code: int) -> int:
        c = self._counters
        new = code
        rates: list[float | None] = [None] * self.stages
        if c.previous is not None and code < self._limit:
            for i in range(code, self.stages):
                before, now = c.previous[i], value[i]
                assert before is not None  # trainable at both observations
                assert now is not None
                rates[i] = _rate(before, now)
            finite = [r for r in rates[code:] if r is not None and math.isfinite(r)]
            cutoff = -math.inf
            if self.threshold is not None:
                cutoff = self.threshold
            elif finite:
                assert self.percentile is not None
                cutoff = _percentile(finite, self.percentile)
            while new < self._limit and (rate := rates[new]) is not None and rate <= cutoff:
                new += 1
        previous: list[float | None] = [None] * new
        c.previous = previous + value[new:]
        c.rates = rates
        return new

    def _decisions(self, codes: NDArray[np.int64]) -> NDArray[np.bool_]:
        return np.asarray(np.arange(self.stages)[None, :] < codes[:, None])

    def _reset_counters(self) -> None:
        object.__setattr__(self, "_counters", _GradientCounters())

    def _counters_state(self) -> dict[str, Any]:
        c = self._counters
        return {
            "previous": None if c.previous is None else list(c.previous),
            "rates": None if c.rates is None else [_plain(r) for r in c.rates],
        }

    def _check_counters(self, state: Mapping[str, Any], name: str, code: int) -> _GradientCounters:
        out: dict[str, list[float | None] | None] = {}
        for key in ("previous", "rates"):
            values = state.get(key)
            if values is None:
                out[key] = None
                continue
            if not isinstance(values, list | tuple) or len(values) != self.stages:
                raise ValueError(
                    f"{name}[{key!r}] must be None or a list of {self.stages} entries, "
                    f"got {values!r}"
                )
            out[key] = [_state_float(v, f"{name}[{key!r}][{i}]") for i, v in enumerate(values)]
        previous = out["previous"]
        if previous is not None and any(
            (v is None) != (i < code) or (v is not None and not 0.0 <= v < math.inf)
            for i, v in enumerate(previous)
        ):
            raise ValueError(
                f"{name}['previous'] must hold a finite norm >= 0 for each trainable stage "
                f"(from stage {code} on) and None for the frozen ones, got {previous!r}"
            )
        return _GradientCounters(previous=previous, rates=out["rates"])

    def _load_counters(self, counters: Any) -> None:
        object.__setattr__(self, "_counters", counters)
