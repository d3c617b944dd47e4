"""Eq. 1 over a whole schedule without training: count each freeze state once, multiply.

The cost of a step depends only on the freeze state (one decision per scheduled module),
so a run is projected by counting each distinct state once, per sample (on the ``meta``
device: shapes only, no arithmetic) and multiplying by the samples trained in it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from freezesched._validation import check_int, check_tick, describe
from freezesched.freezing import freeze
from freezesched.profiling._flops import FlopProfiler, StepFlops
from freezesched.profiling._record import PhaseCost, RunCost, StepCost
from freezesched.schedules import Schedule, ScheduleLike, check_schedule, timeline

__all__ = [
    "FrozenMiddleWarning",
    "State",
    "cumulative_flops",
    "default_loss",
    "measure_policy_costs",
    "measure_state_cost",
    "middle_stage_note",
    "project",
    "project_policies",
]

#: One decision per scheduled module (``True`` = frozen).
State = tuple[bool, ...]


class FrozenMiddleWarning(UserWarning):
    """A frozen module still computes input gradients because something before it trains."""


def default_loss(output: Any) -> torch.Tensor:
    """Sum of every floating-point tensor in ``output`` (tensors, tuples, lists, dicts).

    Any scalar works for counting FLOPs: the backward's cost does not depend on the
    loss value, only on which tensors need gradients.

    Raises:
        TypeError: ``output`` holds no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output.float().sum() if output.is_floating_point() else output.new_zeros(())
    items = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(items, list | tuple) and items:
        terms = [default_loss(x) for x in items]
        return sum((t.to(terms[0].device) for t in terms[1:]), terms[0])
    raise TypeError(f"default_loss cannot sum an output of type {type(output).__name__}")


def middle_stage_note(
    step: StepFlops, frozen: Sequence[str], model: nn.Module, batch_size: int = 1
) -> str | None:
    """Say so when frozen modules still pass gradients back, and why; else ``None``.

    A frozen module computes no weight gradient, but when a module *before* it trains,
    the gradient must still flow through it to get there (a frozen "middle stage"): its
    input gradients cost about as much as its forward, half of the saving one expected.
    Call while the freeze is active (parameters' flags tell what trains).

    Args:
        step: The counted step.
        frozen: Names of the frozen modules.
        model: The profiled model.
        batch_size: Samples in the step (the note gives GFLOPs per sample).
    """
    backward = sum(
        c.backward
        for name, c in step.exclusive.items()
        if any(name == f or name.startswith(f + ".") or f == "" for f in frozen)
    )
    if not backward:
        return None
    first = min((step.call_order.index(f) for f in frozen if f in step.call_order), default=None)
    modules = dict(model.named_modules())
    upstream = [
        name
        for name in (step.call_order[:first] if first is not None else ())
        if name in modules
        and any(p.requires_grad for p in modules[name].parameters(recurse=False))
        and not any(name == f or name.startswith(f + ".") for f in frozen)
    ]
    shown = ", ".join(upstream[:6]) + (" ..." if len(upstream) > 6 else "")
    return (
        f"frozen {', '.join(frozen) or '(model)'} still compute(s) "
        f"{backward / batch_size / 1e9:.4g} GFLOPs/sample of input gradients, because "
        f"{shown or 'something before them'} train(s) upstream; freeze those too (e.g. the "
        "stem along with the stages) to save this as well"
    )


def _as_input(example: torch.Tensor | Sequence[int], fake: bool) -> torch.Tensor:
    if isinstance(example, torch.Tensor):
        return torch.empty(example.shape, dtype=example.dtype) if fake else example.clone()
    shape = tuple(int(s) for s in example)
    return torch.empty(shape) if fake else torch.randn(shape)


class _FakeCPU:
    """Shapes only, no memory, no arithmetic: a meta copy of the model on fake CPU tensors.

    Unlike plain meta tensors, fake CPU tensors take the CPU's kernel choices (fused
    attention, for one), so the counts equal those of a real CPU step.
    """

    def __init__(self, model: nn.Module) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.meta = copy.deepcopy(model).to("meta")

    def __enter__(self) -> nn.Module:
        self.mode.__enter__()
        try:
            return self.meta.to_empty(device="cpu")
        except BaseException:
            self.mode.__exit__(None, None, None)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.mode.__exit__(exc_type, exc, tb)


def measure_state_cost(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    modules: Sequence[str],
    state: State,
    *,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    device: str | torch.device = "meta",
    notes: list[str] | None = None,
) -> StepCost:
    """Count one training step of ``model`` with ``modules`` frozen as ``state`` says.

    By default (``device="meta"``) the step runs on a copy of the model on fake CPU
    tensors: shapes only, no memory and no arithmetic, so even a ResNet-50 at 1024x1024 is
    counted in about a second and the model is left untouched, while every op takes the
    kernel a CPU step would (fused attention included), so the counts equal a real CPU
    step's.

    Args:
        model: The model; ``model(example_input)`` must run.
        example_input: A batch, or its shape (the batch size is its first dimension).
        modules: Dotted names of the scheduled submodules.
        state: One decision per name (``True`` = frozen), or one for all.
        loss_fn: Turns the model's output into a scalar to call ``backward`` on.
        device: ``"meta"`` (default: fake CPU tensors) or a real device to run a copy on.
        notes: If given, a note is appended when frozen modules still pass gradients
            (see :func:`middle_stage_note`).

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
    decisions = tuple(state) * len(modules) if len(state) == 1 else tuple(state)
    frozen = [name for name, f in zip(modules, decisions, strict=True) if f]
    fake = device.type == "meta"
    with _FakeCPU(model) if fake else _Copy(model, device) as work:
        x = _as_input(example_input, fake).to("cpu" if fake else device)
        batch = x.shape[0] if x.dim() else 1
        work.train()
        with freeze(work, frozen) if frozen else _nothing():
            with FlopProfiler(work) as prof:
                torch.autograd.backward(loss_fn(work(x)))
            step = prof.result
            note = middle_stage_note(step, frozen, work, batch) if frozen else None
    if notes is not None:
        for text in (*step.notes, *(() if note is None else (note,))):
            if text not in notes:
                notes.append(text)
    return StepCost.from_step(frozen, step, batch)


class _Copy:
    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.work = copy.deepcopy(model).to(device)

    def __enter__(self) -> nn.Module:
        return self.work

    def __exit__(self, *exc: object) -> None:
        return None


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _states(schedule: ScheduleLike, epochs: int, num_modules: int) -> np.ndarray:
    return timeline(schedule, epochs, stages=num_modules)


def _label(schedule: ScheduleLike) -> str:
    if isinstance(schedule, Schedule):
        return schedule.summary()
    return getattr(schedule, "__name__", type(schedule).__name__)


def project(
    costs: Mapping[State, StepCost],
    schedule: ScheduleLike,
    *,
    epochs: int,
    samples_per_epoch: int,
    num_modules: int,
    policy: str = "",
    notes: Sequence[str] = (),
) -> RunCost:
    r"""Eq. 1 for ``schedule`` from per-state costs: arithmetic only, no model.

    :math:`F_\text{total} = N \sum_e f(\text{state}(e))`, with ``f`` the per-sample cost
    of the state the schedule is in at epoch ``e``; the full-training baseline uses the
    all-trainable state. 1,600 epochs take well under a millisecond.

    Args:
        costs: Per-sample cost of every state the schedule visits, and of the
            all-trainable state (see :func:`measure_policy_costs`).
        schedule: The policy's schedule; its tick is the epoch.
        epochs: Number of epochs ``E``.
        samples_per_epoch: Training samples per epoch ``N``.
        num_modules: Number of scheduled modules.
        policy: A label for the row.
        notes: Notes to carry into the record.

    Raises:
        KeyError: a visited state (or the all-trainable one) has no cost.
    """
    epochs = check_tick(epochs, "epochs")
    samples_per_epoch = check_tick(samples_per_epoch, "samples_per_epoch")
    check_schedule(schedule)
    line = _states(schedule, epochs, num_modules)
    baseline = (False,) * num_modules
    rows, counts = np.unique(line, axis=0, return_counts=True)
    visited = {tuple(bool(x) for x in row): int(n) for row, n in zip(rows, counts, strict=True)}
    missing = sorted(s for s in {baseline, *visited} if s not in costs)
    if missing:
        raise KeyError(f"no per-sample cost for freeze states {missing}; measure them first")
    phases = tuple(
        PhaseCost(
            frozen_modules=costs[state].frozen_modules,
            samples=ticks * samples_per_epoch,
            cost=costs[state],
            ticks=ticks,
        )
        for state, ticks in sorted(visited.items())
    )
    return RunCost(
        label=policy,
        schedule=_label(schedule),
        phases=phases,
        full_training=costs[baseline],
        ticks=epochs,
        frozen_ticks=float(line.mean(axis=1).sum()) if epochs else 0.0,
        notes=tuple(notes),
    )


def cumulative_flops(
    costs: Mapping[State, StepCost],
    schedule: ScheduleLike,
    *,
    epochs: int,
    samples_per_epoch: int,
    num_modules: int,
    convention: Literal["measured", "2x"] = "measured",
) -> np.ndarray:
    """Training FLOPs accumulated by the end of each epoch (Eq. 1, epoch by epoch).

    Args:
        costs: Per-sample cost of every state the schedule visits.
        schedule: The policy's schedule; its tick is the epoch.
        epochs: Number of epochs.
        samples_per_epoch: Training samples per epoch.
        num_modules: Number of scheduled modules.
        convention: ``"measured"`` (what autograd ran) or ``"2x"``.

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
    if convention not in ("measured", "2x"):
        raise ValueError(f"convention must be 'measured' or '2x', got {describe(convention)}")
    epochs = check_tick(epochs, "epochs")
    per_epoch = []
    for row in _states(schedule, epochs, num_modules):
        state = tuple(bool(x) for x in row)
        if state not in costs:
            raise KeyError(f"no per-sample cost for freeze state {state}; measure it first")
        cost = costs[state]
        per_epoch.append(cost.measured if convention == "measured" else cost.flops_2x)
    return np.cumsum(np.asarray(per_epoch, dtype=np.int64) * samples_per_epoch)


def _names(modules: str | Sequence[str]) -> list[str]:
    names = [modules] if isinstance(modules, str) else list(modules)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"modules must be a dotted name or a list of names, got {describe(modules)}"
        )
    return names


def measure_policy_costs(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    modules: str | Sequence[str],
    schedules: Iterable[ScheduleLike],
    *,
    epochs: int,
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    device: str | torch.device = "meta",
    notes: list[str] | None = None,
) -> dict[State, StepCost]:
    """Measure, once each, every freeze state the schedules visit (and all-trainable).

    Args:
        model: The model (left untouched; counted on a copy).
        example_input: A batch or its shape.
        modules: Dotted name(s) of the scheduled submodule(s).
        schedules: The schedules (tick = epoch).
        epochs: Epochs per run.
        loss_fn: Output -> scalar loss.
        device: Where to count (``"meta"``: fake CPU tensors, no arithmetic).
        notes: Collects notes about the counts (see :func:`middle_stage_note`).

    Returns:
        Per-sample cost by state, ready for :func:`project` and :func:`cumulative_flops`.
    """
    names = _names(modules)
    epochs = check_int(epochs, "epochs", minimum=1)
    states = {(False,) * len(names)}
    for schedule in schedules:
        line = _states(schedule, epochs, len(names))
        states |= {tuple(bool(x) for x in row) for row in np.unique(line, axis=0)}
    return {
        s: measure_state_cost(
            model, example_input, names, s, loss_fn=loss_fn, device=device, notes=notes
        )
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
) -> list[RunCost]:
    """Eq. 1 and ΔF for several policies, measuring each distinct freeze state once.

    When a frozen module still computes input gradients because something before it
    trains, a :class:`FrozenMiddleWarning` says so once, and every record carries the
    note.

    Args:
        model: The model (left untouched; counted on a copy).
        example_input: A batch or its shape.
        modules: Dotted name(s) of the scheduled submodule(s).
        policies: Label -> schedule (tick = epoch).
        epochs: Epochs per run.
        samples_per_epoch: Training samples per epoch.
        loss_fn: Output -> scalar loss.
        device: Where to count (``"meta"``: fake CPU tensors, no arithmetic).

    Returns:
        One :class:`~freezesched.profiling.RunCost` per policy, in order.

    Examples:
        >>> from freezesched import Step
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        >>> rows = project_policies(net, (4, 8), "0", {"full": Step(1), "DBF": Step(2)},
        ...                         epochs=10, samples_per_epoch=100)
        >>> [(r.label, r.frozen_ticks, r.delta_flops_2x) for r in rows]
        [('full', 0.0, 0), ('DBF', 5.0, -128000)]
    """
    names = _names(modules)
    notes: list[str] = []
    costs = measure_policy_costs(
        model, example_input, names, policies.values(), epochs=epochs, loss_fn=loss_fn,
        device=device, notes=notes,
    )  # fmt: skip
    for note in notes:
        warnings.warn(note, FrozenMiddleWarning, stacklevel=2)
    return [
        project(
            costs,
            schedule,
            epochs=epochs,
            samples_per_epoch=samples_per_epoch,
            num_modules=len(names),
            policy=label,
            notes=notes,
        )
        for label, schedule in policies.items()
    ]
