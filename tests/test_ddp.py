"""DistributedDataParallel: 2 processes on gloo (CPU), freezing toggled several times."""

from __future__ import annotations

import queue

import ddp_worker
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT = 120  # seconds; a hang fails the test instead of the CI run


def test_ddp_training_with_toggled_freezing_stays_in_sync_and_exact(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "rendezvous")
    procs = [
        ctx.Process(target=ddp_worker.run, args=(rank, WORLD, init_file, results))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        for _ in range(WORLD):
            rank, status, payload = results.get(timeout=TIMEOUT)
            outcomes[rank] = (status, payload)
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert len(outcomes) == WORLD, f"a rank hung or died: got {sorted(outcomes)}"
    for rank, (status, payload) in outcomes.items():
        assert status == "ok", f"rank {rank} failed:\n{payload}"
        assert payload["steps"] == 15
        assert payload["param_mismatches"] == 0  # parameters equal across ranks, every step
        assert payload["buffer_mismatches"] == 0  # and buffers too while frozen
        assert payload["frozen_moved"] == [False, False]  # epochs 1 and 3
        assert "find_unused_parameters=True" in payload["refused"]
