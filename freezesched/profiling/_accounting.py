r"""The DBF paper's Eq. 1: training FLOPs over a whole schedule, and what freezing saves.

.. math::
    F_\text{total} = \sum_{e=1}^{E} \sum_{n=1}^{N} \sum_{l=1}^{L}
        \left( F_\text{forward}(e, l) + F_\text{backward}(e, l) \right)

Two conventions for :math:`F_\text{backward}`:

* **paper**: twice the forward FLOPs of every trainable layer, zero for frozen layers
  (the paper's assumption);
* **measured**: what autograd actually ran, counted at dispatch level. It differs from
  the paper's: the first convolution needs no input gradient (a full ResNet-50 step's
  backward is 1.971x its forward, not 2x), and a frozen layer *behind* a trainable one
  still costs its input gradient.

The cost of a step depends only on the freeze state (one decision per scheduled module),
so a run is accounted by measuring each distinct state once, per sample, and multiplying
by how many samples were trained in it. ``ΔF`` is against full training (every module
trainable).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from freezesched.freezing import FrozenStageGuard
from freezesched.freezing._targets import ScheduleLike, check_schedule
from freezesched.profiling._flops import FlopCount, FlopProfiler, StepFlops
from freezesched.profiling._report import Format, render_table
from freezesched.schedules import Schedule, check_tick

__all__ = [
    "PolicyCost",
    "StateCost",
    "default_loss",
    "measure_state_cost",
    "policy_table",
    "project",
    "project_policies",
]

State = tuple[bool, ...]


@dataclass(frozen=True)
class StateCost:
    """FLOPs of one training step in one freeze state, **per sample**.

    Attributes:
        state: One decision per scheduled module (``True`` = frozen).
        measured: What autograd ran, per sample.
        frozen_forward: Forward FLOPs of the frozen modules, per sample.
    """

    state: State
    measured: FlopCount
    frozen_forward: int

    @classmethod
    def from_step(
        cls, state: State, step: StepFlops, frozen: Sequence[str], batch_size: int
    ) -> StateCost:
        """The per-sample cost of one counted step of ``batch_size`` samples.

        Args:
            state: The step's freeze decisions.
            step: What :class:`FlopProfiler` counted for the whole step.
            frozen: Names of the frozen modules (relative to the profiled model).
            batch_size: Samples in the step.
        """
        return cls(
            state=tuple(state),
            measured=step.total.scaled(1 / batch_size),
            frozen_forward=round(step.forward_of(list(frozen)) / batch_size) if frozen else 0,
        )

    @property
    def paper(self) -> int:
        """Per-sample FLOPs in the paper's convention: forward + 2 x trainable forward."""
        return self.measured.forward + 2 * (self.measured.forward - self.frozen_forward)

    @property
    def full_training_paper(self) -> int:
        """Per-sample FLOPs of full training in the paper's convention: 3 x forward."""
        return 3 * self.measured.forward


def default_loss(output: Any) -> torch.Tensor:
    """Sum of every floating-point tensor in ``output`` (tensors, tuples, lists, dicts).

    Any scalar works for counting FLOPs: the backward's cost does not depend on the
    loss value, only on which tensors need gradients.
    """
    if isinstance(output, torch.Tensor):
        return output.float().sum() if output.is_floating_point() else output.new_zeros(())
    items = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(items, list | tuple) and items:
        terms = [default_loss(x) for x in items]
        return sum((t.to(terms[0].device) for t in terms[1:]), terms[0])
    raise TypeError(f"default_loss cannot sum an output of type {type(output).__name__}")


def _as_input(example: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(example, torch.Tensor):
        return example.to(device)
    shape = tuple(int(s) for s in example)
    return torch.empty(shape, device=device) if device.type == "meta" else torch.randn(shape)


def measure_state_cost(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    modules: Sequence[str],
    state: State,
    *,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    device: str | torch.device = "meta",
) -> StateCost:
    """Count one training step of ``model`` with ``modules`` frozen as ``state`` says.

    By default the step runs on the ``meta`` device: shapes only, no arithmetic, so even
    a ResNet-50 at 1024x1024 is counted in a fraction of a second and the model is left
    untouched (a meta copy is used).

    Args:
        model: The model; ``model(example_input)`` must run.
        example_input: A batch, or its shape (the batch size is its first dimension).
        modules: Dotted names of the scheduled submodules.
        state: One decision per name (``True`` = frozen), or one for all.
        loss_fn: Turns the model's output into a scalar to call ``backward`` on.
        device: ``"meta"`` (default) or a real device to run on a copy there.

    Returns:
        The per-sample cost.

    Raises:
        ValueError: ``state`` does not have one decision per module (or a single one).
    """
    if len(state) not in (1, len(modules)):
        raise ValueError(
            f"state must hold 1 or len(modules) = {len(modules)} decisions, got {len(state)}"
        )
    device = torch.device(device)
    work = copy.deepcopy(model).to(device)
    targets = [work.get_submodule(name) for name in modules]
    decisions = state * len(modules) if len(state) == 1 else state
    x = _as_input(example_input, device)
    batch = x.shape[0] if x.dim() else 1
    work.train()
    guard = FrozenStageGuard(lambda t: decisions)
    with guard(targets, 0), FlopProfiler(work) as prof:
        torch.autograd.backward(loss_fn(work(x)))
    result = prof.result
    frozen = [name for name, f in zip(modules, decisions, strict=True) if f]
    return StateCost.from_step(tuple(decisions), result, frozen, batch)


def _states(schedule: ScheduleLike, epochs: int, num_modules: int) -> np.ndarray:
    """Decisions per tick as an array of shape ``(epochs, num_modules)``."""
    if isinstance(schedule, Schedule):
        line = schedule.timeline(epochs)
    else:
        line = np.array([schedule(t) for t in range(epochs)], dtype=np.bool_)
    line = line.reshape(epochs, -1)
    if line.shape[1] == 1 and num_modules > 1:
        line = np.repeat(line, num_modules, axis=1)
    if line.shape[1] != num_modules:
        raise ValueError(
            f"the schedule decides for {line.shape[1]} stages but {num_modules} modules were given"
        )
    return line


@dataclass(frozen=True)
class PolicyCost:
    """Eq. 1 for one policy over a whole run, and its ΔF against full training.

    FLOPs are totals over the run; TFLOPs are ``FLOPs / 1e12``.
    """

    policy: str
    schedule: str
    epochs: int
    samples_per_epoch: int
    frozen_epochs: float
    flops_paper: int
    flops_measured: int
    delta_flops_paper: int
    delta_flops_measured: int

    @property
    def tflops_paper(self) -> float:
        """Total TFLOPs, paper convention."""
        return self.flops_paper / 1e12

    @property
    def tflops_measured(self) -> float:
        """Total TFLOPs, measured convention."""
        return self.flops_measured / 1e12

    @property
    def delta_tflops_paper(self) -> float:
        """ΔTFLOPs against full training, paper convention."""
        return self.delta_flops_paper / 1e12

    @property
    def delta_tflops_measured(self) -> float:
        """ΔTFLOPs against full training, measured convention."""
        return self.delta_flops_measured / 1e12


def project(
    costs: Mapping[State, StateCost],
    schedule: ScheduleLike,
    *,
    epochs: int,
    samples_per_epoch: int,
    num_modules: int,
    policy: str = "",
) -> PolicyCost:
    r"""Eq. 1 for ``schedule`` from per-state costs: arithmetic only, no model.

    :math:`F_\text{total} = N \sum_e f(\text{state}(e))`, with ``f`` the per-sample cost
    of the state the schedule is in at epoch ``e``; the full-training baseline uses the
    all-trainable state. 1,600 epochs take well under a millisecond.

    Args:
        costs: Per-sample cost of every state the schedule visits, and of the
            all-trainable state (see :func:`measure_state_cost`).
        schedule: The policy's schedule; its tick is the epoch.
        epochs: Number of epochs ``E``.
        samples_per_epoch: Training samples per epoch ``N``.
        num_modules: Number of scheduled modules.
        policy: A label for the row.

    Raises:
        KeyError: a visited state (or the all-trainable one) has no cost.
    """
    epochs = check_tick(epochs, "epochs")
    samples_per_epoch = check_tick(samples_per_epoch, "samples_per_epoch")
    check_schedule(schedule)
    line = _states(schedule, epochs, num_modules)
    baseline = (False,) * num_modules
    needed = {baseline} | {tuple(bool(x) for x in row) for row in np.unique(line, axis=0)}
    missing = sorted(s for s in needed if s not in costs)
    if missing:
        raise KeyError(f"no per-sample cost for freeze states {missing}; measure them first")
    counts: dict[State, int] = {}
    for row, n in zip(*np.unique(line, axis=0, return_counts=True), strict=True):
        counts[tuple(bool(x) for x in row)] = int(n)
    paper = sum(n * costs[s].paper for s, n in counts.items()) * samples_per_epoch
    measured = sum(n * costs[s].measured.total for s, n in counts.items()) * samples_per_epoch
    full_paper = epochs * samples_per_epoch * costs[baseline].paper
    full_measured = epochs * samples_per_epoch * costs[baseline].measured.total
    return PolicyCost(
        policy=policy,
        schedule=repr(schedule),
        epochs=epochs,
        samples_per_epoch=samples_per_epoch,
        frozen_epochs=float(line.mean(axis=1).sum()),
        flops_paper=paper,
        flops_measured=measured,
        delta_flops_paper=paper - full_paper,
        delta_flops_measured=measured - full_measured,
    )


def cumulative_flops(
    costs: Mapping[State, StateCost],
    schedule: ScheduleLike,
    *,
    epochs: int,
    samples_per_epoch: int,
    num_modules: int,
    convention: Literal["measured", "paper"] = "measured",
) -> np.ndarray:
    """Training FLOPs accumulated by the end of each epoch (Eq. 1, epoch by epoch).

    Args:
        costs: Per-sample cost of every state the schedule visits.
        schedule: The policy's schedule; its tick is the epoch.
        epochs: Number of epochs.
        samples_per_epoch: Training samples per epoch.
        num_modules: Number of scheduled modules.
        convention: ``"measured"`` (what autograd ran) or ``"paper"``.

    Returns:
        An int64 array of length ``epochs``; its last entry is :func:`project`'s total.

    Raises:
        KeyError: a visited state has no cost.
        ValueError: unknown convention.

    Examples:
        >>> from freezesched import Step
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        >>> costs = measure_policy_costs(net, (4, 8), "0", [Step(2)], epochs=4)
        >>> cumulative_flops(costs, Step(2), epochs=4, samples_per_epoch=100,
        ...                  num_modules=1).tolist()  # 352 FLOPs/sample trainable, 192 frozen
        [35200, 54400, 89600, 108800]
    """
    if convention not in ("measured", "paper"):
        raise ValueError(f"convention must be 'measured' or 'paper', got {convention!r}")
    epochs = check_tick(epochs, "epochs")
    line = _states(schedule, epochs, num_modules)
    per_epoch = []
    for row in line:
        state = tuple(bool(x) for x in row)
        if state not in costs:
            raise KeyError(f"no per-sample cost for freeze state {state}; measure it first")
        cost = costs[state]
        per_epoch.append(cost.measured.total if convention == "measured" else cost.paper)
    return np.cumsum(np.asarray(per_epoch, dtype=np.int64) * samples_per_epoch)


def measure_policy_costs(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    modules: str | Sequence[str],
    schedules: Iterable[ScheduleLike],
    *,
    epochs: int,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    device: str | torch.device = "meta",
) -> dict[State, StateCost]:
    """Measure, once each, every freeze state the schedules visit (and all-trainable).

    Args:
        model: The model (left untouched; counted on a copy).
        example_input: A batch or its shape.
        modules: Dotted name(s) of the scheduled submodule(s).
        schedules: The schedules (tick = epoch).
        epochs: Epochs per run.
        loss_fn: Output -> scalar loss.
        device: Where to count (``"meta"``: no arithmetic).

    Returns:
        Per-sample cost by state, ready for :func:`project` and :func:`cumulative_flops`.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    epochs = check_tick(epochs, "epochs")
    states = {(False,) * len(names)}
    for schedule in schedules:
        line = _states(schedule, epochs, len(names))
        states |= {tuple(bool(x) for x in row) for row in np.unique(line, axis=0)}
    return {
        s: measure_state_cost(model, example_input, names, s, loss_fn=loss_fn, device=device)
        for s in sorted(states)
    }


def project_policies(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    modules: str | Sequence[str],
    policies: Mapping[str, ScheduleLike],
    *,
    epochs: int,
    samples_per_epoch: int,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    device: str | torch.device = "meta",
) -> list[PolicyCost]:
    """Eq. 1 and ΔF for several policies, measuring each distinct freeze state once.

    Args:
        model: The model (left untouched; counted on a copy).
        example_input: A batch or its shape.
        modules: Dotted name(s) of the scheduled submodule(s).
        policies: Label -> schedule (tick = epoch).
        epochs: Epochs per run.
        samples_per_epoch: Training samples per epoch.
        loss_fn: Output -> scalar loss.
        device: Where to count (``"meta"``: no arithmetic).

    Returns:
        One :class:`PolicyCost` per policy, in order.

    Examples:
        >>> from freezesched import Step
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        >>> rows = project_policies(net, (4, 8), "0", {"full": Step(1), "DBF": Step(2)},
        ...                         epochs=10, samples_per_epoch=100)
        >>> [(r.policy, r.frozen_epochs, r.delta_flops_paper) for r in rows]
        [('full', 0.0, 0), ('DBF', 5.0, -128000)]
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    costs = measure_policy_costs(
        model, example_input, names, policies.values(), epochs=epochs, loss_fn=loss_fn,
        device=device,
    )  # fmt: skip
    return [
        project(
            costs,
            schedule,
            epochs=epochs,
            samples_per_epoch=samples_per_epoch,
            num_modules=len(names),
            policy=label,
        )
        for label, schedule in policies.items()
    ]


POLICY_COLUMNS = [
    ("policy", "policy"),
    ("frozen_epochs", "frozen epochs"),
    ("tflops_paper", "TFLOPs (paper)"),
    ("delta_tflops_paper", "ΔTFLOPs (paper)"),
    ("tflops_measured", "TFLOPs (measured)"),
    ("delta_tflops_measured", "ΔTFLOPs (measured)"),
    ("schedule", "schedule"),
]


def policy_table(rows: Sequence[PolicyCost], fmt: Format = "text") -> str:
    """Table II-style comparison of policies (totals over the run; ``TFLOPs = 1e12 FLOPs``).

    Examples:
        >>> row = PolicyCost("DBF", "Step(rho=2)", 10, 100, 5.0, 3 * 10**12, 4 * 10**12,
        ...                  -10**12, -10**12)
        >>> print(policy_table([row], "csv").splitlines()[1])
        DBF,5,3.0,-1.0,4.0,-1.0,Step(rho=2)
    """
    records = [
        {
            "policy": r.policy,
            "frozen_epochs": int(r.frozen_epochs)
            if float(r.frozen_epochs).is_integer()
            else r.frozen_epochs,
            "tflops_paper": r.tflops_paper,
            "delta_tflops_paper": r.delta_tflops_paper,
            "tflops_measured": r.tflops_measured,
            "delta_tflops_measured": r.delta_tflops_measured,
            "schedule": r.schedule,
        }
        for r in rows
    ]
    return render_table(records, POLICY_COLUMNS, fmt)
