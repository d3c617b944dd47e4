"""The example on 2 processes (gloo, CPU): the accounting it writes is the whole run's.

The first release wrote each rank's own count from every rank, so ΔTFLOPs came out at
1/N of the truth on N GPUs. Two ranks with one image each per step must write the same
totals as one process with both images per step, over the same data.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue

import dist_worker
import pytest
from mmengine.runner import Runner
from synthetic import make_dota

WORLD = 2
TIMEOUT = 600  # seconds; a hung rank fails the test instead of the CI run


def run_ranks(*args) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=dist_worker.run, args=(r, WORLD, *args, results))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(WORLD):
            rank, status, payload = results.get(timeout=TIMEOUT)
            out[rank] = (status, payload)
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert len(out) == WORLD, f"a rank hung or died: got {sorted(out)}"
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank} failed:\n{payload}"
    return {rank: payload for rank, (_, payload) in out.items()}


def test_two_ranks_write_the_single_process_totals(tmp_path):
    data = tmp_path / "data"
    make_dota(data, "train", 4, seed=0)
    make_dota(data, "val", 2, seed=1)
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    Runner.from_cfg(dist_worker.config(data, single_dir, launcher="none", world_size=1)).train()
    ranks = run_ranks(str(tmp_path / "rendezvous"), str(data), str(multi_dir))
    assert [ranks[r]["batch"] for r in range(WORLD)] == [1, 1]  # total 2 split over 2

    single = json.loads((single_dir / "freezesched_accounting.json").read_text())
    multi = json.loads((multi_dir / "freezesched_accounting.json").read_text())
    assert (multi["world_size"], multi["batch_per_gpu"], multi["total_batch"]) == (2, 1, 2)
    assert (single["world_size"], single["batch_per_gpu"], single["total_batch"]) == (1, 2, 2)
    s, m = single["run"]["totals"], multi["run"]["totals"]
    assert m["samples"] == s["samples"] == 2 * 4  # 2 epochs x 4 images, not 4 (one rank's)
    assert m["steps"] == s["steps"] == 2 * 2  # ranks step together
    # Per-sample costs are averaged over the counted steps (a detector's loss depends on
    # each image's boxes); the same 4 images are counted either way.
    for key in ("flops_measured", "flops_2x", "delta_flops_measured", "delta_flops_2x"):
        assert m[key] == pytest.approx(s[key], rel=1e-4), key
    assert m["delta_flops_2x"] < 0 and m["delta_flops_measured"] < 0
    assert [e["samples"] for e in multi["epochs"]] == [e["samples"] for e in single["epochs"]]
    assert [e["samples"] for e in multi["epochs"]] == [{"": 4}, {"backbone": 4}]
