"""The fast twin of a frozen module: a private copy, BatchNorm folded, cheaper to run.

Built from a frozen module by :mod:`freezesched.freezing._fast`, never registered on it:

1. a deep copy (parameters and buffers copied, so the originals stay bitwise untouched),
   each submodule in the mode the frozen forward runs it in (pinned norm and dropout
   layers in eval, every other module as the original is now);
2. traced with :mod:`torch.fx` (one trace at a time, process-wide); a submodule whose
   forward cannot be traced (Python control flow on tensor values, say) or enters
   ``torch.autocast`` (which fx does not record) is kept as one opaque call and reported;
3. every ``Conv -> BatchNorm`` and ``Linear -> BatchNorm1d`` pair of the traced graph
   whose intermediate result is used nowhere else is replaced by one layer with folded
   weights, computed by torch's own :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`,
   :func:`~torch.nn.utils.fusion.fuse_linear_bn_eval` and
   :func:`~torch.nn.utils.fusion.fuse_conv_bn_weights` (torchvision's
   ``FrozenBatchNorm2d``); every other norm layer (one after a grouped ConvTranspose,
   or whose folding fails) is left as it is, with the reason;
4. optionally converted to channels-last and to a lower precision, and compiled by
   inductor with its weights frozen into constants.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval

__all__ = ["Twin", "build_twin", "copy_module"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: How many untraceable submodules a trace may set aside before giving up on tracing.
_MAX_TRACE_ATTEMPTS = 64
#: torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces,
#: and two overlapping traces restore each other's patches in the wrong order (leaving
#: ``nn.Module.__call__`` patched for good): twins are traced one at a time.
_TRACE_LOCK = threading.Lock()
#: Context managers whose effect torch.fx does not record (it traces through their
#: ``with`` blocks and keeps only the ops): ``(class, method that switches the mode, name)``.
#: ``set_grad_enabled`` switches in ``__init__``, so that its function form is seen too.
_UNRECORDED: tuple[tuple[type, str, str], ...] = (
    (torch.amp.autocast_mode.autocast, "__enter__", "torch.autocast"),
    (torch.autograd.grad_mode.no_grad, "__enter__", "torch.no_grad"),
    (torch.autograd.grad_mode.enable_grad, "__enter__", "torch.enable_grad"),
    (torch.autograd.grad_mode.set_grad_enabled, "__init__", "torch.set_grad_enabled"),
    (torch.autograd.grad_mode.inference_mode, "__enter__", "torch.inference_mode"),
)
#: Functions that switch a mode torch.fx does not record, by the module attribute a forward
#: calls them through (``torch.set_autocast_enabled`` and ``torch._C.set_autocast_enabled``
#: are one function under two names: both names are refused). The context managers above
#: call some of them, after their own refusal.
_UNRECORDED_FUNCTIONS: tuple[tuple[Any, str], ...] = tuple(
    (owner, name)
    for owner, prefix in ((torch, "torch"), (torch._C, "torch._C"))
    for name in sorted(dir(owner))
    if (name.startswith("set_autocast_") and name != "set_autocast_cache_enabled")
    or (prefix == "torch._C" and name in ("_set_grad_enabled", "_set_fwd_grad_enabled"))
)


@dataclass
class Twin:
    """A built twin and what building it did.

    Attributes:
        module: The eager twin (a ``GraphModule``, or a plain copy if nothing could be
            traced), in the twin's memory format and dtype.
        run: What to call: ``module`` itself, or its compiled form.
        compiled: Whether ``run`` is compiled.
        folded: ``"conv + bn"`` qualified names (relative to the frozen module) folded.
        not_folded: ``(name, reason)`` of every norm layer left as it is.
        untraced: ``(name, reason)`` of every submodule kept as one opaque call.
        compiles: A one-element list counting inductor compilations of ``run``.
    """

    module: nn.Module
    run: Callable[..., Any]
    compiled: bool
    folded: list[str] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    compiles: list[int] = field(default_factory=lambda: [0])


def copy_module(module: nn.Module, strip: Iterable[object]) -> nn.Module:
    """A deep copy of ``module`` without the objects ``strip`` in any submodule's ``__dict__``.

    ``strip`` are freezesched's own forward overrides: they must not be copied into a
    twin (and refuse to be copied anywhere else).
    """
    placeholder = object()
    memo: dict[int, Any] = {id(obj): placeholder for obj in strip}
    twin = copy.deepcopy(module, memo)
    for sub in twin.modules():
        for key in [k for k, v in sub.__dict__.items() if v is placeholder]:
            del sub.__dict__[key]
    return twin


def _is_frozen_batch_norm(module: nn.Module) -> bool:
    """Torchvision's ``FrozenBatchNorm2d`` (an affine map from four buffers), by name."""
    return (
        type(module).__name__ == "FrozenBatchNorm2d"
        and all(
            isinstance(module._buffers.get(k), torch.Tensor)
            for k in ("weight", "bias", "running_mean", "running_var")
        )
        and isinstance(getattr(module, "eps", None), float)
    )


def _is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) or _is_frozen_batch_norm(module)


class _Tracer(fx.Tracer):
    """A tracer that treats the named submodules as opaque calls.

    It remembers which submodule's forward a tracing error came from (the innermost one).
    """

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.opaque
            or _is_frozen_batch_norm(m)
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path_of_module(m)
            raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    if isinstance(error, _UnrecordedInForward):
        return text[0]
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


class _UnrecordedInForward(RuntimeError):
    """A forward entered a mode torch.fx does not record (autocast, a grad mode)."""


@contextmanager
def _refusing_unrecorded_modes() -> Iterator[None]:
    """Make mode switches and custom autograd Functions fail in this thread while it traces.

    ``torch.fx`` does not record autocast and grad-mode switches (context managers or their
    function forms, such as ``torch._C._set_grad_enabled``), so the traced graph would run
    such a region in the caller's precision, or pass gradients through a ``torch.no_grad()``
    block of a frozen middle stage that the plain forward cuts. It traces through a custom
    ``torch.autograd.Function``'s ``apply`` and keeps only its forward ops, so the twin's
    backward would use the ops' own gradients instead of the Function's ``backward``
    (a gradient reversal would pass the gradient unnegated, a straight-through estimator
    zeros). The forward that does one of these (the innermost submodule) is kept as one
    opaque call instead, which runs it as written. Other threads are not affected.
    """
    tracing = threading.get_ident()
    methods = [(c, a, c.__dict__[a], n) for c, a, n in _UNRECORDED if a in c.__dict__]
    functions = [
        (owner, name, getattr(owner, name))
        for owner, name in _UNRECORDED_FUNCTIONS
        if hasattr(owner, name)
    ]
    function_cls = torch.autograd.function.Function
    apply = function_cls.__dict__.get("apply")

    def refuse(what: str) -> None:
        if threading.get_ident() == tracing:
            raise _UnrecordedInForward(f"its forward {what} torch.fx does not record")

    def refusing_method(original: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def switch(self: Any, *args: Any, **kwargs: Any) -> Any:
            refuse(f"enters {name}, which")
            return original(self, *args, **kwargs)

        return switch

    def refusing_function(original: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def switch(*args: Any, **kwargs: Any) -> Any:
            refuse(f"calls {name}, which")
            return original(*args, **kwargs)

        return switch

    def refused_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        name = cls.__qualname__
        refuse(f"calls {name}.apply (a custom torch.autograd.Function), whose backward")
        # ``apply`` is a Python classmethod on some torch versions and a C one on others;
        # both bind to ``cls`` through the descriptor protocol.
        return apply.__get__(None, cls)(*args, **kwargs)  # type: ignore[union-attr]

    refused_apply.__wrapped__ = apply  # type: ignore[attr-defined]

    try:
        for cls, attr, original, name in methods:
            setattr(cls, attr, refusing_method(original, name))
        for owner, attr, function in functions:
            prefix = "torch._C" if owner is torch._C else "torch"
            setattr(owner, attr, refusing_function(function, f"{prefix}.{attr}"))
        if apply is not None:
            setattr(function_cls, "apply", classmethod(refused_apply))  # noqa: B010
        yield
    finally:
        if apply is not None:
            setattr(function_cls, "apply", apply)  # noqa: B010
        for owner, attr, function in functions:
            setattr(owner, attr, function)
        for cls, attr, original, _ in methods:
            setattr(cls, attr, original)


def _trace(root: nn.Module) -> tuple[fx.GraphModule | None, list[tuple[str, str]], str]:
    """``(graph module or None, opaque submodules with reasons, why the root failed)``.

    Traces run one at a time (``_TRACE_LOCK``); a submodule whose forward enters
    ``torch.autocast`` or switches the grad mode is kept opaque.
    """
    with _TRACE_LOCK, _refusing_unrecorded_modes():
        return _trace_locked(root)


def _trace_locked(root: nn.Module) -> tuple[fx.GraphModule | None, list[tuple[str, str]], str]:
    opaque: dict[str, str] = {}
    for _ in range(_MAX_TRACE_ATTEMPTS):
        tracer = _Tracer(set(opaque))
        try:
            graph = tracer.trace(root)
        except Exception as error:
            name = tracer.failed
            if not name or name in opaque:
                return None, sorted(opaque.items()), _first_line(error)
            opaque[name] = _first_line(error)
            continue
        return fx.GraphModule(root, graph, type(root).__name__), sorted(opaque.items()), ""
    return None, sorted(opaque.items()), "too many untraceable submodules"


def _fold_reason(
    gm: fx.GraphModule,
    node: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    shapes: dict[fx.Node, torch.Size],
) -> tuple[str, nn.Module | None]:
    """Why the norm call ``node`` cannot be folded (``""`` if it can), and the layer."""
    norm = modules[str(node.target)]
    if not (type(norm) in _BATCH_NORM or _is_frozen_batch_norm(norm)):
        return f"a {type(norm).__name__} is not folded (only BatchNorm)", None
    if isinstance(norm, _NormBase) and (
        not norm.track_running_stats or norm.running_mean is None or norm.running_var is None
    ):
        return "track_running_stats=False: it normalises with batch statistics", None
    if isinstance(norm, _NormBase) and norm.training:
        return "it runs in training mode", None
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return "its input is not the output of a convolution or linear layer", None
    layer = modules[str(source.target)]
    kind = type(layer)
    if kind not in (*_CONV, *_CONV_T, nn.Linear):
        return f"its input comes from a {kind.__name__}, not a Conv/ConvTranspose/Linear", None
    if isinstance(layer, _CONV_T) and layer.groups > 1:
        return _GROUPED_T, None
    if _value_users(source) > 1:
        return f"the output of {source.target!r} is also used elsewhere", None
    if calls.get(str(source.target), 0) > 1:
        return f"{source.target!r} is called more than once", None
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    features = norm.num_features if isinstance(norm, _NormBase) else _tensor(norm, "weight").numel()
    if channels != features:
        return f"{source.target!r} has {channels} output channels, the norm {features}", None
    if isinstance(layer, nn.Linear):
        shape = shapes.get(source)
        if shape is None or len(shape) != 2:
            return "a Linear -> BatchNorm1d pair folds only on 2-D (batch, features) input", None
    if isinstance(norm, _BatchNorm) and not isinstance(norm, _BATCH_NORM):
        return f"a {type(norm).__name__} is not folded", None
    return "", layer


#: torch's fusion scales a transposed weight over its dimension 1, which holds
#: ``out_channels / groups`` channels: a grouped one would get a wrong-shaped weight.
_GROUPED_T = "it follows a grouped ConvTranspose (groups > 1)"

_METADATA_ATTRS = frozenset({"ndim", "shape", "dtype", "device", "is_cuda"})
_METADATA_METHODS = frozenset({"dim", "size", "ndimension"})


def _value_users(node: fx.Node) -> int:
    """Users of ``node`` that read its values (not only its shape, like an ``x.ndim`` check).

    Folding a norm after ``node`` changes its values, never its metadata.
    """
    count = 0
    for user in node.users:
        if (
            user.op == "call_function"
            and user.target is getattr
            and len(user.args) == 2
            and user.args[1] in _METADATA_ATTRS
        ):
            continue
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            continue
        count += 1
    return count


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value


def _optional(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name)
    assert value is None or isinstance(value, torch.Tensor)
    return value


def _fused(layer: nn.Module, norm: nn.Module) -> nn.Module:
    layer.training = False  # the twin's own copy, called once: its mode is ours to set
    if _is_frozen_batch_norm(norm):
        fused = copy.deepcopy(layer)
        weight, bias = fuse_conv_bn_weights(
            _tensor(fused, "weight"),
            _optional(fused, "bias"),
            _tensor(norm, "running_mean"),
            _tensor(norm, "running_var"),
            float(norm.eps),  # type: ignore[arg-type]
            _optional(norm, "weight"),
            _optional(norm, "bias"),
            transpose=isinstance(layer, _CONV_T),
        )
        fused.weight, fused.bias = weight, bias
        return fused
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, norm)  # type: ignore[arg-type]
    return fuse_conv_bn_eval(  # type: ignore[type-var]
        layer,
        norm,  # type: ignore[arg-type]
        transpose=isinstance(layer, _CONV_T),
    )


def _checked(fused: nn.Module, layer: nn.Module) -> nn.Module:
    """``fused``, after checking that its weight and bias have the shapes folding must give.

    Raises:
        ValueError: they do not (a layer torch's fusion does not support).
    """
    weight, bias = _tensor(layer, "weight"), _optional(fused, "bias")
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if _tensor(fused, "weight").shape != weight.shape or bias is None or bias.shape != (channels,):
        raise ValueError(
            f"the folded weight has shape {tuple(_tensor(fused, 'weight').shape)} and bias "
            f"{None if bias is None else tuple(bias.shape)}, the layer's weight "
            f"{tuple(weight.shape)} and {channels} channels"
        )
    return fused


def _fold(
    gm: fx.GraphModule, example: tuple[torch.Tensor, ...]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Fold every foldable norm of ``gm`` in place; ``(folded, not folded)``.

    Norm modules called as modules, and ``F.batch_norm`` calls on constant statistics
    (norm modules traced through, such as timm's ``BatchNormAct2d``), are folded into the
    convolution or linear module whose output they normalise.
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    module_norms = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and _is_norm_layer(modules[str(n.target)])
    ]
    functional_norms = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is nn.functional.batch_norm
    ]
    shapes: dict[fx.Node, torch.Size] = {}
    sources = [n.args[0] for n in (*module_norms, *functional_norms) if n.args]
    if any(
        isinstance(src, fx.Node)
        and src.op == "call_module"
        and isinstance(modules.get(str(src.target)), nn.Linear)
        for src in sources
    ):
        shapes = _shapes(gm, example)
    folded: list[str] = []
    not_folded: list[tuple[str, str]] = []
    for i, node in enumerate(module_norms):
        reason, layer = _fold_reason(gm, node, modules, calls, shapes)
        if reason or layer is None:
            not_folded.append((str(node.target), reason))
            continue
        source = node.args[0]
        assert isinstance(source, fx.Node)
        training = layer.training
        try:
            fused = _checked(_fused(layer, modules[str(node.target)]), layer)
        except Exception as error:  # this pair stays as it is; the others still fold
            layer.training = training
            not_folded.append((str(node.target), f"folding it failed ({_first_line(error)})"))
            continue
        name = f"_fast_fused_{i}"
        gm.add_submodule(name, fused)
        folded.append(f"{source.target} + {node.target}")
        source.target = name
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    for i, node in enumerate(functional_norms):
        label, reason, layer_f = _fold_functional(gm, node, modules, calls, shapes)
        if layer_f is None:
            if label:
                not_folded.append((label, reason))
            continue
        source = node.args[0]
        assert isinstance(source, fx.Node)
        name = f"_fast_fused_f{i}"
        gm.add_submodule(name, layer_f)
        folded.append(f"{source.target} + {label}")
        source.target = name
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded, not_folded


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")  # fmt: skip


def _fold_functional(
    gm: fx.GraphModule,
    node: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    shapes: dict[fx.Node, torch.Size],
) -> tuple[str, str, nn.Module | None]:
    """``(norm name, why not, fused layer or None)`` for an ``F.batch_norm`` call."""
    bound = dict(zip(_BATCH_NORM_ARGS, node.args, strict=False))
    bound.update(node.kwargs)
    stats = bound.get("running_mean")
    label = ""
    if isinstance(stats, fx.Node) and stats.op == "get_attr":
        label = str(stats.target).rpartition(".")[0]
    constants: dict[str, torch.Tensor | None] = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = bound.get(key)
        if value is None and key in ("weight", "bias"):
            constants[key] = None
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            constants[key] = _attr(gm, str(value.target))
        else:
            return label, "its statistics are not fixed buffers (batch statistics?)", None
    if bound.get("training", False) is not False:
        return label, "it runs with batch statistics (training=True)", None
    eps = bound.get("eps", 1e-5)
    source = bound.get("input")
    if not isinstance(eps, float) or not isinstance(source, fx.Node) or source.op != "call_module":
        return label, "its input is not the output of a convolution or linear layer", None
    layer = modules[str(source.target)]
    if type(layer) not in (*_CONV, *_CONV_T):
        return label, f"its input comes from a {type(layer).__name__}, not a Conv", None
    if isinstance(layer, _CONV_T) and layer.groups > 1:
        return label, _GROUPED_T, None
    if _value_users(source) > 1 or calls.get(str(source.target), 0) > 1:
        return label, f"the output of {source.target!r} is also used elsewhere", None
    mean, var = constants["running_mean"], constants["running_var"]
    assert mean is not None
    assert var is not None
    if mean.numel() != layer.out_channels:
        return label, f"{source.target!r} has {layer.out_channels} channels", None
    fused = copy.deepcopy(layer)
    try:
        fused.weight, fused.bias = fuse_conv_bn_weights(
            _tensor(fused, "weight"),
            _optional(fused, "bias"),
            mean,
            var,
            eps,
            constants["weight"],
            constants["bias"],
            transpose=isinstance(layer, _CONV_T),
        )
        _checked(fused, layer)
    except Exception as error:  # this call stays as it is; the others still fold
        return label or str(node.name), f"folding it failed ({_first_line(error)})", None
    return label or str(node.name), "", fused


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, name)
    assert isinstance(value, torch.Tensor)
    return value


def _shapes(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> dict[fx.Node, torch.Size]:
    """The output shape of every node whose output is a tensor, from one run on ``example``."""
    shapes: dict[fx.Node, torch.Size] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = out.shape
            return out

    with torch.no_grad():  # on copies: a forward may write its input in place
        _Recorder(gm).run(*(e.clone() for e in example))
    return shapes


def _norms_outside_graph(
    twin: nn.Module, seen: set[str], opaque: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    out = []
    for name, sub in twin.named_modules():
        if name in seen or not _is_norm_layer(sub):
            continue
        inside = [o for o, _ in opaque if name.startswith(o + ".")]
        reason = (
            f"inside {inside[0]!r}, which is run as it is (not traced)"
            if inside
            else "not called as a module by the traced forward"
        )
        out.append((name, reason))
    return out


@torch.inference_mode(False)
def build_twin(
    module: nn.Module,
    *,
    eval_ids: set[int],
    strip: Iterable[object],
    example: tuple[torch.Tensor, ...],
    fold_bn: bool,
    channels_last: bool,
    dtype: torch.dtype | None,
    compile: bool,
) -> Twin:
    """Build the twin of ``module`` (see the module docstring).

    Args:
        module: The frozen module.
        eval_ids: ``id`` of each submodule the frozen forward runs in eval mode.
        strip: freezesched's forward overrides, left out of the copy.
        example: The inputs of one real call, to learn output shapes where folding needs
            them.
        fold_bn: Fold BatchNorm into the preceding layer.
        channels_last: Convert 4-D weights to channels-last.
        dtype: Cast floating parameters and buffers to this dtype (``None``: keep).
        compile: Compile with inductor, weights frozen into constants.
    """
    # Built outside inference mode (the decorator): a twin holding inference tensors
    # could not be used later with autograd (a frozen middle stage passing the input
    # gradient back).
    twin = copy_module(module, strip)
    twin.requires_grad_(False)
    originals = dict(module.named_modules(remove_duplicate=False))
    for name, sub in twin.named_modules(remove_duplicate=False):
        original = originals.get(name)
        mode = original is not None and original.training and id(original) not in eval_ids
        sub.__dict__["training"] = mode
    folded: list[str] = []
    not_folded: list[tuple[str, str]] = []
    untraced: list[tuple[str, str]] = []
    result: nn.Module = twin
    if fold_bn:
        gm, untraced, root_failure = _trace(twin)
        if gm is None:
            untraced = [("", root_failure), *untraced]
            not_folded = _norms_outside_graph(twin, set(), [("", root_failure)])
        else:
            folded, not_folded = _fold(gm, example)
            seen = {n for n, _ in not_folded} | {f.rpartition(" + ")[2] for f in folded}
            not_folded += _norms_outside_graph(twin, seen, untraced)
            result = gm
    if channels_last:
        result = result.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if dtype is not None:
        result = result.to(dtype)
    out = Twin(
        module=result,
        run=result,
        compiled=False,
        folded=folded,
        not_folded=sorted(not_folded),
        untraced=untraced,
    )
    if compile:
        out.run = _compile(result, out.compiles)
        out.compiled = True
    return out


def _compile(module: nn.Module, counter: list[int]) -> Callable[..., Any]:
    """``torch.compile`` with inductor, weights frozen into constants (``freezing``).

    Inductor freezes only graphs compiled without autograd, so the result is only
    called under ``torch.no_grad()``. ``counter[0]`` counts the graphs compiled.
    """
    import torch._inductor as inductor

    def backend(gm: fx.GraphModule, inputs: list[torch.Tensor | int | torch.SymInt | None]) -> Any:
        counter[0] += 1
        return inductor.compile(gm, inputs, options={"freezing": True})

    return torch.compile(module.forward, backend=backend, dynamic=False)
