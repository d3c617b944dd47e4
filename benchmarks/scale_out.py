"""Freezing under DDP and FSDP2 on 2 gloo CPU ranks: bytes communicated, peak memory, time.

Two measurements, each on a ViT detector (a plain ViT backbone and a conv head; the
backbone toggles with ``Step(2)``: epoch 0 trains it, epoch 1 freezes it):

* ``comm``: gradient bytes each rank hands to all-reduce per step, plain DDP (counted by
  an all-reduce hook equivalent to DDP's built-in reduction) against freezesched's
  ``register_skip_frozen_hook``, and FSDP2's reduce-scatter and all-gather bytes, per
  phase; the goal for a frozen phase is the trainable part's gradient bytes.
* ``memory``: per-rank peak of CPU tensor memory (``PeakMemoryMeter``'s allocator events,
  split by phase) and median step time, FSDP2 (``fully_shard`` per block and at the root)
  against unsharded DDP, frozen vs trainable phase, in the same run.

    python benchmarks/scale_out.py [--quick] [--json results/scale_out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import ViTDetector

from freezesched import FreezeController, Step

WORLD = 2


def model_for(args: argparse.Namespace) -> ViTDetector:
    torch.manual_seed(0)
    return ViTDetector(image=args.image, patch=16, dim=args.dim, depth=args.depth, heads=6)


def batch(args: argparse.Namespace, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(args.batch, 3, args.image, args.image, generator=g)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


# --- communication ----------------------------------------------------------------------------


def comm(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from freezesched.distributed import register_skip_frozen_hook

    out: dict[str, Any] = {}
    for variant in ("ddp", "ddp+skip_frozen_hook", "fsdp2"):
        model = model_for(args)
        head = sum(p.numel() for p in model.head.parameters()) * 4
        total = sum(p.numel() for p in model.parameters()) * 4
        counted = {"reduce": 0, "gather": 0}
        if variant == "ddp":
            wrapped: nn.Module = DDP(model, find_unused_parameters=True)

            def counting(state, bucket, counted=counted):  # type: ignore[no-untyped-def]
                # (unannotated: DDP checks a hook's annotations against the real classes)
                counted["reduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)

            wrapped.register_comm_hook(None, counting)
            stats = None
        elif variant == "ddp+skip_frozen_hook":
            wrapped = DDP(model, find_unused_parameters=True)
            stats = register_skip_frozen_hook(wrapped)
        else:
            for block in model.backbone.blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
            stats = None
            _count_fsdp(counted)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
        ctrl = FreezeController(wrapped, {"backbone": Step(2)}, optimizers=opt)
        phases: dict[str, dict[str, float]] = {}
        for epoch in range(2):
            ctrl.apply(epoch)
            per_step, times = [], []
            for i in range(args.steps):
                counted["reduce"] = counted["gather"] = 0
                if stats is not None:
                    stats.reset()
                start = time.perf_counter()
                loss_of(wrapped(batch(args, rank, i))).backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - start)
                sent = stats.sent_bytes if stats is not None else counted["reduce"]
                per_step.append((sent, counted["gather"]))
            phase = "frozen" if ctrl.frozen["backbone"] else "trainable"
            phases[phase] = {
                "reduce_bytes_per_step": statistics.median(s for s, _ in per_step[1:]),
                "gather_bytes_per_step": statistics.median(g for _, g in per_step[1:]),
                "ms_per_step": 1000 * statistics.median(times[1:]),
            }
        ctrl.release()
        _count_fsdp(None)
        out[variant] = {"phases": phases, "head_bytes": head, "total_bytes": total}
    return out


_ORIGINAL: dict[str, Any] = {}


def _count_fsdp(counted: dict[str, int] | None) -> None:
    """Count the bytes FSDP2 hands to reduce-scatter and all-gather (this script only)."""
    if counted is None:
        for name, fn in _ORIGINAL.items():
            setattr(dist, name, fn)
        _ORIGINAL.clear()
        return
    for name, key, arg in (
        ("reduce_scatter_single", "reduce", 1),
        ("all_gather_single", "gather", 1),
    ):
        original = _ORIGINAL.setdefault(name, getattr(dist, name))

        def wrapper(*a: Any, _original: Any = original, _key: str = key, _arg: int = arg,
                    **kw: Any) -> Any:  # fmt: skip
            tensor = kw.get("input", a[_arg] if len(a) > _arg else None)
            if isinstance(tensor, torch.Tensor):
                counted[_key] += tensor.numel() * tensor.element_size()
            return _original(*a, **kw)

        setattr(dist, name, wrapper)


# --- memory and time ----------------------------------------------------------------------


def memory(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.profiler import ProfilerActivity, profile, record_function

    out: dict[str, Any] = {}
    for variant in ("unsharded (DDP)", "FSDP2"):
        times: dict[str, list[float]] = {"trainable": [], "frozen": []}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model = model_for(args)
            if variant == "FSDP2":
                for block in model.backbone.blocks:
                    fully_shard(block)
                wrapped: nn.Module = fully_shard(model)
            else:
                wrapped = DDP(model, find_unused_parameters=True)
            opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
            ctrl = FreezeController(wrapped, {"backbone": Step(2)}, optimizers=opt)
            for epoch in range(2):
                ctrl.apply(epoch)
                phase = "frozen" if ctrl.frozen["backbone"] else "trainable"
                with record_function(f"phase:{phase}"):
                    for i in range(args.steps):
                        start = time.perf_counter()
                        loss_of(wrapped(batch(args, rank, i))).backward()
                        opt.step()
                        opt.zero_grad()
                        times[phase].append(time.perf_counter() - start)
            ctrl.release()
        out[variant] = {
            phase: {
                "peak_mib": peak / 2**20,
                "ms_per_step": 1000 * statistics.median(times[phase][1:]),
            }
            for phase, peak in _phase_peaks(prof).items()
        }
        del wrapped, model, opt, ctrl
    return out


def _phase_peaks(prof: Any) -> dict[str, int]:
    events = prof.profiler.kineto_results.events()
    windows = {
        e.name().split(":", 1)[1]: (e.start_ns(), e.end_ns())
        for e in events
        if e.name().startswith("phase:")
    }
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                    and getattr(e.device_type(), "name", "") == "CPU")  # fmt: skip
    peaks = dict.fromkeys(windows, 0)
    live = 0
    for t, nbytes in deltas:
        live += nbytes
        for phase, (begin, end) in windows.items():
            if begin <= t <= end:
                peaks[phase] = max(peaks[phase], live)
    return peaks


# --- driver ---------------------------------------------------------------------------------


def worker(rank: int, init: str, task: str, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        results.put((rank, globals()[task](rank, args)))
    except BaseException:
        import traceback

        results.put((rank, {"error": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


def spawn(task: str, args: argparse.Namespace) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=worker, args=(r, f"{tmp}/rdv", task, args, results))
                 for r in range(WORLD)]  # fmt: skip
        for p in procs:
            p.start()
        out = {}
        try:
            for _ in range(WORLD):
                rank, payload = results.get(timeout=args.timeout)
                out[rank] = payload
        except queue.Empty:
            pass
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if len(out) != WORLD:
        raise SystemExit(f"{task}: a rank hung or died")
    for payload in out.values():
        if "error" in payload:
            raise SystemExit(f"{task} failed:\n{payload['error']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, for CI")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.quick:
        args.dim, args.depth, args.image, args.batch, args.steps = 96, 2, 64, 2, 3
    else:
        args.dim, args.depth, args.image, args.batch, args.steps = 384, 6, 128, 4, 6
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{WORLD} gloo ranks; ViT detector dim {args.dim}, depth {args.depth}, "
          f"{args.image}x{args.image}, batch {args.batch} per rank, {args.steps} steps per phase "
          "(medians over all but the first)")  # fmt: skip
    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    comm_out = spawn("comm", args)[0]
    result["comm"] = comm_out
    head = comm_out["ddp"]["head_bytes"]
    total = comm_out["ddp"]["total_bytes"]
    print(f"\ngradient bytes per step and rank (trainable part when frozen: the head, "
          f"{head:,} B; everything: {total:,} B)")  # fmt: skip
    print(f"{'engine':22} {'phase':9} {'reduced B/step':>15} {'x goal':>7} {'gathered B/step':>16} "
          f"{'ms/step':>8}")  # fmt: skip
    for variant, data in comm_out.items():
        for phase in ("trainable", "frozen"):
            row = data["phases"][phase]
            goal = total if phase == "trainable" else head
            print(f"{variant:22} {phase:9} {row['reduce_bytes_per_step']:>15,.0f} "
                  f"{row['reduce_bytes_per_step'] / goal:>7.3f} "
                  f"{row['gather_bytes_per_step']:>16,.0f} {row['ms_per_step']:>8.1f}")  # fmt: skip
    mem = spawn("memory", args)
    result["memory"] = mem
    print("\nper-rank peak CPU tensor memory (rank 0; rank 1 in the JSON); step times from the "
          "communication run above (the memory run is slowed down by the profiler)")  # fmt: skip
    print(f"{'engine':16} {'phase':9} {'peak MiB':>9} {'ms/step':>8}")
    timing = {"unsharded (DDP)": comm_out["ddp"], "FSDP2": comm_out["fsdp2"]}
    for variant, phases in mem[0].items():
        for phase in ("trainable", "frozen"):
            ms = timing[variant]["phases"][phase]["ms_per_step"]
            print(f"{variant:16} {phase:9} {phases[phase]['peak_mib']:>9.1f} {ms:>8.1f}")
    base, sharded = mem[0]["unsharded (DDP)"], mem[0]["FSDP2"]
    for phase in ("trainable", "frozen"):
        peak = sharded[phase]["peak_mib"] / base[phase]["peak_mib"]
        ms = (timing["FSDP2"]["phases"][phase]["ms_per_step"]
              / timing["unsharded (DDP)"]["phases"][phase]["ms_per_step"])  # fmt: skip
        print(f"FSDP2 / unsharded, {phase}: peak {peak:.3f}, time {ms:.3f}")
    for variant in ("unsharded (DDP)", "FSDP2"):
        ratio = mem[0][variant]["frozen"]["peak_mib"] / mem[0][variant]["trainable"]["peak_mib"]
        ms = (timing[variant]["phases"]["frozen"]["ms_per_step"]
              / timing[variant]["phases"]["trainable"]["ms_per_step"])  # fmt: skip
        print(f"{variant}, frozen / trainable: peak {ratio:.3f}, time {ms:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
