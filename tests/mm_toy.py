"""A toy MMEngine model and dataset for the integration tests, registered on import.

Config files in the tests load it through ``custom_imports``, the way a user's project
would load its own modules.
"""

from __future__ import annotations

import torch
from helpers import tiny_backbone_and_head
from mmengine.dataset import BaseDataset
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch import nn


@MODELS.register_module(force=True)
class ToyDetector(BaseModel):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone, self.head = tiny_backbone_and_head(classes)

    def forward(self, inputs, labels, mode="tensor", **meta):
        logits = self.head(self.backbone(inputs))
        if mode == "loss":
            return {"loss": nn.functional.cross_entropy(logits, labels)}
        if mode == "predict":
            return list(zip(logits.argmax(1), labels, strict=True))
        return logits


@DATASETS.register_module(force=True)
class ToyImages(BaseDataset):
    def __init__(self, size: int = 16, classes: int = 3, seed: int = 0, **kwargs) -> None:
        self.size, self.classes, self.seed = size, classes, seed
        super().__init__(serialize_data=False, **kwargs)

    def load_data_list(self):
        g = torch.Generator().manual_seed(self.seed)
        return [
            {"inputs": torch.randn(3, 12, 12, generator=g),
             "labels": int(torch.randint(self.classes, (1,), generator=g))}
            for _ in range(self.size)
        ]  # fmt: skip


@METRICS.register_module(force=True)
class ToyAccuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(float(p == y) for p, y in data_samples)

    def compute_metrics(self, results):
        return {"accuracy": sum(results) / len(results)}


def config(work_dir: str, epochs: int, hook: dict, **extra) -> dict:
    """A complete Runner config for ToyDetector, freezesched's hook in ``custom_hooks``."""
    loader = {
        "dataset": {"type": "ToyImages"},
        "sampler": {"type": "DefaultSampler", "shuffle": False},
        "batch_size": 4,
        "num_workers": 0,
        "collate_fn": {"type": "default_collate"},
    }
    cfg = {
        "custom_imports": {"imports": ["freezesched.integrations.mmengine", "mm_toy"]},
        "model": {"type": "ToyDetector"},
        "work_dir": work_dir,
        "train_dataloader": loader,
        "train_cfg": {"by_epoch": True, "max_epochs": epochs, "val_interval": 1},
        "val_dataloader": loader,
        "val_cfg": {},
        "val_evaluator": {"type": "ToyAccuracy"},
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}},
        "default_hooks": {
            "checkpoint": {"type": "CheckpointHook", "interval": 1},
            "logger": {"type": "LoggerHook", "interval": 1},
        },
        "custom_hooks": [hook],
        "randomness": {"seed": 0},
        "default_scope": "mmengine",
        "env_cfg": {"dist_cfg": {"backend": "gloo"}},
    }
    cfg.update(extra)
    return cfg
