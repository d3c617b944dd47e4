"""Synthetic DOTA-format data and the size overrides the example's CPU tests train with."""

from __future__ import annotations

import uuid
from pathlib import Path

import cv2
import numpy as np

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


def tiny(cfg, data_root: Path, work_dir: Path, *, train_batch: int | None = 2):
    """Size overrides: synthetic data, 64x64, batch 2 (``train_batch=None``: as configured),
    no pretrained weights, no checkpoints."""
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.init_cfg = None
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[name]
        split = "train" if name == "train_dataloader" else "val"
        loader.update(num_workers=0, persistent_workers=False)
        if split == "val" or train_batch is not None:
            loader.batch_size = 2 if split == "val" else train_batch
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
