"""Bytes that autograd keeps alive for backward, counted at the source."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from typing_extensions import Self

__all__ = ["SavedTensorMeter"]


class SavedTensorMeter:
    """Count the memory autograd saves for backward while the block runs.

    Every tensor that an autograd node saves passes through
    :func:`torch.autograd.graph.saved_tensors_hooks`; the meter records the storage
    behind each one, counting each storage once (a saved view keeps its whole storage
    alive). This is device independent and exact, unlike allocator peaks. Weights that
    trainable layers save are included (they are referenced, not copied); under a frozen
    guard nothing is saved for the frozen part at all.

    Attributes:
        bytes: Total bytes of the distinct storages saved so far.
        tensors: Number of saved tensors (with repeats).

    Examples:
        >>> x = torch.ones(4, requires_grad=True)
        >>> w = torch.ones(4, requires_grad=True)
        >>> with SavedTensorMeter() as meter:
        ...     loss = (x * w).sum()  # each operand is saved for the other's gradient
        >>> meter.bytes, meter.tensors
        (32, 2)
        >>> with SavedTensorMeter() as meter, torch.no_grad():
        ...     loss = (x * w).sum()
        >>> meter.bytes
        0
        >>> with SavedTensorMeter(exclude=[w]) as meter:  # activations only
        ...     loss = (x * w).sum()
        >>> meter.bytes, meter.tensors
        (16, 2)
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.bytes = 0
        self.tensors = 0
        self._seen: set[tuple[torch.device, int]] = {
            (t.device, t.untyped_storage().data_ptr()) for t in exclude
        }
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> Self:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(exc_type, exc, tb)
            self._hooks = None
