"""DBF in an MMEngine Runner, enabled by configuration alone.

    python examples/mmengine_runner.py [--epochs 6] [--work-dir work_dirs/mmengine_example]

In a config *file* (MMDetection 3.x / MMRotate 1.x), the two lines that matter are::

    custom_imports = dict(imports=["freezesched.integrations.mmengine"])
    custom_hooks = [dict(type="FreezeScheduleHook", module="backbone",
                         schedule=dict(type="WarmupThenFreeze", warmup=2,
                                       then=dict(type="Step", rho=3)))]

Here the config is a dict, so the import is written out. The model and data are a toy
(random images, random labels); the log shows `frozen/backbone` per iteration.
"""

from __future__ import annotations

import argparse

import torch
from mmengine.config import Config
from mmengine.dataset import BaseDataset
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from mmengine.runner import Runner
from torch import nn

# Importing the module registers the hook in MMEngine's HOOKS registry by this name.
from freezesched.integrations.mmengine import FreezeScheduleHook

HOOK = FreezeScheduleHook.__name__


@MODELS.register_module(force=True)
class ExampleDetector(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, inputs, labels, mode="tensor", **meta):
        logits = self.head(self.backbone(inputs))
        if mode == "loss":
            return {"loss": nn.functional.cross_entropy(logits, labels)}
        return logits


@DATASETS.register_module(force=True)
class ExampleImages(BaseDataset):
    def __init__(self, size: int = 32, **kwargs) -> None:
        self.size = size
        super().__init__(serialize_data=False, **kwargs)

    def load_data_list(self):
        g = torch.Generator().manual_seed(0)
        return [
            {"inputs": torch.randn(3, 16, 16, generator=g), "labels": i % 4}
            for i in range(self.size)
        ]


def main(epochs: int = 6, work_dir: str = "work_dirs/mmengine_example", size: int = 32) -> Runner:
    cfg = Config({
        "model": {"type": "ExampleDetector"},
        "work_dir": work_dir,
        "train_dataloader": {
            "dataset": {"type": "ExampleImages", "size": size},
            "sampler": {"type": "DefaultSampler", "shuffle": True},
            "batch_size": 8,
            "collate_fn": {"type": "default_collate"},
        },
        "train_cfg": {"by_epoch": True, "max_epochs": epochs},
        "optim_wrapper": {
            "optimizer": {"type": "SGD", "lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4},
            "clip_grad": {"max_norm": 35, "norm_type": 2},
        },
        "custom_hooks": [{
            "type": HOOK,
            "module": "backbone",
            "schedule": {"type": "WarmupThenFreeze", "warmup": 2,
                         "then": {"type": "Step", "rho": 3}},
            "on_unfreeze": "reset",
        }],
        "default_hooks": {"logger": {"type": "LoggerHook", "interval": 2}},
        "default_scope": "mmengine",
        "randomness": {"seed": 0},
    })  # fmt: skip
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work-dir", default="work_dirs/mmengine_example")
    args = parser.parse_args()
    main(args.epochs, args.work_dir)
