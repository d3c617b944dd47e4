"""The frozen-feature cache: outputs of a frozen prefix, kept per sample key.

The user names the samples of each batch (:func:`sample_keys`) and promises that the
frozen module's input for a key is always the same; the cache then serves repeated keys
from memory (or disk) instead of running the module, and recomputes a random fraction of
the hits to check the promise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from freezesched._validation import check_int, describe

__all__ = [
    "FeatureCache",
    "FeatureCacheMismatchError",
    "FeatureStore",
    "current_keys",
    "sample_keys",
]

CacheDevice = Literal["same", "cpu"]


class FeatureCacheMismatchError(RuntimeError):
    """A cached frozen-module output differs from a fresh computation of it."""


@dataclass(frozen=True)
class FeatureCache:
    """Cache the outputs of a frozen prefix per sample (off unless given to ``FastFrozen``).

    With ``FastFrozen(cache=FeatureCache(...))`` and the batch's sample keys given by
    :func:`sample_keys`, a frozen module whose input needs no gradient keeps its output
    for each sample and skips its forward for samples it has seen, as long as its
    weights are unchanged (a weight change empties the cache).

    **The promise.** The frozen module's input for a key must be the same every time it
    is seen: no random augmentation (crops, flips, color jitter, mixup) before the frozen
    module. And each sample's output must depend on that sample only: the module runs on
    the sub-batch of samples the cache misses, and hits are served into any batch
    (BatchNorm with batch statistics is refused with ``ValueError``; a forward that mixes
    samples itself is not detected). A random ``verify_fraction`` of the hits is
    recomputed and compared with the cached value; a difference beyond the fast mode's
    tolerance raises :class:`FeatureCacheMismatchError`.

    Args:
        max_bytes: Memory budget for cached outputs, in bytes. Once it is used up, new
            outputs go to disk (``directory``) or are not cached; nothing is evicted (with
            epochs that repeat the same samples, evicting would make every access a miss).
        directory: Where to keep outputs that do not fit in memory (one file per sample;
            removed when the cache is emptied). ``None``: memory only.
        max_disk_bytes: Disk budget in ``directory``.
        verify_fraction: Fraction of hits recomputed and compared, in ``[0, 1]``.
        seed: Seed of the random choice of hits to verify.
        device: ``"same"`` keeps outputs on the device they were computed on; ``"cpu"``
            keeps them in host memory (and moves them back on a hit).

    Raises:
        TypeError, ValueError: an argument has the wrong type or is out of range.

    Examples:
        >>> FeatureCache(max_bytes=2**20, verify_fraction=0.05).verify_fraction
        0.05
    """

    max_bytes: int = 2**30
    directory: str | None = None
    max_disk_bytes: int = 16 * 2**30
    verify_fraction: float = 0.01
    seed: int = 0
    device: CacheDevice = "same"

    def __post_init__(self) -> None:
        check_int(self.max_bytes, "max_bytes", maximum=2**62)
        check_int(self.max_disk_bytes, "max_disk_bytes", maximum=2**62)
        check_int(self.seed, "seed", maximum=2**63 - 1)
        if self.directory is not None and not isinstance(self.directory, str | os.PathLike):
            raise TypeError(f"directory must be a path or None, got {describe(self.directory)}")
        if self.directory is not None:
            object.__setattr__(self, "directory", os.fspath(self.directory))
        fraction = self.verify_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"verify_fraction must be a number in [0, 1], got {describe(fraction)}")
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {fraction!r}")
        object.__setattr__(self, "verify_fraction", float(fraction))
        if self.device not in ("same", "cpu"):
            raise ValueError(f"device must be 'same' or 'cpu', got {self.device!r}")


# --- the keys of the current batch --------------------------------------------------------

_KEYS = threading.local()


class _Block:
    """One :func:`sample_keys` block: its keys and the input each cached module got in it."""

    __slots__ = ("inputs", "keys")

    def __init__(self, keys: tuple[Hashable, ...]) -> None:
        self.keys = keys
        #: ``id`` of a module's fast-mode state -> its first input in the block and the
        #: input's ``_version`` then (kept alive until the block ends).
        self.inputs: dict[int, tuple[torch.Tensor, int]] = {}


@contextlib.contextmanager
def sample_keys(keys: Sequence[Hashable] | torch.Tensor) -> Iterator[tuple[Hashable, ...]]:
    """Name the samples of the batch run inside the block, for the feature cache.

    One key per sample, in batch order (a dataset index, a file name): the same key
    must always mean the same input to the frozen module. Keys apply to the current
    thread; blocks nest (the innermost wins). Within one block, a cached module must be
    given one input: calling it again with a different input (a second view of the
    batch) raises ``ValueError``, since the keys cannot name both; give each view its
    own block and keys. The block keeps a reference to each cached module's input until
    it ends.

    Args:
        keys: A sequence of hashable keys, or a 1-D integer tensor of them.

    Raises:
        TypeError: ``keys`` is not a sequence of hashable values or a 1-D integer tensor.
        ValueError: ``keys`` is empty.

    Examples:
        >>> import torch
        >>> with sample_keys(torch.tensor([3, 1, 4])) as keys:
        ...     keys
        (3, 1, 4)
    """
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 1 or keys.is_floating_point() or keys.is_complex():
            raise TypeError(
                f"keys as a tensor must be 1-D with an integer dtype, got shape "
                f"{tuple(keys.shape)} and dtype {keys.dtype}"
            )
        found: tuple[Hashable, ...] = tuple(keys.tolist())
    elif isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise TypeError(f"keys must be a sequence of hashable keys, got {describe(keys)}")
    else:
        found = tuple(keys)
        for i, key in enumerate(found):
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"keys[{i}] must be hashable, got {describe(key)}") from None
    if not found:
        raise ValueError("keys must name at least one sample, got an empty sequence")
    stack: list[_Block] = getattr(_KEYS, "stack", None) or []
    _KEYS.stack = stack
    block = _Block(found)
    stack.append(block)
    try:
        yield found
    finally:
        stack.pop()
        block.inputs.clear()


def current_keys() -> tuple[Hashable, ...] | None:
    """The keys of the innermost :func:`sample_keys` block in this thread, if any."""
    stack = getattr(_KEYS, "stack", None)
    return stack[-1].keys if stack else None


def other_input(owner: int, x: torch.Tensor) -> str:
    """Whether ``x`` differs from the input ``owner`` got earlier in the innermost block.

    The first input of each ``owner`` in a block is recorded; a later one is the same if it
    is the same tensor or a view of the same memory (same address, shape, strides and
    dtype), unchanged (``_version``), or a tensor equal to it (NaNs in the same places).

    Returns:
        ``""`` if ``x`` is the first or the same input, else how it differs.
    """
    stack: list[_Block] | None = getattr(_KEYS, "stack", None)
    if not stack:
        return ""
    inputs = stack[-1].inputs
    first = inputs.get(owner)
    if first is None:
        inputs[owner] = (x, x._version)
        return ""
    seen, version = first
    if x is seen and x._version == version:
        return ""
    if seen._version != version:
        return "its first input was changed in place since"
    if x is seen:
        return "the same tensor, changed in place since"
    if x.shape != seen.shape or x.dtype != seen.dtype or x.device != seen.device:
        return "a tensor of another shape, dtype or device"
    if _same_memory(x, seen) and x._version == version:  # a view of the first input
        return ""
    if not _equal(x, seen):
        return "a tensor with other values"
    return ""


def _same_memory(x: torch.Tensor, seen: torch.Tensor) -> bool:
    """Whether ``x`` reads the same elements of the same memory as ``seen``."""
    if x.layout != torch.strided or seen.layout != torch.strided:
        return False
    try:
        return x.data_ptr() == seen.data_ptr() and x.stride() == seen.stride()
    except Exception:  # a tensor without storage
        return False


def _equal(x: torch.Tensor, seen: torch.Tensor) -> bool:
    """``torch.equal``, with NaNs equal where both have them."""
    if torch.equal(x, seen):
        return True
    if not (x.is_floating_point() or x.is_complex()):
        return False
    return bool(torch.allclose(x, seen, rtol=0.0, atol=0.0, equal_nan=True))


# --- the store ---------------------------------------------------------------------------


class FeatureStore:
    """The cached outputs of one frozen module (one weight state)."""

    def __init__(self, spec: FeatureCache, tag: str) -> None:
        self.spec = spec
        self.tag = tag
        self.treespec: pytree.TreeSpec | None = None
        self.memory: dict[Hashable, list[torch.Tensor]] = {}
        self.disk: dict[Hashable, Path] = {}
        self.bytes = 0
        self.disk_bytes = 0
        self.not_stored = 0
        #: Per module-mode signature: why the module's outputs may depend on the rest of
        #: the batch (``""``: nothing found). Emptied with the cache (the weights, buffers
        #: or submodules changed).
        self.batch_dependence: dict[Hashable, str] = {}
        self.rng = torch.Generator().manual_seed(spec.seed)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.memory or key in self.disk

    def get(self, key: Hashable, device: torch.device) -> list[torch.Tensor]:
        if key in self.memory:
            return [t.to(device, non_blocking=True) for t in self.memory[key]]
        loaded: list[torch.Tensor] = torch.load(self.disk[key], weights_only=True)
        return [t.to(device) for t in loaded]

    def put(self, key: Hashable, leaves: list[torch.Tensor]) -> None:
        if key in self:
            return
        if self.spec.device == "cpu":
            leaves = [t.to("cpu") for t in leaves]
        size = sum(t.numel() * t.element_size() for t in leaves)
        if self.bytes + size <= self.spec.max_bytes:
            self.memory[key] = leaves
            self.bytes += size
        elif self.spec.directory is not None and self.disk_bytes + size <= self.spec.max_disk_bytes:
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
            path = Path(self.spec.directory) / f"freezesched-{self.tag}-{digest}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save([t.to("cpu") for t in leaves], path)
            self.disk[key] = path
            self.disk_bytes += size
        else:
            self.not_stored += 1

    def verify_mask(self, n: int) -> list[bool]:
        if self.spec.verify_fraction <= 0.0:
            return [False] * n
        draws = torch.rand(n, generator=self.rng)
        return [bool(d < self.spec.verify_fraction) for d in draws]

    def clear(self) -> None:
        for path in self.disk.values():
            with contextlib.suppress(OSError):
                path.unlink()
        self.memory.clear()
        self.disk.clear()
        self.bytes = self.disk_bytes = 0
        self.treespec = None
        self.batch_dependence.clear()


def split(output: Any, batch: int) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """The tensor leaves of ``output`` (each with ``batch`` rows) and its structure.

    Raises:
        ValueError: a leaf is not a tensor with ``batch`` rows.
    """
    leaves, spec = pytree.tree_flatten(output)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != batch:
            shape = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else describe(leaf)
            raise ValueError(
                "the feature cache keeps one row per sample of each output, so every output "
                f"of the frozen module must be a tensor with the batch ({batch}) as its first "
                f"dimension; output leaf {i} is {shape}. Turn the cache off for this module"
            )
    return leaves, spec
