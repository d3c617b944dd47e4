"""Bytes that autograd keeps alive for backward, counted at the source."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from typing_extensions import Self

__all__ = ["PeakMemoryMeter", "SavedTensorMeter"]


def _storage_key(tensor: torch.Tensor) -> int:
    """The identity of the storage behind ``tensor`` (its C++ object, alive while saved)."""
    key: int = tensor.untyped_storage()._cdata
    return key


class SavedTensorMeter:
    """Count the memory autograd saves for backward while the block runs.

    Every tensor that an autograd node saves passes through
    :func:`torch.autograd.graph.saved_tensors_hooks`; the meter records the storage
    behind each one, counting each storage once (a saved view keeps its whole storage
    alive). This is device independent and exact, unlike allocator peaks. Weights that
    trainable layers save are included (they are referenced, not copied); under a frozen
    guard nothing is saved for the frozen part at all.

    Storages are told apart by identity, not address, so the meter also works on fake
    tensors (``torch._subclasses.FakeTensorMode``), which have no memory.

    Args:
        exclude: Tensors whose storages are not counted (e.g. the parameters, which a
            memory plan counts as weights).

    Attributes:
        bytes: Total bytes of the distinct storages saved so far.
        tensors: Number of saved tensors (with repeats).
        largest: Bytes of the largest storage saved.

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
        self.largest = 0
        self._seen: set[int] = {_storage_key(t) for t in exclude}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        key = _storage_key(tensor)
        if key not in self._seen:
            self._seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            self.bytes += nbytes
            self.largest = max(self.largest, nbytes)
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


class PeakMemoryMeter:
    """The peak of CPU tensor memory while the block runs, from the allocator's own events.

    PyTorch's CPU allocator reports every allocation and free to the profiler when it
    records memory (``torch.profiler.profile(profile_memory=True)``). The meter sums
    those signed sizes in time order: :attr:`peak` is the largest total of tensor bytes
    allocated inside the block and alive at one moment (tensors that existed before the
    block are not counted; allocate what you want counted inside it). Exact for tensor
    memory (not for the process's other memory), and independent of the allocator's
    caching, which the CPU allocator does not do.

    Attributes:
        peak: Bytes at the peak.
        end: Bytes still alive when the block ended.

    Examples:
        >>> with PeakMemoryMeter() as meter:
        ...     a = torch.empty(1000)  # 4000 bytes
        ...     b = torch.empty(500)  # 2000 more
        ...     del a
        >>> meter.peak, meter.end
        (6000, 2000)
    """

    def __init__(self) -> None:
        self.peak = 0
        self.end = 0
        self._profile: torch.profiler.profile | None = None

    def __enter__(self) -> Self:
        self._profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        self._profile.__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        profile, self._profile = self._profile, None
        if profile is None:
            return
        profile.__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        results = profile.profiler.kineto_results if profile.profiler is not None else None
        events = results.events() if results is not None else []
        deltas = sorted(
            (e.start_ns(), e.nbytes())  # type: ignore[attr-defined]
            for e in events
            if e.name() == "[memory]" and getattr(e.device_type(), "name", "") == "CPU"
        )
        live = peak = 0
        for _, nbytes in deltas:
            live += nbytes
            peak = max(peak, live)
        self.peak, self.end = peak, live
