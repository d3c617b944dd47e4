"""A DDP communication hook that moves no bytes for frozen parameters.

DDP all-reduces every gradient bucket at every step, whether or not the parameters in it
received a gradient: with a backbone frozen after wrapping, a frozen phase moves exactly
as many bytes as a trainable one. The hook below looks at ``requires_grad`` of each
bucket's parameters when the bucket is ready and

* skips a bucket whose parameters are all frozen (no collective at all),
* all-reduces the whole bucket when they all train (as DDP's default does), and
* packs only the trainable gradients of a mixed bucket into one tensor, all-reduces
  that, and writes the result back.

Every rank takes the same decision because the freeze state comes from a deterministic
schedule; a per-step check (one all-reduce of two integers) makes sure of it, so ranks
that disagree raise an error instead of hanging or diverging. Gradients are scaled by
``1 / world_size`` before the sum, as DDP's built-in reduction does, so on two ranks the
result is bitwise that of plain DDP (with more ranks, packing changes which chunk of the
ring each element is summed in, so results agree to rounding, as when DDP's own bucket
sizes change).
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations at
# registration, and they must be the real classes, not strings.
import zlib
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from freezesched._validation import describe
from freezesched.freezing import managed_parameters

__all__ = ["CommStats", "register_skip_frozen_hook", "skip_frozen_hook"]


@dataclass
class CommStats:
    """What :func:`skip_frozen_hook` sent and skipped, summed over the steps so far.

    Attributes:
        process_group: The group the gradients are averaged over (``None``: the default).
        steps: Backward passes seen (buckets with index 0).
        sent_elements: Gradient elements all-reduced.
        skipped_elements: Gradient elements of frozen parameters not communicated.
        sent_bytes: Bytes all-reduced (each rank's contribution).
        skipped_bytes: Bytes not communicated.
        check_ranks: Check once per step that all ranks froze the same parameters.
        params: The parameters DDP manages, in bucket order (for the rank check).
    """

    process_group: Any = None
    steps: int = 0
    sent_elements: int = 0
    skipped_elements: int = 0
    sent_bytes: int = 0
    skipped_bytes: int = 0
    check_ranks: bool = True
    params: list[torch.Tensor] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        """Zero the counters (e.g. at the start of a phase)."""
        self.steps = self.sent_elements = self.skipped_elements = 0
        self.sent_bytes = self.skipped_bytes = 0

    def _check_same_freeze_state(self, device: torch.device) -> None:
        mask = bytes(int(p.requires_grad) for p in self.params)
        signature = zlib.crc32(mask)
        # On the gradients' device: NCCL reduces only tensors on the GPU.
        both = torch.tensor([signature, -signature], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(
                "ranks froze different parameters in the same step (the freeze state of the "
                "DDP-managed parameters differs between ranks), so the communication hook "
                "cannot skip the same gradients on all of them. Freeze from the same "
                "deterministic schedule and tick on every rank"
            )


def skip_frozen_hook(
    stats: CommStats,
    bucket: dist.GradBucket,  # type: ignore[name-defined]  # (real class: DDP checks it)
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only the gradients of parameters that train.

    Register it with :func:`register_skip_frozen_hook` (or
    ``ddp.register_comm_hook(CommStats(), skip_frozen_hook)``).

    Args:
        stats: Where the bytes are counted; also holds the process group.
        bucket: The bucket DDP hands over.

    Returns:
        A future holding the bucket's buffer with the averaged gradients of trainable
        parameters (frozen parameters' slots are left as they were; DDP writes no
        gradient for a parameter no rank used).
    """
    group = stats.process_group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    if bucket.index() == 0:
        stats.steps += 1
        if stats.check_ranks and stats.params:
            stats._check_same_freeze_state(buffer.device)
    params = bucket.parameters()
    grads = bucket.gradients()
    train = [p.requires_grad for p in params]
    size = buffer.element_size()
    if all(train):
        stats.sent_elements += buffer.numel()
        stats.sent_bytes += buffer.numel() * size
        buffer.mul_(1.0 / world)  # exactly what DDP's built-in reduction multiplies by
        work = dist.all_reduce(buffer, group=group, async_op=True)
        return cast(
            torch.futures.Future[torch.Tensor],
            work.get_future().then(lambda fut: fut.value()[0]),
        )
    kept = [g for g, t in zip(grads, train, strict=True) if t]
    skipped = sum(g.numel() for g, t in zip(grads, train, strict=True) if not t)
    stats.skipped_elements += skipped
    stats.skipped_bytes += skipped * size
    if not kept:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    packed = torch.cat([g.reshape(-1) for g in kept])
    stats.sent_elements += packed.numel()
    stats.sent_bytes += packed.numel() * size
    packed.mul_(1.0 / world)
    work = dist.all_reduce(packed, group=group, async_op=True)

    def unpack(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = fut.value()[0]
        offset = 0
        for g in kept:
            n = g.numel()
            g.copy_(reduced[offset : offset + n].view_as(g))
            offset += n
        return cast(torch.Tensor, buffer)

    return cast(torch.futures.Future[torch.Tensor], work.get_future().then(unpack))


def register_skip_frozen_hook(
    ddp: nn.parallel.DistributedDataParallel,
    process_group: Any = None,
    *,
    check_ranks: bool = True,
) -> CommStats:
    """Make ``ddp`` communicate only the gradients of parameters that train now.

    Results are those of plain DDP (bitwise on two ranks; see the module notes for more),
    and a frozen phase all-reduces only the trainable parameters' gradients. Freezing
    after wrapping still needs ``find_unused_parameters=True`` (DDP's reducer waits for
    every managed parameter otherwise); freezesched refuses other settings.

    Args:
        ddp: The wrapper; register before the first backward.
        process_group: The group to average over (default: the one ``ddp`` uses, which
            is the default group unless you passed one).
        check_ranks: Check once per step (one all-reduce of two integers) that every
            rank froze the same parameters, and raise instead of hanging if not.

    Returns:
        The counters the hook updates.

    Raises:
        TypeError: ``ddp`` is not a ``DistributedDataParallel``.
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"ddp must be a torch.nn.parallel.DistributedDataParallel, got {describe(ddp)}"
        )
    group = process_group if process_group is not None else getattr(ddp, "process_group", None)
    stats = CommStats(process_group=group, check_ranks=check_ranks)
    stats.params = list(managed_parameters(ddp))
    ddp.register_comm_hook(stats, skip_frozen_hook)
    return stats
