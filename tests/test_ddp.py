"""DistributedDataParallel: 2 processes on gloo (CPU), freezing toggled several times."""

from __future__ import annotations

import ddp_worker
from helpers import run_ranks

WORLD = 2
TIMEOUT = 120  # seconds; a hang fails the test instead of the CI run


def test_ddp_training_with_toggled_freezing_stays_in_sync_and_exact(tmp_path):
    outcomes = run_ranks(ddp_worker.run, WORLD, TIMEOUT, str(tmp_path / "rendezvous"))
    for payload in outcomes.values():
        assert payload["steps"] == 15
        assert payload["param_mismatches"] == 0  # parameters equal across ranks, every step
        assert payload["buffer_mismatches"] == 0  # and buffers too while frozen
        assert payload["frozen_moved"] == [False, False]  # epochs 1 and 3
        assert "find_unused_parameters=True" in payload["refused"]
