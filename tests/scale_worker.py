"""Workers for tests/test_scale_out.py: one rank each, on gloo (a module of its own, for spawn).

Every worker puts ``(rank, "ok" | "error", payload)`` on the results queue (see
``helpers.run_ranks``); what it checks is returned as plain data and asserted by the test.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from freezesched import Constant, FreezeController, FrozenStageGuard, Step, freeze

EPOCHS = 4
STEPS = 2


class Tiny(nn.Module):
    """A backbone (stem, two blocks, a norm) and a head: enough for FSDP units and groups."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = nn.Linear(6, 12)
        self.backbone.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(12, 12), nn.GELU()) for _ in range(2)
        )
        self.backbone.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.stem(x)
        for block in self.backbone.blocks:
            h = h + block(h)
        return self.head(self.backbone.norm(h))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in module.named_parameters()}


def plain(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Tensors as NumPy arrays: pickled by value (torch shares tensors between processes
    through file descriptors, which die with the rank)."""
    return {k: v.numpy() for k, v in state.items()}


def moved(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if not torch.equal(before[n], full(p))]


def ranks_differ(module: nn.Module, world: int) -> int:
    flat = torch.cat([full(p).reshape(-1) for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return sum(not torch.equal(g, gathered[0]) for g in gathered)


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip


def run(rank: int, world: int, init_file: str, task: str, *args: Any) -> None:
    """One rank of ``task`` (a function of this module): ``task(rank, world, *args)``."""
    *args_, results = args
    try:
        _init(rank, world, init_file)
        results.put((rank, "ok", globals()[task](rank, world, *args_)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- training loops shared by the engines -------------------------------------------------


def _train(
    model: nn.Module,
    inner: nn.Module,
    opt: torch.optim.Optimizer,
    ctrl: FreezeController,
    rank: int,
    world: int,
    *,
    guard: FrozenStageGuard | None = None,
    validate: bool = True,
    epochs: range = range(EPOCHS),
) -> dict[str, Any]:
    """Toggle ``backbone`` per epoch (the controller) and ``backbone.blocks.1`` per step
    (the guard); check what the issue asks after every step."""
    out: dict[str, Any] = {"frozen_moved": [], "trainable_still": [], "frozen_grads": [],
                           "rank_mismatches": 0, "frozen_epochs": []}  # fmt: skip
    step = epochs.start * STEPS
    out["unsharded_at_apply"] = 0
    for epoch in epochs:
        # after the no_grad pass, FSDP2's root group is registered unsharded here
        out["unsharded_at_apply"] += sum(type(p).__name__ != "DTensor" for p in inner.parameters())
        ctrl.apply(epoch)
        if ctrl.frozen["backbone"]:
            out["frozen_epochs"].append(epoch)
        epoch_start = snapshot(inner.backbone)
        for _ in range(STEPS):
            x, y = data(rank, step)
            block = inner.backbone.blocks[1]
            before_block = snapshot(block)
            region = guard(block, step) if guard is not None else contextlib.nullcontext()
            with region:
                nn.functional.cross_entropy(model(x), y).backward()
                frozen_now = [p for p in inner.parameters() if not p.requires_grad]
                out["frozen_grads"] += [p.grad is not None for p in frozen_now]
            opt.step()
            opt.zero_grad()
            if guard is not None and any(guard.decide(step)) and not ctrl.frozen["backbone"]:
                out["frozen_moved"] += moved(before_block, block)
            step += 1
            out["rank_mismatches"] += ranks_differ(inner, world)
        if ctrl.frozen["backbone"]:
            out["frozen_moved"] += moved(epoch_start, inner.backbone)
        else:
            out["trainable_still"].append(not moved(epoch_start, inner.backbone))
        if validate:  # a no_grad pass: FSDP2 keeps the root's parameters unsharded after it
            with torch.no_grad():
                model(data(rank, 999)[0])
    return out


def _state_of(opt: torch.optim.Optimizer, names: list[str], prefix: str) -> int:
    """How many of the optimizer's parameters named ``prefix...`` have state.

    ``names`` are the model's parameter names in the order the optimizer got them (the
    modules may hold other, unsharded, parameter objects by now).
    """
    params = opt.param_groups[0]["params"]
    return sum(bool(opt.state.get(p)) for n, p in zip(names, params, strict=True)
               if n.startswith(prefix))  # fmt: skip


# --- FSDP2 ----------------------------------------------------------------------------------


def fsdp2(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = tiny()
    for block in model.backbone.blocks:
        fully_shard(block)
    fully_shard(model)  # stem, norm and head: one root group
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ctrl = FreezeController(
        model,
        {"backbone": Step(2), "backbone.stem": Constant(True)},  # the stem: frozen throughout
        optimizers=opt,
        on_unfreeze="keep",
    )
    out = _train(model, model, opt, ctrl, rank, world, guard=FrozenStageGuard(Step(3)))
    out["stem_state"] = _state_of(opt, names, "backbone.stem.")
    out["head_state"] = _state_of(opt, names, "head.")
    out["sharded"] = all(
        type(p).__name__ == "DTensor" for group in opt.param_groups for p in group["params"]
    )
    ctrl.release()
    return out


# --- FSDP1 ----------------------------------------------------------------------------------


def _fsdp1(model: nn.Module, use_orig_params: bool) -> nn.Module:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    policy = functools.partial(
        lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, nn.Sequential)
    )
    # Each block is a unit; stem, norm and head share the root's flat parameter.
    return FSDP(
        model,
        auto_wrap_policy=policy,
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )


def fsdp1(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, Any] = {}
    # use_orig_params=False: refused before the first step, by the controller and the guard.
    model = tiny()
    wrapped = _fsdp1(model, use_orig_params=False)
    with FSDP.summon_full_params(wrapped):
        before = snapshot(model)
    try:
        FreezeController(wrapped, {"backbone.stem": Step(2)})
        out["controller_refused"] = ""
    except ValueError as error:
        out["controller_refused"] = str(error)
    try:
        with FrozenStageGuard(Constant(True))(model.backbone.stem, 0):
            pass
        out["guard_refused"] = ""
    except ValueError as error:
        out["guard_refused"] = str(error)
    with FSDP.summon_full_params(wrapped):
        out["refused_untouched"] = not moved(before, model)
    # use_orig_params=True: the stem is frozen inside the root's flat-parameter unit.
    model = tiny()
    wrapped = _fsdp1(model, use_orig_params=True)
    names = [n.replace("_fsdp_wrapped_module.", "") for n, _ in wrapped.named_parameters()]
    opt = torch.optim.AdamW(wrapped.parameters(), lr=0.05, weight_decay=0.1)
    ctrl = FreezeController(
        wrapped,
        {"backbone": Step(2), "backbone.stem": Constant(True)},
        optimizers=opt,
        on_unfreeze="keep",
    )
    stem_before = None
    with FSDP.summon_full_params(wrapped):
        stem_before = snapshot(model.backbone.stem)
    result = _train_fsdp1(wrapped, model, opt, ctrl, rank, world)
    with FSDP.summon_full_params(wrapped):
        result["stem_moved"] = moved(stem_before, model.backbone.stem)
    # Each rank holds a shard of the root's flat parameter: the stem's may be empty here.
    result["stem_local"] = sum(p.numel() for p in model.backbone.stem.parameters())
    result["stem_state"] = _state_of(opt, names, "backbone.stem.")
    result["head_state"] = _state_of(opt, names, "head.")
    ctrl.release()
    out.update(result)
    return out


def _train_fsdp1(
    wrapped: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    ctrl: FreezeController,
    rank: int,
    world: int,
) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, Any] = {"frozen_moved": [], "trainable_still": [], "frozen_grads": [],
                           "rank_mismatches": 0, "frozen_epochs": []}  # fmt: skip
    step = 0
    for epoch in range(EPOCHS):
        ctrl.apply(epoch)
        if ctrl.frozen["backbone"]:
            out["frozen_epochs"].append(epoch)
        with FSDP.summon_full_params(wrapped):
            start = snapshot(model.backbone)
        for _ in range(STEPS):
            x, y = data(rank, step)
            nn.functional.cross_entropy(wrapped(x), y).backward()
            out["frozen_grads"] += [
                p.grad is not None for p in model.parameters() if not p.requires_grad
            ]
            opt.step()
            opt.zero_grad()
            step += 1
        with FSDP.summon_full_params(wrapped):
            changed = moved(start, model.backbone)
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            out["rank_mismatches"] += sum(not torch.equal(g, gathered[0]) for g in gathered)
        if ctrl.frozen["backbone"]:
            out["frozen_moved"] += changed
        else:
            # the stem stays frozen; the blocks, norm must move
            out["trainable_still"].append(not [n for n in changed if not n.startswith("stem")])
    return out


# --- DDP communication hook -------------------------------------------------------------------


def comm_hook(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from freezesched.distributed import register_skip_frozen_hook

    runs = {}
    stats = None
    for hooked in (False, True):
        model = tiny()
        ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.0002)  # several buckets
        if hooked:
            stats = register_skip_frozen_hook(ddp)
        opt = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
        ctrl = FreezeController(ddp, {"backbone": Step(2)}, optimizers=opt)
        history, sent = [], []
        step = 0
        for epoch in range(EPOCHS):
            ctrl.apply(epoch)
            for _ in range(STEPS):
                if stats is not None:
                    stats.reset()
                x, y = data(rank, step)
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
                history.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
                if stats is not None:
                    sent.append(
                        (ctrl.frozen["backbone"], stats.sent_elements, stats.skipped_elements)
                    )
                step += 1
        ctrl.release()
        runs[hooked] = history
        if hooked:
            head = sum(p.numel() for p in model.head.parameters())
            total = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {
        "bitwise_equal_steps": sum(
            torch.equal(a, b) for a, b in zip(runs[False], runs[True], strict=True)
        ),
        "steps": len(runs[True]),
        "sent": sent,
        "head": head,
        "total": total,
    }
    # Ranks that froze different parameters: an error on every rank, not a hang.
    model = tiny()
    ddp = DDP(model, find_unused_parameters=True)
    register_skip_frozen_hook(ddp)
    x, y = data(rank, 0)
    region = freeze(model.head) if rank == 0 else freeze(nn.Identity())
    try:
        with region:
            nn.functional.cross_entropy(ddp(x), y).backward()
        out["mismatch_error"] = ""
    except RuntimeError as error:
        out["mismatch_error"] = str(error)
    return out


# --- distributed checkpoints --------------------------------------------------------------------

SCHEDULES: dict[str, Any] = {"backbone.stem": Step(math.inf), "backbone": Step(2)}
CKPT_EPOCH = 2  # saved after epoch 2's steps; epoch 3 is frozen, epoch 4 unfreezes with "keep"
LAST_EPOCH = 6


def _dcp_setup() -> tuple[nn.Module, torch.optim.Optimizer, FreezeController]:
    from torch.distributed.fsdp import fully_shard

    model = tiny()
    for block in model.backbone.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ctrl = FreezeController(model, SCHEDULES, optimizers=opt, on_unfreeze="keep")
    return model, opt, ctrl


def _dcp_epochs(model, opt, ctrl, rank: int, epochs: range) -> None:
    for epoch in epochs:
        ctrl.apply(epoch)
        for i in range(STEPS):
            x, y = data(rank, epoch * STEPS + i)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()


def dcp_save(rank: int, world: int, directory: str) -> dict[str, Any]:
    from freezesched.distributed import save

    model, opt, ctrl = _dcp_setup()
    _dcp_epochs(model, opt, ctrl, rank, range(CKPT_EPOCH + 2))  # epochs 0..3; 3 is frozen
    with torch.no_grad():  # a validation pass: FSDP2 leaves the root group gathered
        model(data(rank, 999)[0])
    save(f"{directory}/full", model, opt, ctrl)
    meta = save(f"{directory}/trained", model, opt, ctrl, only_trained=True)
    frozen_with_state = sum(bool(opt.state.get(p)) for p in model.backbone.blocks.parameters())
    _dcp_epochs(model, opt, ctrl, rank, range(CKPT_EPOCH + 2, LAST_EPOCH))
    ctrl.release()
    return {"final": plain(snapshot(model)), "skipped": sorted(meta["skipped"]),
            "frozen_with_state": frozen_with_state}  # fmt: skip


def dcp_resume(rank: int, world: int, directory: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dsd

    from freezesched.distributed import load

    out: dict[str, Any] = {}
    first = CKPT_EPOCH + 2
    # A: the controller restored first (the order the project's docs used to recommend).
    model, opt, ctrl = _dcp_setup()
    saved = _controller_state(directory)
    ctrl.load_state_dict(saved)
    load(f"{directory}/full", model, opt, ctrl)
    _dcp_epochs(model, opt, ctrl, rank, range(first, LAST_EPOCH))
    out["controller_first"] = plain(snapshot(model))
    ctrl.release()
    # B: load() alone (it restores the controller last), then a validation pass first.
    model, opt, ctrl = _dcp_setup()
    load(f"{directory}/full", model, opt, ctrl)
    with torch.no_grad():
        model(data(rank, 999)[0])
    _dcp_epochs(model, opt, ctrl, rank, range(first, LAST_EPOCH))
    out["load_only"] = plain(snapshot(model))
    ctrl.release()
    # C: only what trains, rebuilt from the "pretrained" weights (the model as built).
    model, opt, ctrl = _dcp_setup()
    load(f"{directory}/trained", model, opt, ctrl)
    _dcp_epochs(model, opt, ctrl, rank, range(first, LAST_EPOCH))
    out["only_trained"] = plain(snapshot(model))
    ctrl.release()
    # D: other "pretrained" weights than the run started from: an error naming the tensor.
    model, opt, ctrl = _dcp_setup()
    with torch.no_grad():
        model.backbone.stem.weight.add_(1e-3)
    try:
        load(f"{directory}/trained", model, opt, ctrl)
        out["wrong_pretrained"] = ""
    except ValueError as error:
        out["wrong_pretrained"] = str(error)
    ctrl.release()
    # E: DCP's own set_state_dict after the controller: refused at the first apply.
    model, opt, ctrl = _dcp_setup()
    ctrl.load_state_dict(saved)
    model_sd, optim_sd = dsd.get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=f"{directory}/full")
    dsd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out["raw_dcp_lost_state"] = sum(
        not opt.state.get(p) for p in model.backbone.blocks.parameters()
    )
    try:
        ctrl.apply(first)
        out["raw_dcp_refused"] = ""
    except ValueError as error:
        out["raw_dcp_refused"] = str(error)
    ctrl.release()
    return out


def _controller_state(directory: str) -> dict[str, Any]:
    import json

    import torch.distributed.checkpoint as dcp

    from freezesched.distributed import STATE_KEY

    head = {STATE_KEY: ""}
    dcp.load(head, checkpoint_id=f"{directory}/full")
    state: dict[str, Any] = json.loads(head[STATE_KEY])["controller"]
    return state
