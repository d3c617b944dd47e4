"""A memory plan: what each freeze state will hold per rank, before launching the run.

Parameters, gradients and optimizer state follow from element counts, a precision, an
optimizer and a sharding; activations are *measured*: one forward per freeze state on a
copy of the model on fake CPU tensors (shapes only: no memory, no arithmetic), with
:class:`~freezesched.profiling.SavedTensorMeter` counting what autograd keeps. A model
built on the ``meta`` device (``with torch.device("meta"): model = build()``) is planned
without allocating anything, so a 1-billion-parameter ViT at 1024x1024 takes seconds.

Per rank, with ``T`` trainable and ``F`` frozen elements, ``N`` ranks and the bytes per
element of the precision (weight ``w``, gradient ``g``, fp32 master copy ``m``, optimizer
state ``s`` times the number of state tensors ``k``: 2 for Adam(W), 1 for SGD with
momentum):

============  ==========  ==========  ================  ===================================
sharding      weights     gradients   optimizer         buffers
============  ==========  ==========  ================  ===================================
none          (T+F) w     T g         T (m + k s)       0
ddp           (T+F) w     T g         T (m + k s)       T g (gradient buckets)
zero1         (T+F) w     T g         T (m + k s) / N   reduce bucket
zero2         (T+F) w     T g / N     T (m + k s) / N   reduce bucket
zero3, fsdp   (T+F) w / N T g / N     T (m + k s) / N   2 gathered units + 1 unit's grads
============  ==========  ==========  ================  ===================================

Frozen parameters hold weights only (no gradient, no optimizer state: they have had no
gradient since the optimizer was built). The peak is ``weights + optimizer + buffers +
max(activations + 2 x the largest saved activation, gradients + step temporaries)``:
activations are freed as the backward produces gradients, and the optimizer step
allocates temporaries (``foreach``: one tensor per trainable element; ``for-loop``: two
of the largest parameter; ``fused``: none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import nn

from freezesched._validation import check_choice, check_int, describe
from freezesched.freezing import freeze
from freezesched.profiling._memory import SavedTensorMeter
from freezesched.profiling._projection import _FakeCPU, default_loss
from freezesched.profiling._record import MemoryPhase, MemoryPlan

__all__ = ["OptimizerKind", "Precision", "Sharding", "StepImpl", "plan_memory"]

Sharding = Literal["none", "ddp", "fsdp", "zero1", "zero2", "zero3"]
Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16", "bf16-master"]
OptimizerKind = Literal["adamw", "adam", "sgd-momentum", "sgd"]
StepImpl = Literal["foreach", "for-loop", "fused"]

SHARDINGS: tuple[str, ...] = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")
#: weight, gradient, master-copy and optimizer-state bytes per element; compute dtype;
#: whether the compute dtype comes from autocast (True) or the weights themselves.
PRECISIONS: dict[str, tuple[int, int, int, int, torch.dtype, bool]] = {
    "fp32": (4, 4, 0, 4, torch.float32, False),
    "bf16-mixed": (4, 4, 0, 4, torch.bfloat16, True),
    "fp16-mixed": (4, 4, 0, 4, torch.float16, True),
    "bf16": (2, 2, 0, 2, torch.bfloat16, False),
    "bf16-master": (2, 2, 4, 4, torch.bfloat16, False),
}
#: Optimizer state tensors per parameter.
OPTIMIZERS: dict[str, int] = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
STEP_IMPLS: tuple[str, ...] = ("foreach", "for-loop", "fused")
#: DeepSpeed's default ``reduce_bucket_size`` (elements), ZeRO-1/2's gradient bucket.
ZERO_REDUCE_BUCKET = 500_000_000


def _stages(modules: Sequence[str | Sequence[str]]) -> list[tuple[str, ...]]:
    if isinstance(modules, str) or not isinstance(modules, Sequence) or not modules:
        raise TypeError(
            "modules must be a non-empty sequence of stages, each a submodule name or a "
            f"sequence of names, front first; got {describe(modules)}"
        )
    out = []
    for i, stage in enumerate(modules):
        names = (stage,) if isinstance(stage, str) else tuple(stage)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"modules[{i}] must be a name or a sequence of names, got {stage!r}")
        out.append(names)
    return out


def _units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks a per-block FSDP / ZeRO-3 wrapping would gather one at a time.

    The children of the ``ModuleList`` / ``Sequential`` holding the most parameters;
    the whole model if it has none.
    """
    best: list[nn.Module] = [model]
    best_size = -1
    for module in model.modules():
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def _shard(numel: int, shape: torch.Size, world: int, per_tensor: bool) -> int:
    """Elements of the largest shard: FSDP shards each tensor on dim 0 (padded)."""
    if world == 1:
        return numel
    if per_tensor and len(shape) > 0:
        rest = numel // shape[0] if shape[0] else 0
        return math.ceil(shape[0] / world) * rest
    return math.ceil(numel / world)


def plan_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    modules: Sequence[str | Sequence[str]],
    *,
    optimizer: OptimizerKind = "adamw",
    precision: Precision = "fp32",
    sharding: Sharding = "none",
    world_size: int = 1,
    step: StepImpl = "foreach",
    loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    label: str = "",
) -> MemoryPlan:
    """Plan the memory per rank of every freeze state, without training or allocating.

    Phases: nothing frozen; then, front first, the first stage frozen, the first two,
    ..., all of them (one ``"frozen"`` phase for a single stage). Build big models on the
    meta device; the model itself is never changed.

    Args:
        model: The model (``model(torch.empty(input_shape))`` must run).
        input_shape: The batch each rank runs, e.g. ``(2, 3, 1024, 1024)``.
        modules: The stages that freeze, front first: each a dotted submodule name or a
            sequence of names frozen together.
        optimizer: ``"adamw"`` / ``"adam"`` (2 state tensors), ``"sgd-momentum"`` (1) or
            ``"sgd"`` (none).
        precision: ``"fp32"``; ``"bf16-mixed"`` / ``"fp16-mixed"`` (fp32 weights,
            autocast); ``"bf16"`` (everything bf16); ``"bf16-master"`` (bf16 weights and
            gradients, fp32 master copy and state: DeepSpeed's bf16 mode).
        sharding: ``"none"``, ``"ddp"``, ``"fsdp"`` (per-parameter sharding, one unit per
            repeated block), ``"zero1"``, ``"zero2"``, ``"zero3"``.
        world_size: Ranks the sharding spreads over.
        step: The optimizer implementation, for its temporaries: ``"foreach"`` (the CUDA
            default), ``"for-loop"`` (the CPU default) or ``"fused"``.
        loss_fn: Turns the output into a scalar (only to count what the forward saves).
        label: A description of the model for the record.

    Returns:
        The plan, one :class:`~freezesched.profiling.MemoryPhase` per freeze state.

    Raises:
        TypeError: ``model`` is not a module, or ``modules`` / ``input_shape`` malformed.
        ValueError: an unknown choice, ``world_size`` < 1, or a name the model lacks.

    Examples:
        >>> from torch import nn
        >>> with torch.device("meta"):
        ...     net = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
        >>> plan = plan_memory(net, (8, 1000), ["0"], optimizer="adamw")
        >>> [(p.label, p.weights, p.gradients, p.optimizer) for p in plan.phases]
        [('trainable', 4044040, 4044040, 8088096), ('frozen', 4044040, 40040, 80088)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {describe(model)}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    stages = _stages(modules)
    optimizer = check_choice(optimizer, "optimizer", list(OPTIMIZERS))  # type: ignore[assignment]
    precision = check_choice(precision, "precision", list(PRECISIONS))  # type: ignore[assignment]
    sharding = check_choice(sharding, "sharding", SHARDINGS)  # type: ignore[assignment]
    step = check_choice(step, "step", STEP_IMPLS)  # type: ignore[assignment]
    world = check_int(world_size, "world_size", minimum=1)
    if sharding == "none" and world != 1:
        raise ValueError(f"world_size must be 1 with sharding='none', got {world}")
    for stage in stages:
        for name in stage:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"modules must name submodules of the model; it has none called {name!r}"
                ) from None
    phases = [MemoryPhaseSpec("trainable", ())]
    if len(stages) == 1:
        phases.append(MemoryPhaseSpec("frozen", stages[0]))
    else:
        for k in range(1, len(stages) + 1):
            label_k = "stage 1 frozen" if k == 1 else f"stages 1-{k} frozen"
            phases.append(MemoryPhaseSpec(label_k, tuple(n for s in stages[:k] for n in s)))
    out = tuple(
        _phase(model, shape, spec, optimizer, precision, sharding, world, step, loss_fn)
        for spec in phases
    )
    notes = (
        "per rank; activations measured on fake tensors at the given per-rank batch",
        "frozen parameters: weights only (no gradient, no optimizer state)",
    )
    return MemoryPlan(
        model=label or type(model).__name__,
        input_shape=shape,
        optimizer=optimizer,
        precision=precision,
        sharding=sharding,
        world_size=world,
        phases=out,
        notes=notes,
    )


class MemoryPhaseSpec:
    """A phase to plan: its label and the modules frozen in it."""

    def __init__(self, label: str, frozen: tuple[str, ...]) -> None:
        self.label = label
        self.frozen = frozen


def _phase(
    model: nn.Module,
    shape: tuple[int, ...],
    spec: MemoryPhaseSpec,
    optimizer: str,
    precision: str,
    sharding: str,
    world: int,
    step: str,
    loss_fn: Callable[[Any], torch.Tensor],
) -> MemoryPhase:
    w, g, m, s, dtype, autocast = PRECISIONS[precision]
    k = OPTIMIZERS[optimizer]
    shard_weights = sharding in ("fsdp", "zero3")
    shard_grads = sharding in ("fsdp", "zero2", "zero3")
    shard_state = sharding in ("fsdp", "zero1", "zero2", "zero3")
    per_tensor = sharding == "fsdp"
    fake = _FakeCPU(model)
    if not autocast and dtype != torch.float32:
        fake.meta = fake.meta.to(dtype)  # on the meta copy: fake tensors cannot be cast
    with fake as work:
        work.train()
        with freeze(work, list(spec.frozen)) if spec.frozen else nullcontext():
            params = list(work.parameters())
            trainable = [p for p in params if p.requires_grad]
            frozen = [p for p in params if not p.requires_grad]
            t_all = sum(p.numel() for p in trainable)
            f_all = sum(p.numel() for p in frozen)

            def local(ps: Sequence[torch.Tensor], sharded: bool) -> int:
                if not sharded:
                    return sum(p.numel() for p in ps)
                if per_tensor:
                    return sum(_shard(p.numel(), p.shape, world, True) for p in ps)
                return _shard(sum(p.numel() for p in ps), torch.Size(), world, False)

            weights = (local(trainable, shard_weights) + local(frozen, shard_weights)) * w
            t_grad = local(trainable, shard_grads)
            gradients = t_grad * g
            t_state = local(trainable, shard_state)
            steps = len(trainable) * 4 if optimizer in ("adam", "adamw") else 0
            optimizer_bytes = t_state * (m + k * s) + steps
            activations, largest = _saved(work, shape, dtype, autocast, loss_fn, params)
            buffers = 0
            if sharding == "ddp":
                buffers = t_all * g
            elif sharding in ("zero1", "zero2"):
                buffers = min(t_all, ZERO_REDUCE_BUCKET) * g
            elif sharding in ("fsdp", "zero3") and world > 1:
                units = [list(u.parameters()) for u in _units(work)]
                gathered = max((sum(p.numel() for p in u) for u in units), default=0)
                trained = max(
                    (sum(p.numel() for p in u if p.requires_grad) for u in units), default=0
                )
                compute = torch.finfo(dtype).bits // 8
                buffers = 2 * gathered * compute + trained * g
            if step == "foreach":
                step_temp = t_state * s
            elif step == "for-loop":
                biggest = max((p.numel() for p in trainable), default=0)
                step_temp = 2 * _shard(biggest, torch.Size(), world if shard_state else 1, False)
                step_temp *= s
            else:
                step_temp = 0
            backward_temp = 2 * largest
    variable = max(activations + backward_temp, gradients + step_temp)
    transient = variable - (activations if activations + backward_temp >= gradients + step_temp
                            else gradients)  # fmt: skip
    return MemoryPhase(
        label=spec.label,
        frozen_modules=spec.frozen,
        trainable_elements=t_all,
        frozen_elements=f_all,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer_bytes,
        activations=activations,
        buffers=buffers,
        transient=transient,
        peak=weights + optimizer_bytes + buffers + variable,
    )


def _saved(
    work: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    autocast: bool,
    loss_fn: Callable[[Any], torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[int, int]:
    """Bytes autograd saves in one forward (parameters excluded) and the largest storage."""
    x = torch.empty(shape, dtype=torch.float32 if autocast else dtype)
    context: AbstractContextManager[Any] = (
        torch.autocast("cpu", dtype=dtype) if autocast else nullcontext()
    )
    with context, SavedTensorMeter(exclude=params) as meter:
        loss_fn(work(x))
    return meter.bytes, meter.largest
