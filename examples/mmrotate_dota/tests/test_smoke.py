"""CPU smoke test of the MMRotate example: every config builds; detectors train across a
freeze -> unfreeze switch on a tiny synthetic DOTA-format dataset and evaluate once.

Runs in the MMRotate environment (scripts/mmrotate_env.sh), not the main one:
    .venv-mmrotate/bin/python -m pytest -q examples/mmrotate_dota/tests
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmrotate.registry import MODELS
from synthetic import make_dota, tiny
from train import (
    batch_rule,
    build_config,
)  # the example's train.py (conftest.py puts it on sys.path)

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent
DETECTORS = sorted((EXAMPLE / "configs").glob("*.py"))
POLICIES = sorted((EXAMPLE / "configs" / "policies").glob("*.py"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dota")
    make_dota(root, "train", 4, seed=0)
    make_dota(root, "val", 2, seed=1)
    return root


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda p: p.stem)
def test_every_detector_config_builds_with_every_policy(detector, data_root, tmp_path):
    init_default_scope("mmrotate")
    for policy in POLICIES:
        dbf = {"warmup": 0, "rho": 2} if policy.stem == "dbf" else {}
        cfg = tiny(build_config(str(detector), str(policy), epochs=3, **dbf), data_root, tmp_path)
        assert cfg.train_cfg.max_epochs == 3
        hooks = [h for h in cfg.get("custom_hooks", []) if h.type == "FreezeScheduleHook"]
        assert len(hooks) == (0 if policy.stem == "full" else 1)
    model = MODELS.build(cfg.model)  # no pretrained weights are fetched (init_cfg=None)
    assert sum(p.numel() for p in model.backbone.parameters()) > 10_000_000
    assert cfg.optim_wrapper.optimizer.lr == 0.005 and cfg.optim_wrapper.clip_grad.max_norm == 35


class Watch(Hook):
    """Per epoch: did the backbone (parameters and buffers) change; what was logged."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.logged: list[float] = []

    def before_train_epoch(self, runner) -> None:
        self.before = {k: v.clone() for k, v in runner.model.backbone.state_dict().items()}

    def after_train_epoch(self, runner) -> None:
        after = runner.model.backbone.state_dict()
        self.changed.append(any(not torch.equal(self.before[k], after[k]) for k in after))
        self.logged.append(runner.message_hub.get_scalar("train/frozen/backbone").current())


# Rotated FCOS is left out: its standard config's loss (RotatedIoULoss) needs a CUDA-only
# op; it is built above, and test_fcos_loss_needs_cuda pins the reason.
@pytest.mark.parametrize("family", ["retinanet", "faster-rcnn"])
def test_trains_across_freeze_switches_and_evaluates(family, data_root, tmp_path):
    detector = EXAMPLE / "configs" / f"{family}_r50_dota.py"
    cfg = tiny(build_config(str(detector), str(EXAMPLE / "configs/policies/dbf.py"),
                            epochs=3, warmup=0, rho=2), data_root, tmp_path)  # fmt: skip
    runner = Runner.from_cfg(cfg)
    watch = Watch()
    runner.register_hook(watch)
    runner.train()
    # Step(2) after no warm-up: trainable, frozen, trainable.
    assert watch.logged == [0.0, 1.0, 0.0]
    assert watch.changed == [True, False, True]
    log = next(Path(cfg.work_dir).glob("*/*.log")).read_text()
    assert "frozen/backbone: 1.0000" in log
    scalars = next(Path(cfg.work_dir).glob("*/vis_data/scalars.json")).read_text().splitlines()
    metrics = [json.loads(line) for line in scalars if "dota/mAP" in line]
    assert len(metrics) == 1 and 0.0 <= metrics[0]["dota/mAP"] <= 1.0 + 1e-6
    assert math.isfinite(metrics[0]["dota/mAP"])
    # The run was accounted by freezesched's profiler: a frozen step costs less, and the
    # paper's ΔF is -2 x backbone forward x frozen samples (negative).
    record = json.loads((Path(cfg.work_dir) / "freezesched_accounting.json").read_text())
    run = record["run"]
    cost = {tuple(p["frozen_modules"]): p["cost"]["flops"] for p in run["phases"]}
    total = {k: c["forward"] + c["weight_grad"] + c["input_grad"] for k, c in cost.items()}
    assert 0 < total[("backbone",)] < total[()]
    # Only backward is saved (Faster R-CNN's RoI head sees a data-dependent number of
    # proposals, so its forward varies a little from step to step).
    assert cost[("backbone",)]["forward"] == pytest.approx(cost[()]["forward"], rel=0.05)
    totals = run["totals"]
    assert totals["delta_flops_2x"] < 0 and totals["delta_flops_measured"] < 0
    # frozen_stages=1 (the paper's code): the stem and first stage never train, so a
    # frozen epoch saves less than the 2x convention credits.
    assert record["never_trained"] == ["backbone.conv1", "backbone.bn1", "backbone.layer1"]
    if family == "retinanet":  # (Faster R-CNN's ΔF also holds its RoI head's variation)
        assert 0.5 < totals["delta_flops_measured"] / totals["delta_flops_2x"] < 1
    # Per epoch (trainable, frozen, trainable), adding up to the run's totals.
    epochs = record["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and record["first_epoch"] == 0
    assert [list(e["samples"]) for e in epochs] == [[""], ["backbone"], [""]]
    assert sum(e["flops_measured"] for e in epochs) == totals["flops_measured"]
    assert epochs[1]["flops_measured"] < epochs[0]["flops_measured"] == epochs[2]["flops_measured"]
    assert sum(e["delta_flops_2x"] for e in epochs) == totals["delta_flops_2x"]
    # mAP: the last evaluation and the best, each with the epochs trained before it.
    assert record["map"]["last"] == record["map"]["best"]
    assert record["map"]["last"]["epoch"] == 3
    assert record["map"]["last"]["value"] == pytest.approx(100 * metrics[0]["dota/mAP"])


def test_dbf_continues_a_finished_full_training_run(data_root, tmp_path):
    # The paper's protocol: train rho=1 for the warm-up, then continue from that
    # checkpoint with DBF for the remaining epochs.
    detector = str(EXAMPLE / "configs" / "retinanet_r50_dota.py")
    full = tiny(build_config(detector, str(EXAMPLE / "configs/policies/full.py"), epochs=1),
                data_root, tmp_path / "full")  # fmt: skip
    full.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1)
    Runner.from_cfg(full).train()
    ckpt = tmp_path / "full" / "epoch_1.pth"
    dbf = tiny(build_config(detector, str(EXAMPLE / "configs/policies/dbf.py"), epochs=3,
                            warmup=1, rho=2, resume_from=str(ckpt)),
               data_root, tmp_path / "dbf")  # fmt: skip
    runner = Runner.from_cfg(dbf)
    watch = Watch()
    runner.register_hook(watch)
    runner.train()
    # Epochs 1 and 2 of (rho=1 for 1 epoch ->) rho=2: trainable, then frozen.
    assert watch.logged == [0.0, 1.0]
    assert watch.changed == [True, False]


def test_the_papers_setting_is_explicit_in_every_config():
    for detector in DETECTORS:
        backbone = build_config(str(detector), str(POLICIES[0]), epochs=1).model.backbone
        if "r50" in detector.stem:  # what the paper's code trained (unique-chan/DBF)
            assert (backbone.frozen_stages, backbone.norm_eval) == (1, True), detector.stem
        else:
            assert backbone.type == "mmdet.SwinTransformer" and "frozen_stages" not in backbone


def test_the_papers_total_batch_is_split_over_the_gpus(capsys):
    detector = str(EXAMPLE / "configs" / "retinanet_r50_dior-r.py")
    policy = str(EXAMPLE / "configs" / "policies" / "dbf.py")
    one = build_config(detector, policy, epochs=1)
    four = build_config(detector, policy, epochs=1, launcher="pytorch", world_size=4)
    assert one.train_dataloader.batch_size == 8 and four.train_dataloader.batch_size == 2
    assert one.optim_wrapper.optimizer.lr == four.optim_wrapper.optimizer.lr == 0.005
    assert four.model_wrapper_cfg.find_unused_parameters is True
    assert batch_rule(four).startswith("batch: 4 process(es) x 2 images = 8 images per step")
    assert "lr 0.005 (the paper's; not rescaled" in batch_rule(four)
    with pytest.raises(ValueError, match="total batch of 8 images cannot be split evenly over 3"):
        build_config(detector, policy, epochs=1, launcher="pytorch", world_size=3)
    # A --cfg-options batch size is the total too.
    opts = {"train_dataloader.batch_size": 4}
    two = build_config(detector, policy, epochs=1, launcher="pytorch", world_size=2, options=opts)
    assert two.train_dataloader.batch_size == 2 and two.total_batch == 4


def test_warmup_and_rho_are_refused_for_policies_without_them(tmp_path):
    detector = EXAMPLE / "configs" / "retinanet_r50_dota.py"
    with pytest.raises(ValueError, match="apply to the DBF policy"):
        build_config(str(detector), str(EXAMPLE / "configs/policies/frozen.py"), epochs=3, rho=5)


def test_fcos_loss_needs_cuda(data_root, tmp_path):
    detector = EXAMPLE / "configs" / "fcos_r50_dota.py"
    cfg = tiny(build_config(str(detector), str(EXAMPLE / "configs/policies/full.py"), epochs=1),
               data_root, tmp_path)  # fmt: skip
    runner = Runner.from_cfg(cfg)
    with pytest.raises(
        RuntimeError, match=r"diff_iou_rotated.*implementation for device cpu not found"
    ):
        runner.train()
