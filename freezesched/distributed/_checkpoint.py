"""Distributed checkpoints (``torch.distributed.checkpoint``) that resume in any order.

DCP's ``set_state_dict`` loads optimizer state only for parameters that require grad. A
run resumed during a frozen phase, with its controller restored first, silently loses
the Adam moments of the frozen parameters, and diverges when they unfreeze with
``on_unfreeze="keep"``. :func:`load` gives frozen parameters their own ``requires_grad``
back for the duration of DCP's calls (:func:`~freezesched.freezing.thawed`), so the
order does not matter; :func:`save` stores the controller's state next to the model's
and the optimizers' in the same checkpoint.

``save(..., only_trained=True)`` leaves out parameters frozen at every tick so far
(:meth:`~freezesched.FreezeController.untrained_parameters`): they still hold the
weights the run started from, so the checkpoint references them instead of writing
them again. It records a fingerprint of each; :func:`load` rebuilds the full state from
the weights already in the model (the pretrained ones, loaded as at the start of the
run) plus the checkpoint, and checks every fingerprint, so loading other weights is an
error, not a silent change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from freezesched._validation import describe
from freezesched.freezing import FreezeController, is_frozen, thawed, unwrap

__all__ = ["FORMAT_VERSION", "STATE_KEY", "fingerprint", "load", "save"]

#: The checkpoint key under which freezesched's own state is stored (a JSON string).
STATE_KEY = "freezesched"
#: Version of what is stored under :data:`STATE_KEY`.
FORMAT_VERSION = 1

_MASK = 0xFFFFFFFF
#: Wrapper segments DCP removes from parameter names (its fully qualified names).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


def _state_dict_api() -> Any:
    import torch.distributed.checkpoint.state_dict as api

    return api


def fingerprint(tensor: torch.Tensor) -> str:
    """A checksum of a tensor's bytes, shape and dtype, in exact integer arithmetic.

    Each 4-byte word ``w`` at position ``i`` is mixed with ``i`` into two 32-bit values
    that are summed exactly in int64 (no overflow below 8 GiB), so the result does not
    depend on the device or the order of the sum. A DTensor is gathered first (a
    collective: call it on every rank).

    Examples:
        >>> a = torch.arange(6, dtype=torch.float32)
        >>> fingerprint(a) == fingerprint(a.clone())
        True
        >>> b = a.clone()
        >>> b[3] = torch.nextafter(b[3], torch.tensor(10.0))  # one bit differs
        >>> fingerprint(a) == fingerprint(b)
        False
        >>> fingerprint(a)[:17]
        'torch.float32[6]:'
    """
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    raw = full.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32).to(torch.int64) & _MASK
    index = torch.arange(words.numel(), device=words.device, dtype=torch.int64)
    mixed_index = (index * 0x27D4EB2F + 0x165667B1) & _MASK
    sums = []
    for a, b in ((0x2545F491, 0x1B873593), (0x3C6EF372, 0x5BD1E995)):
        h = (words * a) & _MASK
        h = h ^ (h >> 15)
        h = (h * b) & _MASK
        h = h ^ mixed_index
        h = (h * a) & _MASK
        h = h ^ (h >> 13)
        sums.append(int(h.sum()))
    shape = ",".join(str(d) for d in full.shape)
    return f"{full.dtype}[{shape}]:{sums[0]:x}:{sums[1]:x}"


def _fqn(name: str, *, strip_module: bool) -> str:
    """The name DCP gives a parameter (wrapper segments removed)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    if strip_module and name.startswith("module."):
        name = name[len("module.") :]
    return name


def _optimizers(
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
) -> tuple[torch.optim.Optimizer, ...]:
    if isinstance(optimizers, torch.optim.Optimizer):
        return (optimizers,)
    out = tuple(optimizers)
    for i, opt in enumerate(out):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizers[{i}] must be a torch.optim.Optimizer, got {describe(opt)}")
    return out


def _check(model: object, controller: object, only_trained: bool = False) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {describe(model)}")
    if controller is not None and not isinstance(controller, FreezeController):
        raise TypeError(
            f"controller must be a FreezeController or None, got {describe(controller)}"
        )
    if only_trained and controller is None:
        raise ValueError(
            "only_trained=True needs the controller (it knows which parameters were frozen "
            "at every tick so far); got controller=None"
        )


def save(
    checkpoint_id: str | os.PathLike[str],
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (),
    controller: FreezeController | None = None,
    *,
    only_trained: bool = False,
    storage_writer: Any = None,
) -> dict[str, Any]:
    """Save model, optimizers and the controller's state with ``torch.distributed.checkpoint``.

    Call it on every rank (it is collective), with any model DCP supports (plain, DDP,
    FSDP2; FSDP1 through DCP's own handling).

    Args:
        checkpoint_id: The checkpoint directory.
        model: The model (the wrapper, if any).
        optimizers: Its optimizers.
        controller: The :class:`~freezesched.FreezeController`, whose state is saved too.
        only_trained: Leave out the parameters the controller has kept frozen at every
            tick so far (they hold the weights the run started from); their fingerprints
            are saved instead.
        storage_writer: Passed to ``torch.distributed.checkpoint.save``.

    Returns:
        What was stored under :data:`STATE_KEY`: ``{"version", "controller", "skipped"}``,
        ``skipped`` mapping each left-out name to its fingerprint.

    Raises:
        TypeError: a wrong argument type.
        ValueError: ``only_trained`` without a controller.
    """
    _check(model, controller, only_trained)
    opts = _optimizers(optimizers)
    api = _state_dict_api()
    model_sd, optim_sd = api.get_state_dict(model, opts)
    skipped: dict[str, str] = {}
    if only_trained and controller is not None:
        for name, param in sorted(controller.untrained_parameters().items()):
            fqn = _fqn(name, strip_module=False)  # names inside the wrapper already
            if fqn in model_sd:
                skipped[fqn] = fingerprint(param)
                del model_sd[fqn]
    meta = {
        "version": FORMAT_VERSION,
        "controller": None if controller is None else controller.state_dict(),
        "skipped": skipped,
    }
    state: dict[str, Any] = {"model": model_sd, STATE_KEY: json.dumps(meta)}
    if opts:
        state["optim"] = optim_sd
    _dcp().save(state, checkpoint_id=checkpoint_id, storage_writer=storage_writer)
    return meta


def _prune_to(optim_sd: dict[str, Any], keys: set[str]) -> None:
    """Drop optimizer-state entries the checkpoint does not have (params without state)."""
    state = optim_sd.get("state", {})
    for fqn in list(state):
        entry = state[fqn]
        for name in list(entry):
            key = f"optim.state.{fqn}.{name}"
            if key not in keys and not any(k.startswith(key + ".") for k in keys):
                del entry[name]
        if not entry:
            del state[fqn]


def load(
    checkpoint_id: str | os.PathLike[str],
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (),
    controller: FreezeController | None = None,
    *,
    storage_reader: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save` wrote, whatever is frozen now and in whatever order.

    Frozen parameters get their own ``requires_grad`` back while DCP builds the state to
    load into and loads it, so their optimizer state is restored too; then the
    controller's state is loaded (which re-freezes what was frozen at the saved tick).
    For a checkpoint saved with ``only_trained=True`` the left-out parameters keep the
    values already in ``model`` (load the pretrained weights first, as at the start of
    the run), and each is checked against its saved fingerprint.

    Args:
        checkpoint_id: The checkpoint directory.
        model: The model, built as when saving.
        optimizers: Its optimizers, built as when saving (fresh ones are fine).
        controller: The controller to restore (``None``: its state is ignored).
        storage_reader: Passed to ``torch.distributed.checkpoint.load`` (default: a
            ``FileSystemReader`` on ``checkpoint_id``).

    Returns:
        What :func:`save` stored under :data:`STATE_KEY`.

    Raises:
        TypeError: a wrong argument type.
        ValueError: the checkpoint was not written by :func:`save`, the model misses or
            has extra parameters, or a left-out parameter's weights in ``model`` differ
            from those the run started from.
    """
    _check(model, controller)
    opts = _optimizers(optimizers)
    dcp = _dcp()
    api = _state_dict_api()
    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
    keys = set(reader.read_metadata().state_dict_metadata)
    if STATE_KEY not in keys:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_id)!r} has no {STATE_KEY!r} entry: it was not "
            "written by freezesched.distributed.save"
        )
    head: dict[str, Any] = {STATE_KEY: ""}
    dcp.load(head, checkpoint_id=checkpoint_id, storage_reader=reader)
    meta: dict[str, Any] = json.loads(head[STATE_KEY])
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {STATE_KEY!r} version must be {FORMAT_VERSION}, got "
            f"{meta.get('version')!r}"
        )
    skipped: dict[str, str] = meta.get("skipped", {})
    wrapped = unwrap(model) is not model
    names = {id(p): _fqn(n, strip_module=wrapped) for n, p in model.named_parameters()}
    pristine = [p for p in model.parameters() if names.get(id(p)) in skipped]
    keep_frozen = {id(p) for p in pristine}
    frozen_now = [p for p in model.parameters() if is_frozen(p) and id(p) not in keep_frozen]
    with thawed(frozen_now):
        model_sd, optim_sd = api.get_state_dict(model, opts)
        for fqn in skipped:
            model_sd.pop(fqn, None)
        state: dict[str, Any] = {"model": model_sd}
        if opts:
            _prune_to(optim_sd, keys)
            state["optim"] = optim_sd
        dcp.load(state, checkpoint_id=checkpoint_id, storage_reader=reader)
        result = api.set_state_dict(
            model,
            opts,
            model_state_dict=state["model"],
            optim_state_dict=state.get("optim", {}),
            options=api.StateDictOptions(strict=False),
        )
    missing = sorted(set(getattr(result, "missing_keys", ())) - set(skipped))
    unexpected = sorted(getattr(result, "unexpected_keys", ()))
    if missing or unexpected:
        raise ValueError(
            f"the model does not match checkpoint {os.fspath(checkpoint_id)!r}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    by_name = {names[id(p)]: p for p in pristine}
    for fqn in sorted(skipped):
        param = by_name.get(fqn)
        if param is None or fingerprint(param) != skipped[fqn]:
            raise ValueError(
                f"{fqn!r} was left out of checkpoint {os.fspath(checkpoint_id)!r} "
                "(only_trained=True: frozen at every tick, so it should still hold the weights "
                "the run started from), but the weights in the model now differ from those "
                "(fingerprint mismatch). Load the same pretrained weights as at the start of "
                "the run before calling load"
            )
    if controller is not None and meta.get("controller") is not None:
        controller.load_state_dict(meta["controller"])
    return meta
