"""FLOPs actually executed in a step, forward and backward, per module, at dispatch level.

Counting uses :mod:`torch.utils.flop_counter`'s per-op formulas (its ``flop_registry``)
inside a dispatch mode of our own, which records *what* ran where:

* the phase (forward or backward) and, for backward, the kind of work (input gradient,
  weight gradient, or not separable);
* the module, by object: forward work goes to the modules whose ``forward`` is running,
  backward work to the modules that were running when the autograd node executing it was
  created (looked up by the node's sequence number). So attribution does not depend on
  wrappers (``DistributedDataParallel``, ``torch.compile``, a user's outer module), and
  per-module counts add up exactly to the total (see :attr:`StepFlops.exclusive`);
* every op that ran without a formula and is not negligible by convention (see below),
  with how often it ran; such ops are reported, never silently counted as zero.

Corrections and additions to torch's formulas:

* grouped / depthwise convolution backward: torch counts the weight gradient as a dense
  convolution, ``groups`` times too many FLOPs;
* scaled-dot-product attention on the CPU (``_scaled_dot_product_flash_attention_for_cpu``
  and its backward), which torch does not count. (On the ``meta`` device attention takes
  a math fallback with a cheaper backward; the counts say so in :attr:`StepFlops.notes`.
  :func:`~freezesched.profiling.measure_state_cost` counts on fake CPU tensors instead,
  which take the CPU's kernels, so its counts equal a real CPU step's.)
* ``mv``, ``addmv``, ``dot``, ``vdot``, ``addbmm``, ``_cdist_forward``, ``_euclidean_dist`` and
  ``_cdist_backward`` (``torch.cdist``) and ``_trilinear`` (``nn.Bilinear``), which torch
  counts as zero, and
  the outer products in the backward of ``mv`` / ``addmv`` / ``dot``.

Unit: **FLOPs = 2 x multiply-accumulates** (a multiply and an add each count one), the
convention of torch's counter and of the DBF paper's TFLOPs. Not counted, by convention:
elementwise ops, reductions, normalizations, softmax, pooling and data movement; every
other op without a formula (interpolation, ``grid_sample``, RoI ops, fused RNN kernels,
a custom op...) is reported in :attr:`StepFlops.uncounted` and by an
:class:`UncountedOpsWarning`.
"""

from __future__ import annotations

import bisect
import math
import threading
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import Self

from freezesched._validation import describe

__all__ = [
    "FlopCount",
    "FlopProfiler",
    "StepFlops",
    "UncountedOpsWarning",
    "count_flops",
]

aten = torch.ops.aten

FlopKind = Literal["forward", "input_grad", "weight_grad", "backward_unsplit"]
OUTSIDE = "(outside modules)"


class UncountedOpsWarning(RuntimeWarning):
    """Ops that can carry real FLOPs ran without a formula and were counted as zero."""


# --- formulas ----------------------------------------------------------------------------

# torch ships these without annotations; typed aliases keep mypy --strict meaningful here.
_sdpa_flops: Callable[..., int] = _fc.sdpa_flop_count
_sdpa_backward_flops: Callable[..., int] = _fc.sdpa_backward_flop_count


def _shape(x: Any) -> list[int]:
    return list(x.shape) if isinstance(x, torch.Tensor) else list(x)


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


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


def _sdpa_cpu_forward(args: tuple[Any, ...], out: Any) -> int:
    return int(_sdpa_flops(_shape(args[0]), _shape(args[1]), _shape(args[2])))


def _sdpa_cpu_backward(args: tuple[Any, ...], out: Any) -> int:
    return int(
        _sdpa_backward_flops(_shape(args[0]), _shape(args[1]), _shape(args[2]), _shape(args[3]))
    )


def _mv(args: tuple[Any, ...], out: Any) -> int:
    m, n = _shape(args[0])
    return 2 * m * n


def _addmv(args: tuple[Any, ...], out: Any) -> int:
    m, n = _shape(args[1])
    return 2 * m * n


def _dot(args: tuple[Any, ...], out: Any) -> int:
    return 2 * _numel(_shape(args[0]))


def _addbmm(args: tuple[Any, ...], out: Any) -> int:
    b, n, k = _shape(args[1])
    m = _shape(args[2])[-1]
    return 2 * b * n * k * m


def _cdist(args: tuple[Any, ...], out: Any) -> int:
    """One multiply-add per (pair of points, coordinate): the cost of the mm formulation."""
    x1, x2 = _shape(args[0]), _shape(args[1])
    batch = _numel(x1[:-2])
    return 2 * batch * x1[-2] * x2[-2] * x1[-1]


def _cdist_backward(args: tuple[Any, ...], out: Any) -> int:
    # _cdist_backward(grad, x1, x2, p, cdist): the gradient for x1 (called once per input).
    x1, x2 = _shape(args[1]), _shape(args[2])
    batch = _numel(x1[:-2])
    return 2 * batch * x1[-2] * x2[-2] * x1[-1]


def _trilinear(args: tuple[Any, ...], out: Any) -> int:
    """The leading term: one multiply-add per element of the broadcast product."""
    i1, i2, i3 = (_shape(a) for a in args[:3])
    expands = args[3:6]
    shapes = []
    for s, expand in zip((i1, i2, i3), expands, strict=True):
        full = list(s)
        for dim in sorted(expand):
            full.insert(dim, 1)
        shapes.append(full)
    ndim = max(len(s) for s in shapes)
    size = 1
    for d in range(ndim):
        size *= max(s[d] if d < len(s) else 1 for s in shapes)
    return 2 * size


Formula = Callable[[tuple[Any, ...], dict[str, Any], Any], int]


def _ours(formula: Callable[[tuple[Any, ...], Any], int]) -> Formula:
    def count(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        return formula(args, out)

    return count


def _torchs(formula: Any) -> Formula:
    def count(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        return int(formula(*args, **kwargs, out_val=out))

    return count


def _registry() -> dict[Any, Formula]:
    """Op -> ``formula(args, kwargs, out)``: torch's formulas, our corrections and additions."""
    table: dict[Any, Formula] = {op: _torchs(f) for op, f in _fc.flop_registry.items()}
    extra: dict[str, Callable[[tuple[Any, ...], Any], int]] = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_forward,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_cpu_backward,
        "mv": _mv,
        "addmv": _addmv,
        "dot": _dot,
        "vdot": _dot,
        "addbmm": _addbmm,
        "_cdist_forward": _cdist,
        "_euclidean_dist": _cdist,
        "_cdist_backward": _cdist_backward,
        "_trilinear": _trilinear,
    }
    for name, formula in extra.items():
        packet = getattr(aten, name, None)
        if packet is not None:
            table[packet] = _ours(formula)
    # In-place variants (``addmm_``, as mmcv's DeformConv2d calls it) compute the same.
    for packet, counted in list(table.items()):
        inplace = getattr(aten, f"{getattr(packet, '__name__', '')}_", None)
        if inplace is not None and inplace not in table:
            table[inplace] = counted
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
#: Backward nodes whose elementwise multiplications are outer products worth counting:
#: node name -> the kind of work they do (one multiply per output element).
_OUTER_PRODUCT_NODES = {
    "MvBackward0": "weight_grad",
    "AddmvBackward0": "weight_grad",
    "DotBackward0": "backward_unsplit",
    "VdotBackward0": "backward_unsplit",
}

#: Ops that cost nothing worth counting by convention, besides those tagged pointwise,
#: reduction or view: memory movement (nearest-neighbour upsampling is a gather),
#: normalization, pooling, elementwise losses. Matched on the op's base name.
# fmt: off
_NEGLIGIBLE = frozenset((
    "_softmax", "softmax", "_log_softmax", "log_softmax", "_softmax_backward_data",
    "_log_softmax_backward_data", "_safe_softmax", "_unsafe_view", "native_batch_norm",
    "native_batch_norm_backward", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
    "batch_norm_backward", "cudnn_batch_norm", "cudnn_batch_norm_backward",
    "miopen_batch_norm", "native_layer_norm", "native_layer_norm_backward",
    "native_group_norm", "native_group_norm_backward", "_fused_rms_norm",
    "_fused_rms_norm_backward", "max_pool2d_with_indices",
    "max_pool2d_with_indices_backward", "max_pool3d_with_indices",
    "max_pool3d_with_indices_backward", "max_pool1d", "max_pool2d", "max_pool3d",
    "avg_pool2d", "avg_pool2d_backward", "avg_pool3d", "avg_pool3d_backward",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d",
    "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d", "adaptive_max_pool2d_backward",
    "embedding", "embedding_dense_backward", "_embedding_bag", "_embedding_bag_backward",
    "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward",
    "cat", "stack", "index", "index_put", "index_put_", "_index_put_impl_", "index_select",
    "index_add", "gather", "scatter", "scatter_add", "scatter_reduce", "masked_fill",
    "masked_scatter", "masked_select", "copy", "copy_", "_to_copy", "clone", "contiguous",
    "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "new_zeros", "new_ones", "full", "full_like", "fill",
    "fill_", "zero_", "arange", "linspace", "rand", "randn", "randint", "rand_like",
    "randn_like", "bernoulli", "bernoulli_", "native_dropout", "native_dropout_backward",
    "lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "sort", "topk", "argsort",
    "nonzero", "unique", "_unique2", "where", "constant_pad_nd", "reflection_pad2d",
    "replication_pad2d", "pad", "_pad_circular", "repeat", "tile", "flip", "roll", "split",
    "split_with_sizes", "unbind", "chunk", "narrow", "select", "slice", "slice_backward",
    "select_backward", "diagonal_backward", "_unsafe_index", "_unsafe_index_put", "set_",
    "resize_", "_reshape_alias", "_efficientzerotensor", "scalar_tensor", "tril", "triu",
    "one_hot", "cumsum", "cumprod", "isin", "bucketize", "searchsorted", "_assert_async",
    "_assert_tensor_metadata", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "detach", "_fused_dropout", "sum",
    "mean", "amax", "amin", "max", "min", "argmax", "argmin", "var", "var_mean", "std",
    "std_mean", "norm", "linalg_vector_norm", "_foreach_add", "_foreach_mul",
    "_foreach_addcmul", "_foreach_addcdiv", "_foreach_sqrt", "_foreach_div",
    "_foreach_lerp", "_foreach_mul_", "_foreach_add_", "_foreach_addcmul_",
    "_foreach_addcdiv_", "_foreach_sqrt_", "_foreach_div_", "_foreach_lerp_",
    "_foreach_norm", "_fused_adam_", "_fused_adamw_", "_fused_sgd_", "threshold_backward",
    "new_full", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_nearest1d_backward", "upsample_nearest2d_backward",
    "upsample_nearest3d_backward", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_upsample_nearest_exact1d_backward",
    "_upsample_nearest_exact2d_backward", "_upsample_nearest_exact3d_backward",
    "binary_cross_entropy", "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits", "mse_loss", "mse_loss_backward", "l1_loss",
    "smooth_l1_loss", "smooth_l1_loss_backward", "huber_loss", "huber_loss_backward",
))
#: Namespaces of ops that never compute (profiler markers, prim.device and friends).
_NEGLIGIBLE_NAMESPACES = frozenset(("profiler", "prim"))
# fmt: on
_QUIET_TAGS = tuple(
    getattr(torch.Tag, name)
    for name in ("pointwise", "reduction", "view_copy", "inplace_view")
    if hasattr(torch.Tag, name)
)


_TORCH_NAMESPACES = frozenset({"aten", "prims", None})


def _negligible(func: Any) -> bool:
    namespace = getattr(func, "namespace", None)
    if namespace in _NEGLIGIBLE_NAMESPACES:
        return True
    packet = getattr(func, "overloadpacket", func)
    name = getattr(packet, "__name__", str(packet))
    # The list names torch's own ops: a custom op that happens to share a name (``my::norm``
    # doing a matmul) is not negligible.
    if namespace in _TORCH_NAMESPACES and (name in _NEGLIGIBLE or name.rstrip("_") in _NEGLIGIBLE):
        return True
    tags = getattr(func, "tags", ())
    if any(tag in tags for tag in _QUIET_TAGS):
        return True
    schema = getattr(func, "_schema", None)
    returns = getattr(schema, "returns", ())
    # Views and in-place ops that only alias their input move no data.
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one step (or one module within it), by phase and kind of work.

    Attributes:
        forward: Forward FLOPs.
        input_grad: Backward FLOPs that compute gradients w.r.t. activations, where the op
            tells them apart (convolution, attention, ``mv``).
        weight_grad: Backward FLOPs that compute gradients w.r.t. weights (convolution,
            the outer product of ``mv``).
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

    def to_dict(self) -> dict[str, int]:
        """The four fields as a dict."""
        return {
            "forward": self.forward,
            "input_grad": self.input_grad,
            "weight_grad": self.weight_grad,
            "backward_unsplit": self.backward_unsplit,
        }


@dataclass(frozen=True)
class StepFlops:
    """What :class:`FlopProfiler` measured.

    Attributes:
        total: FLOPs of everything that ran.
        modules: Inclusive FLOPs per module name (a module includes its children). Names
            are relative to the profiler's ``model`` (``""`` is the model itself) when one
            was given, else built from class names as modules are first seen. Every module
            of the model is listed, with zeros if it ran nothing counted.
        exclusive: FLOPs per module excluding its children, plus :data:`OUTSIDE` for work
            done outside every module of the model (a loss, a wrapper): these add up
            exactly to ``total``.
        uncounted: Ops that ran without a formula and are not negligible by convention,
            with how often each ran.
        call_order: Module names in the order their forward was first called.
        notes: What else one must know to read these counts right.
    """

    total: FlopCount
    modules: Mapping[str, FlopCount] = field(default_factory=dict)
    exclusive: Mapping[str, FlopCount] = field(default_factory=dict)
    uncounted: Mapping[str, int] = field(default_factory=dict)
    call_order: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def forward_of(self, names: list[str]) -> int:
        """Forward FLOPs of the given modules, counting nested names once.

        Raises:
            KeyError: a name is unknown (not a module of the profiler's model or, without
                a model, never seen running).
        """
        chosen = sorted(set(names))
        outer = [
            n for n in chosen if not any(n.startswith(p + ".") or p == "" for p in chosen if p != n)
        ]
        missing = [n for n in outer if n not in self.modules]
        if missing:
            raise KeyError(f"no FLOPs were recorded for modules {missing}")
        return sum(self.modules[n].forward for n in outer)


# --- the counting modes ------------------------------------------------------------------


_SAFE_SOFTMAX = getattr(aten, "_safe_softmax", None)  # only attention's math fallback uses it
META_ATTENTION_NOTE = (
    "scaled-dot-product attention ran {n} time(s) on the meta device, where it takes its "
    "math fallback: a backward of 4 products (2.0 x forward) instead of the fused CPU/GPU "
    "kernels' 5 (2.5 x, QK^T is recomputed). measure_state_cost and the project command "
    "count on fake CPU tensors, which take the CPU's kernel"
)


class _Counter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts FLOPs per op, phase, kind and module (see the module docstring)."""

    def __init__(self, names: dict[int, str], named: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = _registry()
        self.names = names
        self.named = named  # names were given (a model); else they grow as modules run
        self.counts: defaultdict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        self.uncounted: Counter[str] = Counter()
        self.local = threading.local()
        self.event_seqs: list[int] = []
        self.event_stacks: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        self.handles: list[Any] = []
        self.order: dict[str, None] = {}
        self.meta_attention = 0  # attention's math fallback seen on the meta device

    # module tracking: forward pre/post hooks on every module, by object

    def _stack(self) -> list[str]:
        stack: list[str] | None = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def _event(self, stack: list[str]) -> None:
        seq = int(torch._C._autograd._get_sequence_nr())
        with self.lock:
            self.event_seqs.append(seq)
            self.event_stacks.append(tuple(stack))

    def _name(self, module: nn.Module) -> str | None:
        name = self.names.get(id(module))
        if name is None and not self.named:
            root = type(module).__name__
            for fqn, sub in module.named_modules():
                self.names.setdefault(id(sub), f"{root}.{fqn}" if fqn else root)
            name = self.names[id(module)]
        return name

    def pre(self, module: nn.Module, args: Any) -> None:
        name = self._name(module)
        if name is not None:
            self.order.setdefault(name, None)
            stack = self._stack()
            stack.append(name)
            self._event(stack)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(module))
        stack = self._stack()
        if name is not None and stack and stack[-1] == name:
            stack.pop()
            self._event(stack)

    def _creation_stack(self, node: Any) -> tuple[str, ...]:
        try:
            seq = int(node._sequence_nr())
        except (AttributeError, RuntimeError):
            return ()
        with self.lock:
            i = bisect.bisect_right(self.event_seqs, seq) - 1
            return self.event_stacks[i] if i >= 0 else ()

    def record(self, stack: tuple[str, ...], kind: str, flops: int) -> None:
        if flops:
            self.counts[stack][kind] += flops

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        node: Any = torch._C._current_autograd_node()
        if node is None:
            stack: tuple[str, ...] = tuple(self._stack())
            backward = False
        else:
            stack = self._creation_stack(node)
            backward = True
        if packet is aten.convolution_backward:
            input_grad, weight_grad = conv_backward_parts(tuple(args), out)
            self.record(stack, "input_grad", input_grad)
            self.record(stack, "weight_grad", weight_grad)
        elif packet in self.registry:
            flops = self.registry[packet](tuple(args), kwargs, out)
            if not backward:
                kind = "forward"
            elif packet in _INPUT_GRAD_OPS or (
                packet in (aten.mv, aten.addmv) and node.name() in _OUTER_PRODUCT_NODES
            ):
                kind = "input_grad"
            else:
                kind = "backward_unsplit"
            self.record(stack, kind, flops)
        elif backward and node.name() in _OUTER_PRODUCT_NODES and packet is aten.mul:
            kind = _OUTER_PRODUCT_NODES[node.name()]
            self.record(stack, kind, int(out.numel()) if isinstance(out, torch.Tensor) else 0)
        elif not _negligible(func):
            self.uncounted[str(packet)] += 1
        if packet is _SAFE_SOFTMAX and isinstance(out, torch.Tensor) and out.device.type == "meta":
            self.meta_attention += 1
        return out


def module_names(model: nn.Module) -> dict[int, str]:
    """Module identity -> qualified name relative to ``model`` (the first of shared names)."""
    names: dict[int, str] = {}
    for fqn, sub in model.named_modules(remove_duplicate=False):
        names.setdefault(id(sub), fqn)
    return names


def _as_count(kinds: Mapping[str, int]) -> FlopCount:
    return FlopCount(**{k: int(v) for k, v in kinds.items()})


class FlopProfiler:
    """Count the FLOPs of everything run inside the block, by phase, kind and module.

    Run the forward *and* the backward inside the block. Modules are recognised by object,
    so the model may be called through any wrapper (``DistributedDataParallel``, a
    compiled ``OptimizedModule``, an outer module of yours).

    Args:
        model: The model whose modules to break the counts down by; names in the result
            are then relative to it (``"backbone.layer1"``).
        warn_uncounted: Warn (:class:`UncountedOpsWarning`) when ops that can carry real
            FLOPs ran without a formula.

    Raises:
        TypeError: ``model`` is not a module.

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
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {describe(model)}")
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

    def __enter__(self) -> Self:
        names = module_names(self.model) if self.model is not None else {}
        counter = _Counter(names, named=self.model is not None)
        counter.handles = [
            nn.modules.module.register_module_forward_pre_hook(counter.pre),
            nn.modules.module.register_module_forward_hook(counter.post, always_call=True),
        ]
        self._counter = counter
        enter: Callable[[], object] = getattr(counter, "__enter__")  # noqa: B009 - untyped
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
        leave: Callable[..., object] = getattr(counter, "__exit__")  # noqa: B009 - untyped
        leave(exc_type, exc, tb)
        for handle in counter.handles:
            handle.remove()
        self._result = self._summarize(counter)
        if self.warn_uncounted and self._result.uncounted and exc_type is None:
            warn_uncounted(self._result.uncounted, stacklevel=2)

    def _summarize(self, counter: _Counter) -> StepFlops:
        total: Counter[str] = Counter()
        inclusive: defaultdict[str, Counter[str]] = defaultdict(Counter)
        exclusive: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for stack, kinds in counter.counts.items():
            total.update(kinds)
            exclusive[stack[-1] if stack else OUTSIDE].update(kinds)
            for name in set(stack):
                inclusive[name].update(kinds)
        # Every module of the model is listed, also those that ran no counted op (norms,
        # activations): zero is then a measurement, not a missing entry.
        modules = {name: FlopCount() for name in counter.names.values()}
        modules.update({name: _as_count(kinds) for name, kinds in inclusive.items()})
        return StepFlops(
            total=_as_count(total),
            modules=modules,
            exclusive={name: _as_count(kinds) for name, kinds in exclusive.items()},
            uncounted=dict(counter.uncounted),
            call_order=tuple(counter.order),
            notes=(META_ATTENTION_NOTE.format(n=counter.meta_attention),)
            if counter.meta_attention
            else (),
        )


def warn_uncounted(uncounted: Mapping[str, int], *, stacklevel: int = 2) -> None:
    """Emit the :class:`UncountedOpsWarning` for ``uncounted`` (op name -> calls)."""
    listed = ", ".join(f"{op} x{n}" for op, n in sorted(uncounted.items()))
    warnings.warn(
        f"these ops ran without a FLOP formula and were counted as 0: {listed}",
        UncountedOpsWarning,
        stacklevel=stacklevel + 1,
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
