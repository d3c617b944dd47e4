"""Accounting a real training run: sample a few steps per freeze state, extrapolate."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from freezesched.freezing import FrozenRegion
from freezesched.profiling._accounting import State, StateCost
from freezesched.profiling._flops import FlopProfiler
from freezesched.profiling._memory import SavedTensorMeter
from freezesched.profiling._report import Format, render_table

__all__ = ["FlopAccountant", "RunTotals", "StateStats", "run_table"]


@dataclass
class StateStats:
    """What was seen of one freeze state during the run.

    Attributes:
        state: One decision per guarded module (``True`` = frozen); ``()`` when steps
            were accounted without a region.
        frozen_modules: Names of the frozen modules (relative to the model).
        steps: Steps trained in this state.
        samples: Samples trained in this state.
        cost: Per-sample FLOPs, from the sampled steps.
        seconds: Wall time of each step not slowed down by counting.
        saved_bytes: Bytes saved for backward in each sampled step.
        peak_cuda_bytes: Peak CUDA memory of each sampled step (empty off GPU).
    """

    state: State
    frozen_modules: tuple[str, ...]
    steps: int = 0
    samples: int = 0
    cost: StateCost | None = None
    seconds: list[float] = field(default_factory=list)
    saved_bytes: list[int] = field(default_factory=list)
    peak_cuda_bytes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RunTotals:
    """Eq. 1 over the run so far, in both conventions, and ΔF against full training.

    ``delta_flops_measured`` is ``None`` unless an all-trainable step was sampled (the
    measured cost of full training is only known from one); the paper convention's
    baseline is always 3 x forward.
    """

    samples: int
    flops_paper: int
    flops_measured: int
    full_training_flops_paper: int
    full_training_flops_measured: int | None

    @property
    def delta_flops_paper(self) -> int:
        """ΔF against full training, paper convention."""
        return self.flops_paper - self.full_training_flops_paper

    @property
    def delta_flops_measured(self) -> int | None:
        """ΔF against full training, measured convention (``None`` if unknown)."""
        if self.full_training_flops_measured is None:
            return None
        return self.flops_measured - self.full_training_flops_measured


class FlopAccountant:
    """Account FLOPs, time and memory of a training run with negligible overhead.

    Wrap every training step (forward and backward) in :meth:`step`. The first
    ``samples_per_state`` steps of each distinct freeze state are counted exactly
    (:class:`FlopProfiler`, :class:`SavedTensorMeter`, peak CUDA memory); every other
    step only adds its batch size and wall time. A step's FLOPs depend only on the
    freeze state and the batch size (FLOPs are linear in the batch), so the run's total
    is the per-sample cost of each state times the samples trained in it.

    Args:
        model: The model whose forward runs in the step.
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
        >>> totals.samples, totals.delta_flops_paper  # 48 frozen samples x 2 x 32 FLOPs
        (96, -3072)
    """

    def __init__(self, model: nn.Module, *, samples_per_state: int = 2, rtol: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(samples_per_state, bool) or not isinstance(samples_per_state, int):
            raise TypeError(f"samples_per_state must be an int >= 1, got {samples_per_state!r}")
        if samples_per_state < 1:
            raise ValueError(f"samples_per_state must be an int >= 1, got {samples_per_state}")
        if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
            raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
        self.model = model
        self.samples_per_state = samples_per_state
        self.rtol = float(rtol)
        self.states: dict[State, StateStats] = {}
        self._names: dict[int, str] = {id(m): name for name, m in model.named_modules()}

    def _stats_for(self, region: FrozenRegion | None) -> StateStats:
        if region is None:
            state: State = ()
            frozen: tuple[str, ...] = ()
        else:
            state = tuple(region.frozen)
            frozen = tuple(
                self._name(m) for m, f in zip(region.modules, region.frozen, strict=True) if f
            )
        if state not in self.states:
            self.states[state] = StateStats(state, frozen)
        return self.states[state]

    def _name(self, module: nn.Module) -> str:
        if id(module) not in self._names:
            raise ValueError(
                f"a guarded module ({type(module).__name__}) is not a submodule of the "
                "accountant's model"
            )
        return self._names[id(module)]

    @contextlib.contextmanager
    def step(self, region: FrozenRegion | None = None, *, batch_size: int) -> Iterator[None]:
        """Account one training step of ``batch_size`` samples run inside the block.

        Args:
            region: The :class:`FrozenRegion` the step runs in (gives the freeze state);
                ``None`` if nothing is frozen by a guard.
            batch_size: Samples in the step, ``>= 1``.

        Raises:
            ValueError: ``batch_size < 1``, or a guarded module is not in the model.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        stats = self._stats_for(region)
        sampled = stats.steps < self.samples_per_state
        cuda = sampled and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if sampled:
            with FlopProfiler(self.model) as prof, SavedTensorMeter() as meter:
                yield
        else:
            yield
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        stats.steps += 1
        stats.samples += batch_size
        if not sampled:
            stats.seconds.append(elapsed)
            return
        cost = StateCost.from_step(stats.state, prof.result, stats.frozen_modules, batch_size)
        if stats.cost is not None and stats.cost != cost:
            old, new = stats.cost.measured.total, cost.measured.total
            if abs(new - old) > self.rtol * max(abs(old), abs(new)):
                raise RuntimeError(
                    f"two sampled steps of freeze state {stats.state} cost differently per "
                    f"sample ({stats.cost.measured} vs {cost.measured}); the step does not "
                    "scale linearly with the batch, so it cannot be extrapolated (pass "
                    "rtol= to average steps whose cost is data-dependent)"
                )
            k = len(stats.saved_bytes)  # sampled steps so far: the running mean's weight
            cost = StateCost(
                state=cost.state,
                measured=(stats.cost.measured.scaled(k) + cost.measured).scaled(1 / (k + 1)),
                frozen_forward=round(
                    (stats.cost.frozen_forward * k + cost.frozen_forward) / (k + 1)
                ),
            )
        stats.cost = cost
        stats.saved_bytes.append(meter.bytes)
        if cuda:
            stats.peak_cuda_bytes.append(torch.cuda.max_memory_allocated())

    def totals(self) -> RunTotals:
        """Eq. 1 over every step accounted so far, in both conventions."""
        paper = measured = full_paper = samples = 0
        full_cost = next(
            (s.cost for s in self.states.values() if s.cost and not any(s.state)), None
        )
        for stats in self.states.values():
            if stats.cost is None:
                continue
            samples += stats.samples
            paper += stats.samples * stats.cost.paper
            measured += stats.samples * stats.cost.measured.total
            full_paper += stats.samples * stats.cost.full_training_paper
        return RunTotals(
            samples=samples,
            flops_paper=paper,
            flops_measured=measured,
            full_training_flops_paper=full_paper,
            full_training_flops_measured=(
                samples * full_cost.measured.total if full_cost is not None else None
            ),
        )

    def rows(self) -> list[dict[str, Any]]:
        """One row per freeze state: steps, samples, per-sample GFLOPs, time, memory."""
        out = []
        for stats in self.states.values():
            cost = stats.cost
            out.append(
                {
                    "state": "".join("F" if f else "T" for f in stats.state) or "-",
                    "frozen": ", ".join(stats.frozen_modules) or "-",
                    "steps": stats.steps,
                    "samples": stats.samples,
                    "gflops_forward": cost.measured.forward / 1e9 if cost else None,
                    "gflops_backward": cost.measured.backward / 1e9 if cost else None,
                    "gflops_paper": cost.paper / 1e9 if cost else None,
                    "seconds_per_step": _median(stats.seconds),
                    "saved_mib": _median(stats.saved_bytes, scale=2**20),
                    "peak_cuda_mib": _median(stats.peak_cuda_bytes, scale=2**20),
                }
            )
        return out

    def summary(self, policy: str = "") -> dict[str, Any]:
        """One Table III-style row for the whole run: FLOPs, estimated time, memory.

        ``seconds`` estimates the run's wall time without the counting overhead: each
        state's median uncounted step time times its steps (the counted steps' own time
        when a state had no other). Memory is the largest per-state median.
        """
        totals = self.totals()
        seconds = 0.0
        for stats in self.states.values():
            per_step = _median(stats.seconds)
            seconds += stats.steps * (per_step if per_step is not None else 0.0)
        steps = sum(s.steps for s in self.states.values())
        frozen_steps = sum(s.steps for s in self.states.values() if any(s.state))
        saved = [m for s in self.states.values() if (m := _median(s.saved_bytes)) is not None]
        peak = [m for s in self.states.values() if (m := _median(s.peak_cuda_bytes)) is not None]
        delta_measured = totals.delta_flops_measured
        return {
            "policy": policy,
            "steps": steps,
            "frozen_steps": frozen_steps,
            "tflops_measured": totals.flops_measured / 1e12,
            "delta_tflops_measured": None if delta_measured is None else delta_measured / 1e12,
            "tflops_paper": totals.flops_paper / 1e12,
            "delta_tflops_paper": totals.delta_flops_paper / 1e12,
            "seconds": seconds,
            "saved_mib": max(saved) / 2**20 if saved else None,
            "peak_cuda_mib": max(peak) / 2**20 if peak else None,
        }

    def report(self, fmt: Format = "text") -> str:
        """The per-state table (see :meth:`rows`) in ``fmt``."""
        columns = [
            ("state", "state (F=frozen)"),
            ("frozen", "frozen modules"),
            ("steps", "steps"),
            ("samples", "samples"),
            ("gflops_forward", "GFLOPs/sample fwd"),
            ("gflops_backward", "bwd"),
            ("gflops_paper", "paper fwd+bwd"),
            ("seconds_per_step", "s/step"),
            ("saved_mib", "saved MiB"),
            ("peak_cuda_mib", "peak CUDA MiB"),
        ]
        return render_table(self.rows(), columns, fmt)


RUN_COLUMNS = [
    ("policy", "policy"),
    ("frozen_steps", "frozen steps"),
    ("tflops_measured", "TFLOPs"),
    ("delta_tflops_measured", "ΔTFLOPs"),
    ("delta_tflops_paper", "ΔTFLOPs (paper conv.)"),
    ("seconds", "time (s)"),
    ("delta_seconds", "ΔT (s)"),
    ("saved_mib", "saved MiB"),
    ("peak_cuda_mib", "peak CUDA MiB"),
]


def run_table(summaries: Sequence[dict[str, Any]], fmt: Format = "text") -> str:
    """Table II/III-style comparison of runs, each a :meth:`FlopAccountant.summary`.

    The first row is the baseline (full training): ``ΔT`` is against its time. A run whose
    measured ΔTFLOPs is unknown (it never trained every module, e.g. a frozen backbone)
    gets ``TFLOPs - baseline TFLOPs``, which is right when all runs train on the same
    samples.

    Examples:
        >>> a = {"policy": "full", "tflops_measured": 2.0, "seconds": 10.0}
        >>> b = {"policy": "frozen", "tflops_measured": 1.5, "seconds": 7.5}
        >>> print(run_table([a, b], "csv").splitlines()[2])
        frozen,,1.5,-0.5,,7.5,-2.5,,
    """
    rows = [dict(s) for s in summaries]
    if rows:
        base_time = rows[0].get("seconds")
        base_flops = rows[0].get("tflops_measured")
        for row in rows:
            if base_time is not None and row.get("seconds") is not None:
                row["delta_seconds"] = row["seconds"] - base_time
            if row.get("delta_tflops_measured") is None and base_flops is not None:
                row["delta_tflops_measured"] = row["tflops_measured"] - base_flops
    return render_table(rows, RUN_COLUMNS, fmt)


def _median(values: Sequence[float], scale: float = 1.0) -> float | None:
    return statistics.median(values) / scale if values else None
