"""Accounting a real training run: count a few steps per freeze state, extrapolate."""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from freezesched._validation import check_int, describe
from freezesched.freezing import FrozenRegion, is_frozen
from freezesched.profiling._flops import FlopProfiler, module_names, warn_uncounted
from freezesched.profiling._memory import SavedTensorMeter
from freezesched.profiling._projection import FrozenMiddleWarning, middle_stage_note
from freezesched.profiling._record import PhaseCost, RunCost, StepCost
from freezesched.profiling._report import Format, render_phases

__all__ = ["FlopAccountant"]


@dataclass
class _Phase:
    frozen_modules: tuple[str, ...]
    steps: int = 0
    samples: int = 0
    cost: StepCost | None = None
    counted: int = 0
    seconds: list[float] = field(default_factory=list)
    counted_seconds: list[float] = field(default_factory=list)
    saved_bytes: list[int] = field(default_factory=list)
    peak_cuda_bytes: list[int] = field(default_factory=list)

    def record(self) -> PhaseCost:
        seconds = self.seconds or self.counted_seconds
        return PhaseCost(
            frozen_modules=self.frozen_modules,
            steps=self.steps,
            samples=self.samples,
            cost=self.cost,
            seconds_per_step=statistics.median(seconds) if seconds else None,
            saved_bytes=int(statistics.median(self.saved_bytes)) if self.saved_bytes else None,
            peak_cuda_bytes=int(statistics.median(self.peak_cuda_bytes))
            if self.peak_cuda_bytes
            else None,
        )


class FlopAccountant:
    """Account FLOPs, time and memory of a training run with negligible overhead.

    Wrap every training step (forward and backward) in :meth:`step`. The first
    ``samples_per_state`` steps of each distinct freeze state are counted exactly
    (:class:`FlopProfiler`, :class:`SavedTensorMeter`, peak CUDA memory); every other
    step only adds its batch size and wall time. A step's FLOPs depend only on the
    freeze state and the batch size (FLOPs are linear in the batch), so the run's total
    is the per-sample cost of each state times the samples trained in it.

    The freeze state of a step is, in order of precedence: the ``frozen`` modules given
    to :meth:`step`, the frozen modules of the ``region`` given, or else what freezesched
    holds frozen at the start of the step (found by looking, so a controller or an
    integration needs nothing extra).

    Args:
        model: The model whose forward runs in the step (wrappers around it are fine).
        samples_per_state: Steps to count per freeze state, ``>= 1``.
        rtol: How much the per-sample cost of two sampled steps of one state may differ
            (relative, on total FLOPs). ``0`` (default) demands equal costs; a two-stage
            detector, whose RoI head sees a data-dependent number of proposals, needs
            some slack (e.g. ``0.1``), and the sampled steps are then averaged.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``samples_per_state < 1``, or ``rtol`` not in ``[0, 1)``.

    Examples:
        >>> from freezesched import FrozenStageGuard, Step
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        >>> guard, acct = FrozenStageGuard(Step(2)), FlopAccountant(net)
        >>> for epoch in range(4):
        ...     for _ in range(3):
        ...         x = torch.randn(8, 4)
        ...         with guard(net[0], epoch) as region, acct.step(region, batch_size=8):
        ...             net(x).sum().backward()
        >>> totals = acct.totals()
        >>> totals.samples, totals.delta_flops_2x  # 48 frozen samples x 2 x 32 FLOPs
        (96, -3072)
    """

    def __init__(self, model: nn.Module, *, samples_per_state: int = 2, rtol: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {describe(model)}")
        self.samples_per_state = check_int(samples_per_state, "samples_per_state", minimum=1)
        if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
            raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
        self.model = model
        self.rtol = float(rtol)
        self._phases: dict[tuple[str, ...], _Phase] = {}
        self._names = module_names(model)
        self.uncounted: dict[str, int] = {}
        self.notes: list[str] = []

    @property
    def counted_steps(self) -> int:
        """Steps counted exactly so far (at most ``samples_per_state`` per freeze state)."""
        return sum(p.counted for p in self._phases.values())

    def _name(self, module: nn.Module) -> str:
        if not isinstance(module, nn.Module):
            raise TypeError(f"frozen must hold modules or names, got {describe(module)}")
        if id(module) not in self._names:
            raise ValueError(
                f"a frozen module ({type(module).__name__}) is not a submodule of the "
                "accountant's model"
            )
        return self._names[id(module)]

    def _detect(self) -> tuple[str, ...]:
        """The outermost submodules whose parameters are all held frozen now."""
        out: list[str] = []
        for name, module in self.model.named_modules():
            if out and any(name.startswith(o + ".") or o == "" for o in out):
                continue
            if is_frozen(module):
                out.append(name)
        return tuple(out)

    def _key(
        self, region: FrozenRegion | None, frozen: Sequence[nn.Module | str] | None
    ) -> tuple[str, ...]:
        if frozen is not None:
            if isinstance(frozen, nn.Module | str):
                frozen = [frozen]
            names = [f if isinstance(f, str) else self._name(f) for f in frozen]
            for name in names:
                if name not in self._names.values():
                    raise ValueError(f"frozen names a module the model does not have: {name!r}")
        elif region is not None:
            names = [self._name(m) for m in region.frozen_modules]
        else:
            return self._detect()
        order = {name: i for i, name in enumerate(dict.fromkeys(self._names.values()))}
        return tuple(sorted(dict.fromkeys(names), key=lambda n: order[n]))

    @contextlib.contextmanager
    def step(
        self,
        region: FrozenRegion | None = None,
        *,
        frozen: Sequence[nn.Module | str] | None = None,
        batch_size: int,
    ) -> Iterator[None]:
        """Account one training step of ``batch_size`` samples run inside the block.

        Args:
            region: The :class:`~freezesched.freezing.FrozenRegion` the step runs in.
            frozen: The frozen modules (or their names), if not from a region.
            batch_size: Samples in the step, ``>= 1``.

        Raises:
            ValueError: ``batch_size < 1``, or a frozen module is not in the model.
            RuntimeError: two counted steps of one state cost differently per sample
                (beyond ``rtol``).
        """
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        key = self._key(region, frozen)
        phase = self._phases.get(key)
        if phase is None:
            phase = self._phases[key] = _Phase(key)
        counting = phase.counted < self.samples_per_state
        cuda = counting and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if counting:
            with (
                FlopProfiler(self.model, warn_uncounted=False) as prof,
                SavedTensorMeter() as meter,
            ):
                yield
        else:
            yield
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        phase.steps += 1
        phase.samples += batch_size
        if not counting:
            phase.seconds.append(elapsed)
            return
        phase.counted_seconds.append(elapsed)
        result = prof.result
        self._note_uncounted(result.uncounted)
        # Still inside the caller's freeze: parameter flags tell what trains upstream.
        note = middle_stage_note(result, key, self.model, batch_size) if key else None
        if note is not None and note not in self.notes:
            self.notes.append(note)
            warnings.warn(note, FrozenMiddleWarning, stacklevel=3)
        cost = StepCost.from_step(key, result, batch_size)
        if phase.cost is not None and phase.cost != cost:
            old, new = phase.cost.measured, cost.measured
            if abs(new - old) > self.rtol * max(abs(old), abs(new)):
                raise RuntimeError(
                    f"two counted steps of the state with {list(key) or 'nothing'} frozen cost "
                    f"differently per sample ({phase.cost.flops} vs {cost.flops}); the step "
                    "does not scale linearly with the batch, so it cannot be extrapolated "
                    "(pass rtol= to average steps whose cost is data-dependent)"
                )
            k = phase.counted  # the running mean's weight
            cost = StepCost(
                frozen_modules=key,
                flops=(phase.cost.flops.scaled(k) + cost.flops).scaled(1 / (k + 1)),
                frozen_forward=round(
                    (phase.cost.frozen_forward * k + cost.frozen_forward) / (k + 1)
                ),
            )
        phase.cost = cost
        phase.counted += 1
        phase.saved_bytes.append(meter.bytes)
        if cuda:
            phase.peak_cuda_bytes.append(torch.cuda.max_memory_allocated())

    def _note_uncounted(self, uncounted: dict[str, int] | object) -> None:
        if not isinstance(uncounted, dict) or not uncounted:
            return
        new = {op: n for op, n in uncounted.items() if op not in self.uncounted}
        for op, n in uncounted.items():
            self.uncounted[op] = self.uncounted.get(op, 0) + n
        if new:  # once per op per accountant, not on every counted step
            warn_uncounted(new, stacklevel=4)

    def totals(self, label: str = "", *, schedule: str = "") -> RunCost:
        """The run so far as one record (Eq. 1 in both conventions, ΔF, time, memory)."""
        phases = tuple(p.record() for p in self._phases.values())
        full = self._phases.get(())
        return RunCost(
            label=label,
            schedule=schedule,
            phases=phases,
            full_training=full.cost if full is not None else None,
            uncounted=dict(self.uncounted),
            notes=tuple(self.notes),
        )

    def gather(self, label: str = "", *, schedule: str = "", group: Any = None) -> RunCost:
        """:meth:`totals` summed over every rank of the default process group.

        Each rank counts only its own samples; this all-gathers the per-rank records and
        combines them (:meth:`RunCost.combine`), so every rank returns the whole run's
        totals. Without an initialized process group it is :meth:`totals`.
        """
        mine = self.totals(label, schedule=schedule)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return mine
        records: list[object] = [None] * dist.get_world_size(group)
        dist.all_gather_object(records, mine.to_dict(), group=group)
        runs = [RunCost.from_dict(r) for r in records if isinstance(r, dict)]
        return RunCost.combine(runs, rtol=self.rtol)

    def report(self, fmt: Format = "text") -> str:
        """The per-state table of the run so far (:func:`render_phases`)."""
        return render_phases(self.totals(), fmt)
