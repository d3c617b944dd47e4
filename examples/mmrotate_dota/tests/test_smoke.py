"""CPU smoke test of the MMRotate example: every config builds; detectors train across a
freeze -> unfreeze switch on a tiny synthetic DOTA-format dataset and evaluate once.

Runs in the MMRotate environment (scripts/mmrotate_env.sh), not the main one:
    .venv-mmrotate/bin/python -m pytest -q examples/mmrotate_dota/tests
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmrotate.registry import MODELS
from train import build_config  # the example's train.py (conftest.py puts it on sys.path)

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent
DETECTORS = sorted((EXAMPLE / "configs").glob("*.py"))
POLICIES = sorted((EXAMPLE / "configs" / "policies").glob("*.py"))
CLASSES = ("plane", "ship", "storage-tank")
SIZE = 64


def make_dota(root: Path, split: str, images: int, seed: int) -> None:
    """Images with filled rotated rectangles and DOTA v1.0 txt annotations."""
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "annfiles").mkdir(parents=True)
    for i in range(images):
        image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        lines = []
        for _ in range(3):
            cx, cy = rng.uniform(16, SIZE - 16, 2)
            w, h = rng.uniform(10, 24), rng.uniform(6, 14)
            angle = rng.uniform(-90, 90)
            corners = cv2.boxPoints(((cx, cy), (w, h), angle))
            label = int(rng.integers(len(CLASSES)))
            cv2.fillPoly(image, [corners.astype(np.int32)], (80 + 60 * label, 200, 120))
            coords = " ".join(f"{v:.1f}" for v in corners.reshape(-1))
            lines.append(f"{coords} {CLASSES[label]} 0")
        cv2.imwrite(str(root / split / "images" / f"P{i:04d}.png"), image)
        (root / split / "annfiles" / f"P{i:04d}.txt").write_text("\n".join(lines) + "\n")


def tiny(cfg, data_root: Path, work_dir: Path):
    """Size overrides: synthetic data, 64x64, batch 2, no pretrained weights, no checkpoints."""
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.init_cfg = None
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[name]
        split = "train" if name == "train_dataloader" else "val"
        loader.update(batch_size=2, num_workers=0, persistent_workers=False)
        dataset = dict(
            type="DOTADataset", data_root=str(data_root), ann_file=f"{split}/annfiles/",
            data_prefix=dict(img_path=f"{split}/images/"), metainfo=dict(classes=CLASSES),
            pipeline=loader.dataset.pipeline,
        )  # fmt: skip
        if split == "train":
            dataset["filter_cfg"] = dict(filter_empty_gt=True)
        else:
            dataset["test_mode"] = True
        loader.dataset = dataset
        for step in loader.dataset.pipeline:
            if step["type"] == "mmdet.Resize":
                step["scale"] = (SIZE, SIZE)
    head = cfg.model.get("bbox_head") or cfg.model.roi_head.bbox_head
    head.num_classes = len(CLASSES)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100, save_last=False)
    cfg.train_cfg.val_interval = cfg.train_cfg.max_epochs
    # MMEngine keeps one visualizer per name per process; a fresh name per run keeps each
    # run's scalars in its own work_dir.
    cfg.visualizer.name = f"visualizer-{uuid.uuid4().hex}"
    cfg.env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"),
                       mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0))  # fmt: skip
    return cfg


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
    cost = {s["frozen"]: s["flops_per_sample"] for s in record["states"]}
    assert 0 < cost[True] < cost[False]
    assert record["delta_flops_paper"] < 0 and record["delta_flops_measured"] < 0


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
