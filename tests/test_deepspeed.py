"""DeepSpeed ZeRO stages 1-3 on the CPU accelerator, 2 gloo processes (issue 14, point 3).

DeepSpeed is an optional extra: ``bash scripts/deepspeed_test.sh`` runs this file in its
own environment (``.venv-deepspeed``); without DeepSpeed it is skipped.
"""

from __future__ import annotations

import socket

import ds_worker
import pytest
from helpers import run_ranks

pytest.importorskip("deepspeed")

WORLD = 2
TIMEOUT = 240  # seconds; importing DeepSpeed takes most of it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_zero_stages_train_a_part_frozen_before_initialize_and_refuse_toggling():
    outcomes = run_ranks(ds_worker.run, WORLD, TIMEOUT, _free_port())
    for payload in outcomes.values():
        assert sorted(payload) == [1, 2, 3]
        for stage, result in payload.items():
            assert not result["backbone_moved"], stage
            assert result["head_moved"], stage
            assert result["rank_mismatches"] == 0, stage
            assert "deepspeed.initialize" in result["unfreeze_refused"], stage
            assert "silently diverge" in result["unfreeze_refused"], stage
            assert f"ZeRO stage {stage}" in result["toggle_refused"], stage
            assert "freeze the part before initialize" in result["toggle_refused"], stage
            assert "frozen now" in result["guard_refused"], stage
            assert result["refused_untouched"], stage
