"""What adaptive schedules observe, measured on the model and agreed on by every rank.

:class:`GradientSignal` measures the per-stage gradient norms that
:class:`~freezesched.schedules.GradientFreeze` observes; :func:`agree_across_ranks`
turns each rank's observation into one value every rank holds bitwise, so every rank
takes the same decision. Schedules themselves never see torch: they get plain floats.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from freezesched._validation import check_int, describe

__all__ = ["GradientSignal", "agree_across_ranks", "as_observation"]

#: One observation as plain data: a number, one number (or ``None``) per stage, or nothing.
Observation = float | tuple[float | None, ...] | None


def _stages(stages: object) -> tuple[tuple[nn.Module, ...], ...]:
    rule = "stages must be a non-empty sequence with one entry per stage: a module or modules"
    if isinstance(stages, nn.Module) or not isinstance(stages, Sequence) or not stages:
        raise TypeError(f"{rule}; got {describe(stages)}")
    out = []
    for i, entry in enumerate(stages):
        group = (entry,) if isinstance(entry, nn.Module) else entry
        if not isinstance(group, Sequence) or not group:
            raise TypeError(f"stages[{i}] must be a module or a non-empty sequence of modules")
        for module in group:
            if not isinstance(module, nn.Module):
                raise TypeError(f"stages[{i}] must hold modules, got {describe(module)}")
        out.append(tuple(group))
    return tuple(out)


class GradientSignal:
    """The L2 norm of each stage's gradient, averaged over the steps recorded.

    Call :meth:`record` once per optimizer step, after ``backward()`` (and after
    ``scaler.unscale_(optimizer)`` with AMP) and before ``zero_grad()``; call :meth:`take`
    at the end of a tick for the per-stage means since the last :meth:`take`, the value
    :class:`~freezesched.schedules.GradientFreeze` observes. A stage's norm is that of all
    its parameters' gradients together (each parameter once); a stage without any gradient
    in a step (frozen) is left out of that step's mean, and its mean is ``nan`` if it had
    none in any recorded step.

    The norms stay on the gradients' device until :meth:`take` (no synchronization per
    step); a measured :meth:`record` is one fused norm per stage and one addition, about
    one read of the gradients. To keep that far below the cost of a step, only one call
    in ``every`` measures (the 1st, the ``every + 1``-th, ... call since the signal was
    built; the others return at once), so the mean is over those steps.

    Args:
        stages: One entry per stage, front stage first: a module, or a sequence of modules
            measured together.
        every: Measure one :meth:`record` call in this many (an int ``>= 1``).

    Raises:
        TypeError: ``stages`` or ``every`` is malformed.
        ValueError: ``every`` is below 1.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> signal = GradientSignal([a, b])
        >>> b(a(torch.ones(1, 2))).sum().backward()
        >>> signal.record()
        >>> norms = signal.take()
        >>> len(norms), all(n > 0 for n in norms), signal.take()
        (2, True, None)
    """

    def __init__(self, stages: Sequence[nn.Module | Sequence[nn.Module]], every: int = 1) -> None:
        self.stages = _stages(stages)
        self.every = check_int(every, "every", minimum=1)
        self._sums: torch.Tensor | None = None
        self._counts = [0] * len(self.stages)
        self._steps = 0
        self._calls = 0

    @property
    def steps(self) -> int:
        """Steps measured since the last :meth:`take`."""
        return self._steps

    def record(self) -> None:
        """Add the current gradients' per-stage norms to the running sums (1 call in ``every``)."""
        call, self._calls = self._calls, self._calls + 1
        if call % self.every:
            return
        norms: list[torch.Tensor] = []
        present: list[bool] = []
        for stage in self.stages:
            params = {id(p): p for module in stage for p in module.parameters()}
            grads = [p.grad for p in params.values() if p.grad is not None]
            present.append(bool(grads))
            if grads:
                norms.append(torch.nn.utils.get_total_norm(grads).to(torch.float64))
        if not norms:
            self._steps += 1
            return
        device = norms[0].device
        values = [n.to(device) for n in norms]
        it = iter(values)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        row = torch.stack([next(it) if has else zero for has in present])
        self._sums = row if self._sums is None else self._sums + row.to(self._sums.device)
        self._counts = [c + int(has) for c, has in zip(self._counts, present, strict=True)]
        self._steps += 1

    def take(self) -> tuple[float, ...] | None:
        """Per-stage mean norms since the last call (``nan``: no gradient); ``None`` if none.

        Resets the running sums.
        """
        if self._steps == 0:
            return None
        sums = [0.0] * len(self.stages) if self._sums is None else self._sums.tolist()
        out = tuple(s / c if c else math.nan for s, c in zip(sums, self._counts, strict=True))
        self._sums, self._counts, self._steps = None, [0] * len(self.stages), 0
        return out

    def state_dict(self) -> dict[str, Any]:
        """The running sums (exact float64 values), counts, steps and calls, as plain data."""
        sums = None if self._sums is None else [float(x) for x in self._sums.tolist()]
        return {
            "sums": sums,
            "counts": list(self._counts),
            "steps": self._steps,
            "calls": self._calls,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: the state does not fit this signal's number of stages.
        """
        n = len(self.stages)
        sums, counts, steps = state.get("sums"), state.get("counts"), state.get("steps")
        calls = state.get("calls", 0)
        ok = (
            isinstance(calls, int)
            and not isinstance(calls, bool)
            and calls >= 0
            and isinstance(counts, list | tuple)
            and len(counts) == n
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            and isinstance(steps, int)
            and not isinstance(steps, bool)
            and steps >= max(counts, default=0)
            and (
                sums is None
                or (
                    isinstance(sums, list | tuple)
                    and len(sums) == n
                    and all(isinstance(s, int | float) and math.isfinite(s) for s in sums)
                )
            )
        )
        if not ok:
            raise ValueError(
                f"state must be a GradientSignal state for {n} stages ({{'sums': None or "
                f"{n} finite numbers, 'counts': {n} ints >= 0, 'steps': int, 'calls': int}}), "
                f"got {state!r}"
            )
        assert isinstance(counts, list | tuple)
        assert isinstance(steps, int)
        assert isinstance(calls, int)
        self._counts = [int(c) for c in counts]
        self._steps = steps
        self._calls = calls
        if sums is None:
            self._sums = None
        else:
            device = next(
                (p.device for stage in self.stages for m in stage for p in m.parameters()),
                torch.device("cpu"),
            )
            self._sums = torch.tensor([float(s) for s in sums], dtype=torch.float64, device=device)


def as_observation(value: object) -> float | str:
    """A metric value as a float, or the reason it is not one (checked on every rank).

    Numbers and one-element tensors are accepted; the reason is returned rather than
    raised so that every rank can learn about any rank's bad value in the same collective.

    Examples:
        >>> import torch
        >>> as_observation(torch.tensor(0.5)), as_observation("0.5")
        (0.5, "the observed value must be a real number or a one-element tensor, got '0.5' (str)")
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool):
        return f"the observed value must be a real number, not a bool, got {value!r}"
    if isinstance(value, numbers.Real):
        return float(value)
    return (
        f"the observed value must be a real number or a one-element tensor, got {describe(value)}"
    )


def _mean(values: list[float]) -> float:
    """The mean, exactly the value itself when all ranks agree (no rounding)."""
    if all(v == values[0] for v in values):
        return values[0]
    return math.fsum(values) / len(values)


def agree_across_ranks(tick: int, value: Observation | str, *, what: str) -> Observation:
    """The mean over ranks of an observation, bitwise identical on every rank.

    Without ``torch.distributed`` (or with one rank) this returns ``value``. Otherwise it
    is a collective (every rank must call it, in the same order): the ranks' ``(tick,
    value)`` pairs are gathered, checked to agree on the tick and on whether there is a
    value, and averaged in rank order (per stage for a tuple; identical values stay
    exactly as they are). A string is a rank's reason why its value is unusable: every
    rank raises with it.

    Args:
        tick: The tick observed.
        value: This rank's observation, or the reason it has none usable.
        what: What is observed, for messages.

    Raises:
        TypeError: a rank's value was unusable.
        ValueError: the ranks disagree on the tick, or on whether there is a value.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if isinstance(value, str):
            raise TypeError(value)
        return value
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (tick, value))
    ticks = [t for t, _ in gathered]
    if len(set(ticks)) > 1:
        raise ValueError(
            f"every rank must observe the same tick for {what}, got ticks {ticks} by rank; "
            "observe at the same point of the loop on every rank"
        )
    values = [v for _, v in gathered]
    for rank, v in enumerate(values):
        if isinstance(v, str):
            raise TypeError(f"rank {rank}: {v}")
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        missing = [r for r, v in enumerate(values) if v is None]
        raise ValueError(
            f"ranks {missing} have no {what} for tick {tick} while others do; record it on "
            "every rank"
        )
    if isinstance(values[0], tuple):
        width = {len(v) for v in values}
        if len(width) > 1:
            raise ValueError(f"the ranks observed different numbers of stages: {sorted(width)}")
        columns = zip(*values, strict=True)
        return tuple(
            None if any(x is None for x in col) else _mean([float(x) for x in col])
            for col in columns
        )
    return _mean([float(v) for v in values])
