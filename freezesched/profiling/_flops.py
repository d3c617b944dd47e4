"""FLOPs actually executed in a step, forward and backward, per module, at dispatch level.

Built on :class:`torch.utils.flop_counter.FlopCounterMode` (its per-op formulas and its
module tracking); this module only changes *what is recorded*: the phase (forward or
backward), the kind of backward work (input gradient, weight gradient, or not
separable), the module, and the ops that matter but have no formula. It also corrects
two formulas torch gets wrong for training:

* grouped / depthwise convolution backward: torch counts the weight gradient as a dense
  convolution, ``groups`` times too many FLOPs (a 64-group depthwise conv's backward
  comes out at 65x its forward instead of 2x);
* scaled-dot-product attention on the CPU (``_scaled_dot_product_flash_attention_for_cpu``
  and its backward) has no formula in torch and counts as zero.

Unit: **FLOPs = 2 x multiply-accumulates** (a multiply and an add each count one), the
convention of torch's counter and of the DBF paper's TFLOPs. Additions of biases,
normalizations and activations are not counted.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import flop_counter as _fc

__all__ = ["FlopCount", "FlopProfiler", "StepFlops", "UncountedOpsWarning", "count_flops"]

aten = torch.ops.aten

FlopKind = Literal["forward", "input_grad", "weight_grad", "backward_unsplit"]
GLOBAL = "Global"

# Ops without a formula whose cost can matter; seeing one produces a warning, never a
# silent zero. Matched as substrings of the aten op name.
_MATTERS = (
    "attention",
    "upsample",
    "grid_sampler",
    "roi_align",
    "roi_pool",
    "multi_head",
    "im2col",
    "col2im",
    "cdist",
    "embedding_bag",
    "conv",
    "mm",
    "matmul",
    "einsum",
    "fft",
    "linalg",
    "_rnn",
    "lstm",
    "gru",
)


class UncountedOpsWarning(RuntimeWarning):
    """Ops that can carry real FLOPs ran without a formula and were counted as zero."""


# torch ships these without annotations; typed aliases keep mypy --strict meaningful here.
_sdpa_flops: Callable[..., int] = _fc.sdpa_flop_count
_sdpa_backward_flops: Callable[..., int] = _fc.sdpa_backward_flop_count


def _shape(x: Any) -> list[int]:
    return list(x.shape) if isinstance(x, torch.Tensor) else list(x)


def _conv_flops(
    x_shape: list[int], w_shape: list[int], out_shape: list[int], transposed: bool
) -> int:
    return int(_fc.conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed))


def conv_backward_parts(args: tuple[Any, ...], out: Any) -> tuple[int, int]:
    """``(input_grad, weight_grad)`` FLOPs of one ``aten.convolution_backward`` call.

    Both equal the forward convolution's FLOPs when computed; the weight gradient is
    *not* multiplied by ``groups`` (torch's formula does that, wrongly).
    """
    grad_out, x, w = args[0], args[1], args[2]
    # (grad_out, input, weight, bias_sizes, stride, padding, dilation, transposed,
    #  output_padding, groups, output_mask)
    transposed, output_mask = bool(args[7]), args[10]
    g_shape, x_shape, w_shape = _shape(grad_out), _shape(x), _shape(w)
    input_grad = weight_grad = 0
    if output_mask[0]:
        input_grad = _conv_flops(g_shape, w_shape, _shape(out[0]), not transposed)
    if output_mask[1]:
        # The weight gradient does one multiply-add per (output position, weight element),
        # exactly like the forward convolution.
        weight_grad = _conv_flops(x_shape, w_shape, g_shape, transposed)
    return input_grad, weight_grad


def _sdpa_cpu_forward(
    query_shape: list[int], key_shape: list[int], value_shape: list[int], *args: Any, **kwargs: Any
) -> int:
    return int(_sdpa_flops(query_shape, key_shape, value_shape))


def _sdpa_cpu_backward(
    grad_out_shape: list[int],
    query_shape: list[int],
    key_shape: list[int],
    value_shape: list[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    return int(_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape))


def _corrections() -> dict[Any, Callable[..., int]]:
    table: dict[Any, Callable[..., int]] = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        table[forward] = _sdpa_cpu_forward
    if backward is not None:
        table[backward] = _sdpa_cpu_backward
    return table


# Backward ops whose every output is a gradient w.r.t. activations (attention has no weights).
_INPUT_GRAD_OPS = {
    getattr(aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
        "_flash_attention_backward",
        "_efficient_attention_backward",
    )
    if hasattr(aten, name)
}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one step (or one module within it), by phase and kind of work.

    Attributes:
        forward: Forward FLOPs.
        input_grad: Backward FLOPs that compute gradients w.r.t. activations, where the op
            tells them apart (convolution, attention).
        weight_grad: Backward FLOPs that compute gradients w.r.t. weights (convolution).
        backward_unsplit: Backward FLOPs of ops that do not say which gradient they compute
            (matrix products: a linear layer's backward is two ``mm`` calls).
    """

    forward: int = 0
    input_grad: int = 0
    weight_grad: int = 0
    backward_unsplit: int = 0

    @property
    def backward(self) -> int:
        """All backward FLOPs."""
        return self.input_grad + self.weight_grad + self.backward_unsplit

    @property
    def total(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward + self.backward

    @property
    def macs(self) -> float:
        """Multiply-accumulates: ``total / 2``."""
        return self.total / 2

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(
            self.forward + other.forward,
            self.input_grad + other.input_grad,
            self.weight_grad + other.weight_grad,
            self.backward_unsplit + other.backward_unsplit,
        )

    def scaled(self, factor: float) -> FlopCount:
        """Every field times ``factor`` (rounded), e.g. per sample or per run."""
        return FlopCount(
            round(self.forward * factor),
            round(self.input_grad * factor),
            round(self.weight_grad * factor),
            round(self.backward_unsplit * factor),
        )


@dataclass(frozen=True)
class StepFlops:
    """What :class:`FlopProfiler` measured.

    Attributes:
        total: FLOPs of everything that ran.
        modules: Inclusive FLOPs per module name (a module includes its children).
            Names are relative to the profiler's ``model`` (``""`` is the model itself)
            when one was given, else torch's ``ClassName.child`` names.
        uncounted: Ops that matter but have no formula, with how often each ran.
    """

    total: FlopCount
    modules: Mapping[str, FlopCount] = field(default_factory=dict)
    uncounted: Mapping[str, int] = field(default_factory=dict)

    def forward_of(self, names: list[str]) -> int:
        """Forward FLOPs of the given modules, counting nested names once.

        Raises:
            KeyError: a name is unknown (not a module of the profiler's model or, without
                a model, never seen running).
        """
        chosen = sorted(set(names))
        outer = [n for n in chosen if not any(n.startswith(p + ".") for p in chosen if p != n)]
        missing = [n for n in outer if n not in self.modules]
        if missing:
            raise KeyError(f"no FLOPs were recorded for modules {missing}")
        return sum(self.modules[n].forward for n in outer)


class _Counter(_fc.FlopCounterMode):
    """FlopCounterMode that records phase, kind and uncounted ops (see module docstring)."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=_corrections())
        self.kinds: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.uncounted: Counter[str] = Counter()

    def _record(self, kind: str, flops: int) -> None:
        if flops:
            for name in set(self.mod_tracker.parents):
                self.kinds[name][kind] += flops

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        backward = bool(self.mod_tracker.is_bw)
        if func_packet is aten.convolution_backward:
            input_grad, weight_grad = conv_backward_parts(tuple(args), out)
            self._record("input_grad", input_grad)
            self._record("weight_grad", weight_grad)
        elif func_packet in self.flop_registry:
            flops = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
            if not backward:
                kind = "forward"
            elif func_packet in _INPUT_GRAD_OPS:
                kind = "input_grad"
            else:
                kind = "backward_unsplit"
            self._record(kind, flops)
        else:
            name = str(func_packet)
            if any(key in name for key in _MATTERS):
                self.uncounted[name] += 1
        return out


def _module_names(model: nn.Module) -> dict[str, str]:
    """Tracker name -> name relative to ``model`` (what torch's ModuleTracker calls it)."""
    root = type(model).__name__
    return {(f"{root}.{fqn}" if fqn else root): fqn for fqn, _ in model.named_modules()}


class FlopProfiler:
    """Count the FLOPs of everything run inside the block, by phase, kind and module.

    Run the forward *and* the backward inside the block: backward work is attributed to
    modules through hooks that the forward installs.

    Args:
        model: The model whose ``forward`` is called inside the block; module names in
            the result are then relative to it (``"backbone.layer1"``).
        warn_uncounted: Warn (:class:`UncountedOpsWarning`) when ops that can carry real
            FLOPs ran without a formula.

    Raises:
        RuntimeError: the installed torch lacks the counter hooks this relies on.

    Examples:
        >>> layer = nn.Linear(8, 4, bias=False)
        >>> x = torch.randn(16, 8, requires_grad=True)
        >>> with FlopProfiler(layer) as prof:
        ...     layer(x).sum().backward()
        >>> flops = prof.result.total
        >>> flops.forward, flops.backward  # 2*16*8*4, and twice that for both gradients
        (1024, 2048)
    """

    def __init__(self, model: nn.Module | None = None, *, warn_uncounted: bool = True) -> None:
        if not hasattr(_fc.FlopCounterMode, "_count_flops"):
            raise RuntimeError(
                "freezesched's FLOP profiler needs torch.utils.flop_counter.FlopCounterMode."
                f"_count_flops (torch >= 2.4); this is torch {torch.__version__}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.warn_uncounted = warn_uncounted
        self._counter: _Counter | None = None
        self._result: StepFlops | None = None

    @property
    def result(self) -> StepFlops:
        """The counts, available after the block exits."""
        if self._result is None:
            raise RuntimeError("FlopProfiler.result is available after the with-block exits")
        return self._result

    def __enter__(self) -> FlopProfiler:
        self._counter = _Counter()
        enter: Callable[[], object] = self._counter.__enter__
        enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        counter, self._counter = self._counter, None
        if counter is None:
            return
        leave: Callable[..., object] = counter.__exit__
        leave(exc_type, exc, tb)
        names = _module_names(self.model) if self.model is not None else {}

        def as_count(kinds: Counter[str]) -> FlopCount:
            return FlopCount(**{k: int(v) for k, v in kinds.items()})

        # Every module of the model is listed, also those that ran no counted op (norms,
        # activations): zero is then a measurement, not a missing entry.
        modules = {fqn: FlopCount() for fqn in names.values()}
        modules.update(
            {
                names.get(name, name): as_count(kinds)
                for name, kinds in counter.kinds.items()
                if name != GLOBAL
            }
        )
        self._result = StepFlops(
            total=as_count(counter.kinds.get(GLOBAL, Counter())),
            modules=modules,
            uncounted=dict(counter.uncounted),
        )
        if self.warn_uncounted and counter.uncounted and exc_type is None:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(counter.uncounted.items()))
            warnings.warn(
                f"these ops ran without a FLOP formula and were counted as 0: {listed}",
                UncountedOpsWarning,
                stacklevel=2,
            )


def count_flops(step: Callable[[], object], model: nn.Module | None = None) -> StepFlops:
    """Run ``step()`` (a forward and backward) under a :class:`FlopProfiler`; return the counts.

    Examples:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        >>> x = torch.randn(2, 8, 5, 5, requires_grad=True)
        >>> c = count_flops(lambda: conv(x).sum().backward()).total
        >>> c.forward, c.input_grad, c.weight_grad  # 2 * (2*5*5) * 8 * 1 * 9 each
        (7200, 7200, 7200)
    """
    with FlopProfiler(model) as prof:
        step()
    return prof.result
