r"""The one record of what a run cost: per freeze state (phase), and for the whole run.

Every front end (the accountant, the projection, the demo, the command line, the
benchmarks, the MMRotate example) produces a :class:`RunCost` and hands it to the one
renderer (:mod:`freezesched.profiling._report`). FLOPs are totals over the run
(``TFLOPs = FLOPs / 1e12``, ``FLOPs = 2 x MACs``) in two conventions:

* **measured**: what autograd actually ran, counted at dispatch level;
* **2x**: backward counted as twice the forward FLOPs of the trainable layers and zero
  for frozen ones, the assumption behind the DBF paper's Eq. 1,

.. math::
    F_\text{total} = \sum_{e=1}^{E} \sum_{n=1}^{N} \sum_{l=1}^{L}
        \left( F_\text{forward}(e, l) + F_\text{backward}(e, l) \right).

``ΔF`` is against full training (nothing frozen) on the same samples.
"""

from __future__ import annotations

import json
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from freezesched.profiling._flops import FlopCount, StepFlops

__all__ = ["Convention", "MemoryPhase", "MemoryPlan", "PhaseCost", "RunCost", "StepCost"]

Convention = Literal["measured", "2x"]


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one training step in one freeze state, **per sample**.

    Attributes:
        frozen_modules: Names of the frozen modules (relative to the model); ``()`` for
            full training.
        flops: What autograd ran, per sample.
        frozen_forward: Forward FLOPs of the frozen modules, per sample.
    """

    frozen_modules: tuple[str, ...]
    flops: FlopCount
    frozen_forward: int

    @classmethod
    def from_step(cls, frozen_modules: Sequence[str], step: StepFlops, batch_size: int) -> StepCost:
        """The per-sample cost of one counted step of ``batch_size`` samples.

        Args:
            frozen_modules: Names of the frozen modules (relative to the profiled model).
            step: What :class:`~freezesched.profiling.FlopProfiler` counted.
            batch_size: Samples in the step.
        """
        frozen = tuple(frozen_modules)
        return cls(
            frozen_modules=frozen,
            flops=step.total.scaled(1 / batch_size),
            frozen_forward=round(step.forward_of(list(frozen)) / batch_size) if frozen else 0,
        )

    @property
    def measured(self) -> int:
        """Per-sample FLOPs autograd ran (forward + backward)."""
        return self.flops.total

    @property
    def flops_2x(self) -> int:
        """Per-sample FLOPs with backward = 2 x the forward of trainable layers."""
        return self.flops.forward + 2 * (self.flops.forward - self.frozen_forward)

    @property
    def full_training_2x(self) -> int:
        """Per-sample FLOPs of full training in the 2x convention: 3 x forward."""
        return 3 * self.flops.forward

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return {
            "frozen_modules": list(self.frozen_modules),
            "flops": self.flops.to_dict(),
            "frozen_forward": self.frozen_forward,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepCost:
        """The inverse of :meth:`to_dict`."""
        return cls(
            tuple(data["frozen_modules"]), FlopCount(**data["flops"]), data["frozen_forward"]
        )


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


@dataclass(frozen=True)
class PhaseCost:
    """What a run spent in one freeze state.

    Attributes:
        frozen_modules: The state: names of the frozen modules (``()``: nothing frozen).
        steps: Steps trained in this state (``0`` for a projection).
        samples: Samples trained in this state.
        cost: Per-sample FLOPs (``None`` if no step of this state was counted).
        ticks: Ticks (epochs) spent in this state, for a projection.
        seconds_per_step: Median wall time of a step not slowed down by counting.
        saved_bytes: Median bytes autograd kept for backward in a counted step.
        peak_cuda_bytes: Median peak CUDA memory of a counted step.
    """

    frozen_modules: tuple[str, ...]
    steps: int = 0
    samples: int = 0
    cost: StepCost | None = None
    ticks: int | None = None
    seconds_per_step: float | None = None
    saved_bytes: int | None = None
    peak_cuda_bytes: int | None = None

    @property
    def flops_measured(self) -> int:
        """FLOPs autograd ran in this phase (0 if not counted)."""
        return self.samples * self.cost.measured if self.cost else 0

    @property
    def flops_2x(self) -> int:
        """FLOPs in the 2x convention."""
        return self.samples * self.cost.flops_2x if self.cost else 0

    @property
    def seconds(self) -> float | None:
        """Estimated wall time of the phase: steps x median step time."""
        return None if self.seconds_per_step is None else self.steps * self.seconds_per_step

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return {
            "frozen_modules": list(self.frozen_modules),
            "steps": self.steps,
            "samples": self.samples,
            "cost": None if self.cost is None else self.cost.to_dict(),
            "ticks": self.ticks,
            "seconds_per_step": self.seconds_per_step,
            "saved_bytes": self.saved_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhaseCost:
        """The inverse of :meth:`to_dict`."""
        cost = data.get("cost")
        return cls(
            frozen_modules=tuple(data["frozen_modules"]),
            steps=data.get("steps", 0),
            samples=data.get("samples", 0),
            cost=None if cost is None else StepCost.from_dict(cost),
            ticks=data.get("ticks"),
            seconds_per_step=data.get("seconds_per_step"),
            saved_bytes=data.get("saved_bytes"),
            peak_cuda_bytes=data.get("peak_cuda_bytes"),
        )


@dataclass(frozen=True)
class RunCost:
    """What one run (or one projected policy) cost, per phase and in total.

    Attributes:
        label: The policy's name, for tables.
        schedule: A short description of its schedule.
        phases: One :class:`PhaseCost` per freeze state visited.
        full_training: The per-sample cost with nothing frozen, the baseline of the
            measured ``ΔF`` (``None`` when no such step was counted).
        ticks: Ticks (epochs) of the run, for projections and plots.
        frozen_ticks: Ticks frozen: for a per-stage schedule, the sum over ticks of the
            fraction of stages frozen (4 stages frozen for 1 epoch, then 2 for 1 epoch
            make 1.5).
        uncounted: Ops that ran without a FLOP formula, with how often (from the counted
            steps).
        metrics: What the run achieved (accuracy, mAP, ...), for tables.
        notes: Anything the reader must know to read the numbers right.
        curve: Measured FLOPs accumulated by the end of each tick, for plots (empty if
            not recorded).
    """

    label: str = ""
    schedule: str = ""
    phases: tuple[PhaseCost, ...] = ()
    full_training: StepCost | None = None
    ticks: int | None = None
    frozen_ticks: float | None = None
    uncounted: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    curve: tuple[int, ...] = ()

    @property
    def samples(self) -> int:
        """Samples trained (counted or not)."""
        return sum(p.samples for p in self.phases)

    @property
    def steps(self) -> int:
        """Steps trained."""
        return sum(p.steps for p in self.phases)

    @property
    def frozen_steps(self) -> int:
        """Steps trained with something frozen."""
        return sum(p.steps for p in self.phases if p.frozen_modules)

    @property
    def counted_samples(self) -> int:
        """Samples in phases whose per-sample cost is known."""
        return sum(p.samples for p in self.phases if p.cost is not None)

    @property
    def flops_measured(self) -> int:
        """Total FLOPs autograd ran."""
        return sum(p.flops_measured for p in self.phases)

    @property
    def flops_2x(self) -> int:
        """Total FLOPs in the 2x convention."""
        return sum(p.flops_2x for p in self.phases)

    @property
    def full_training_flops_2x(self) -> int:
        """Full training on the same samples, 2x convention (3 x forward)."""
        return sum(p.samples * p.cost.full_training_2x for p in self.phases if p.cost)

    @property
    def full_training_flops_measured(self) -> int | None:
        """Full training on the same samples, measured (``None`` if never counted)."""
        if self.full_training is None:
            return None
        return self.counted_samples * self.full_training.measured

    @property
    def delta_flops_2x(self) -> int:
        """``ΔF`` against full training, 2x convention."""
        return self.flops_2x - self.full_training_flops_2x

    @property
    def delta_flops_measured(self) -> int | None:
        """``ΔF`` against full training, measured (``None`` if its baseline is unknown)."""
        full = self.full_training_flops_measured
        return None if full is None else self.flops_measured - full

    @property
    def seconds(self) -> float | None:
        """Estimated wall time without counting overhead (``None`` if never timed)."""
        times = [p.seconds for p in self.phases if p.seconds is not None]
        return sum(times) if times else None

    # The names of the first release, which the README documented.
    @property
    def flops_paper(self) -> int:
        """Deprecated name of :attr:`flops_2x`."""
        warnings.warn("RunCost.flops_paper is now flops_2x", DeprecationWarning, stacklevel=2)
        return self.flops_2x

    @property
    def delta_flops_paper(self) -> int:
        """Deprecated name of :attr:`delta_flops_2x`."""
        warnings.warn(
            "RunCost.delta_flops_paper is now delta_flops_2x", DeprecationWarning, stacklevel=2
        )
        return self.delta_flops_2x

    def with_metrics(self, **metrics: float | None) -> RunCost:
        """A copy with these metrics added (e.g. ``accuracy=0.7``)."""
        return replace(self, metrics={**self.metrics, **metrics})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe), with the derived totals for readers of the file."""
        return {
            "label": self.label,
            "schedule": self.schedule,
            "ticks": self.ticks,
            "frozen_ticks": self.frozen_ticks,
            "phases": [p.to_dict() for p in self.phases],
            "full_training": None if self.full_training is None else self.full_training.to_dict(),
            "uncounted": dict(self.uncounted),
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
            "curve": list(self.curve),
            "totals": {
                "samples": self.samples,
                "steps": self.steps,
                "flops_measured": self.flops_measured,
                "flops_2x": self.flops_2x,
                "delta_flops_measured": self.delta_flops_measured,
                "delta_flops_2x": self.delta_flops_2x,
                "seconds": self.seconds,
            },
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunCost:
        """The inverse of :meth:`to_dict` (the derived ``totals`` are recomputed)."""
        full = data.get("full_training")
        return cls(
            label=data.get("label", ""),
            schedule=data.get("schedule", ""),
            phases=tuple(PhaseCost.from_dict(p) for p in data.get("phases", ())),
            full_training=None if full is None else StepCost.from_dict(full),
            ticks=data.get("ticks"),
            frozen_ticks=data.get("frozen_ticks"),
            uncounted=dict(data.get("uncounted", {})),
            metrics=dict(data.get("metrics", {})),
            notes=tuple(data.get("notes", ())),
            curve=tuple(data.get("curve", ())),
        )

    @classmethod
    def combine(cls, runs: Sequence[RunCost], *, rtol: float = 0.0) -> RunCost:
        """One record for the same run on several processes (ranks) that step together.

        Samples add up (each rank trains its own). Steps do not: the ranks of a data-
        parallel run take each step together, so a phase's steps are the most any rank
        took, and its step time is the slowest rank's (ranks wait for each other); the
        run's wall time is then one rank's, not the sum. Per-sample costs of a phase must
        agree across ranks (within ``rtol``, then they are averaged weighted by samples);
        memory is the largest rank's.

        Raises:
            ValueError: no runs, or ranks disagree on a phase's per-sample cost.
        """
        if not runs:
            raise ValueError("runs must hold at least one RunCost, got none")
        phases: dict[tuple[str, ...], list[PhaseCost]] = {}
        for run in runs:
            for phase in run.phases:
                phases.setdefault(phase.frozen_modules, []).append(phase)
        merged = []
        for key, parts in phases.items():
            costs = [p for p in parts if p.cost is not None]
            cost = _average_costs(key, costs, rtol)
            merged.append(
                PhaseCost(
                    frozen_modules=key,
                    steps=max(p.steps for p in parts),
                    samples=sum(p.samples for p in parts),
                    cost=cost,
                    ticks=parts[0].ticks,
                    seconds_per_step=max(
                        (p.seconds_per_step for p in parts if p.seconds_per_step is not None),
                        default=None,
                    )
                    if all(p.seconds_per_step is not None for p in parts)
                    else None,
                    saved_bytes=max((p.saved_bytes for p in parts if p.saved_bytes), default=None),
                    peak_cuda_bytes=max(
                        (p.peak_cuda_bytes for p in parts if p.peak_cuda_bytes), default=None
                    ),
                )
            )
        # The baseline is the merged full-training phase where there is one (averaged
        # over ranks like every phase), else what the ranks were given.
        fulls = [m.cost for m in merged if m.frozen_modules == () and m.cost is not None]
        fulls += [r.full_training for r in runs if r.full_training is not None]
        uncounted: dict[str, int] = {}
        for run in runs:
            for op, n in run.uncounted.items():
                uncounted[op] = uncounted.get(op, 0) + n
        first = runs[0]
        return replace(
            first,
            phases=tuple(merged),
            full_training=fulls[0] if fulls else None,
            uncounted=uncounted,
            notes=tuple(dict.fromkeys(n for r in runs for n in r.notes)),
        )


def _average_costs(
    key: tuple[str, ...], phases: Sequence[PhaseCost], rtol: float
) -> StepCost | None:
    costs = [p.cost for p in phases if p.cost is not None]
    if not costs:
        return None
    first = costs[0]
    for other in costs[1:]:
        a, b = first.measured, other.measured
        if abs(a - b) > rtol * max(abs(a), abs(b)):
            raise ValueError(
                f"ranks disagree on the per-sample cost of the phase with {list(key) or 'nothing'}"
                f" frozen ({first.flops} vs {other.flops}); pass rtol= for data-dependent costs"
            )
    weights = [max(p.samples, 1) for p in phases if p.cost is not None]
    total = sum(weights)
    flops = FlopCount()
    frozen_forward = 0.0
    for cost, w in zip(costs, weights, strict=True):
        flops = flops + cost.flops.scaled(w / total)
        frozen_forward += cost.frozen_forward * w / total
    return StepCost(first.frozen_modules, flops, round(frozen_forward))


@dataclass(frozen=True)
class MemoryPhase:
    """Bytes per rank in one freeze state of a memory plan (see ``plan_memory``).

    Attributes:
        label: The phase (``"trainable"``, ``"frozen"``, ``"stages 1-2 frozen"``).
        frozen_modules: Names of the frozen modules.
        trainable_elements: Trainable parameter elements (whole model, not per rank).
        frozen_elements: Frozen parameter elements (whole model).
        weights: Bytes of model weights held per rank (sharded or not).
        gradients: Bytes of gradients per rank at the end of backward.
        optimizer: Bytes of optimizer state per rank (moments, and an fp32 master copy
            where the precision keeps one).
        activations: Bytes autograd keeps for backward per rank (its own batch),
            measured on fake tensors; weights saved by layers are not counted again.
        buffers: Communication buffers per rank: DDP's gradient buckets, FSDP / ZeRO-3's
            gathered units, ZeRO-1/2's reduce bucket.
        transient: The largest short-lived allocation on top: the backward's first
            gradients or the optimizer step's temporaries, whichever the peak meets.
        peak: ``weights + optimizer + buffers + max(activations + backward temporaries,
            gradients + step temporaries)``: the estimated peak per rank.
    """

    label: str
    frozen_modules: tuple[str, ...]
    trainable_elements: int
    frozen_elements: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    transient: int
    peak: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return {
            "label": self.label,
            "frozen_modules": list(self.frozen_modules),
            "trainable_elements": self.trainable_elements,
            "frozen_elements": self.frozen_elements,
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "buffers": self.buffers,
            "transient": self.transient,
            "peak": self.peak,
        }


@dataclass(frozen=True)
class MemoryPlan:
    """What each freeze state of a run will hold in memory, per rank, before launching it.

    Attributes:
        model: A description of the model.
        input_shape: The per-rank batch shape the activations were measured at.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd-momentum"`` or ``"sgd"``.
        precision: ``"fp32"``, ``"bf16-mixed"``, ``"fp16-mixed"``, ``"bf16"`` or
            ``"bf16-master"``.
        sharding: ``"none"``, ``"ddp"``, ``"fsdp"``, ``"zero1"``, ``"zero2"``, ``"zero3"``.
        world_size: Ranks.
        phases: One :class:`MemoryPhase` per freeze state, nothing frozen first.
        notes: The assumptions behind the numbers.
    """

    model: str
    input_shape: tuple[int, ...]
    optimizer: str
    precision: str
    sharding: str
    world_size: int
    phases: tuple[MemoryPhase, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "optimizer": self.optimizer,
            "precision": self.precision,
            "sharding": self.sharding,
            "world_size": self.world_size,
            "phases": [p.to_dict() for p in self.phases],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """The plan as JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
