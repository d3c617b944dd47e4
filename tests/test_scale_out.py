"""Freezing on PyTorch's distributed engines, 2 gloo processes each (issue 14).

FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``), DDP with freezesched's
communication hook, and ``torch.distributed.checkpoint`` resumes in fresh processes. Each
test spawns its ranks through ``helpers.run_ranks``, which fails the test instead of
hanging CI if a rank hangs or dies.
"""

from __future__ import annotations

import scale_worker
from helpers import run_ranks

WORLD = 2
TIMEOUT = 150  # seconds per spawn


def _common(payload: dict, frozen_epochs: list[int]) -> None:
    assert payload["frozen_epochs"] == frozen_epochs
    assert payload["frozen_moved"] == []  # gathered full tensors, bitwise
    assert payload["trainable_still"] and not any(payload["trainable_still"])
    assert payload["frozen_grads"] and not any(payload["frozen_grads"])  # .grad is None
    assert payload["rank_mismatches"] == 0


def test_fsdp2_freezing_per_block_and_in_the_root_group(tmp_path):
    outcomes = run_ranks(scale_worker.run, WORLD, TIMEOUT, str(tmp_path / "rdv"), "fsdp2")
    for payload in outcomes.values():
        _common(payload, [1, 3])
        assert payload["sharded"]  # the optimizer steps the shards
        assert payload["unsharded_at_apply"] > 0  # frozen while the root group was gathered
        assert payload["stem_state"] == 0  # frozen since the optimizer was built: no state
        assert payload["head_state"] == 2


def test_fsdp1_use_orig_params_true_works_and_false_is_refused(tmp_path):
    outcomes = run_ranks(scale_worker.run, WORLD, TIMEOUT, str(tmp_path / "rdv"), "fsdp1")
    for payload in outcomes.values():
        for face in ("controller_refused", "guard_refused"):
            assert "use_orig_params=False" in payload[face], payload[face]
            assert "use_orig_params=True" in payload[face]
        assert payload["refused_untouched"]
        _common(payload, [1, 3])
        assert payload["stem_moved"] == []  # part of the root's flat parameter
        assert payload["stem_state"] == 0
    # the stem has elements on some rank (so "no state" means something), the head has state
    assert sum(p["stem_local"] for p in outcomes.values()) == 12 * 6 + 12
    assert sum(p["head_state"] for p in outcomes.values()) > 0


def test_ddp_hook_skips_frozen_buckets_and_matches_plain_ddp_bitwise(tmp_path):
    outcomes = run_ranks(scale_worker.run, WORLD, TIMEOUT, str(tmp_path / "rdv"), "comm_hook")
    for payload in outcomes.values():
        assert payload["bitwise_equal_steps"] == payload["steps"] == 8
        total, head = payload["total"], payload["head"]
        for frozen, sent, skipped in payload["sent"]:
            # frozen: only the head's gradients travel; trainable: everything
            assert (sent, skipped) == ((head, total - head) if frozen else (total, 0))
        assert "ranks froze different parameters" in payload["mismatch_error"]


def test_dcp_resume_in_a_frozen_phase_is_bitwise_in_any_order(tmp_path):
    directory = str(tmp_path / "ckpt")
    saved = run_ranks(
        scale_worker.run, WORLD, TIMEOUT, str(tmp_path / "rdv1"), "dcp_save", directory
    )
    resumed = run_ranks(
        scale_worker.run, WORLD, TIMEOUT, str(tmp_path / "rdv2"), "dcp_resume", directory
    )
    for rank, payload in resumed.items():
        reference = saved[rank]
        assert reference["frozen_with_state"] > 0  # there were Adam moments to lose
        assert reference["skipped"] == ["backbone.stem.bias", "backbone.stem.weight"]
        for variant in ("controller_first", "load_only", "only_trained"):
            got = payload[variant]
            assert got.keys() == reference["final"].keys()
            assert all(got[k].tobytes() == v.tobytes() for k, v in reference["final"].items()), (
                variant
            )
        assert "'backbone.stem.weight'" in payload["wrong_pretrained"]
        assert "fingerprint mismatch" in payload["wrong_pretrained"]
        assert payload["raw_dcp_lost_state"] > 0  # what DCP does on its own ...
        assert "freezesched.distributed.load" in payload["raw_dcp_refused"]  # ... is refused

    # Only what trains: the stem is left out, so the checkpoint shrinks by at least its bytes.
    def size(path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    stem_bytes = (12 * 6 + 12) * 4
    assert size(tmp_path / "ckpt" / "full") - size(tmp_path / "ckpt" / "trained") >= stem_bytes
