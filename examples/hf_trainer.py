"""DBF in a Hugging Face Trainer: a callback, nothing else changes.

    python examples/hf_trainer.py [--epochs 6]

Any `nn.Module` returning a dict with "loss" trains under `transformers.Trainer`; here a
toy one with a `backbone` (random init, no downloads). The backbone trains for a 2-epoch
warm-up, then every 3rd epoch; each log entry carries `frozen/backbone`.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from freezesched import Step, WarmupThenFreeze
from freezesched.integrations.hf import FreezeScheduleCallback


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, pixel_values, labels):
        logits = self.head(self.backbone(pixel_values))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Images(torch.utils.data.Dataset):
    def __init__(self, samples: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(samples, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (samples,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def main(epochs: int = 6, samples: int = 64, output_dir: str | None = None) -> list[dict]:
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="freezesched_hf_"),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=0.005,
        logging_steps=samples // 16,  # once per epoch
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    model = Classifier()
    freeze = FreezeScheduleCallback("backbone", WarmupThenFreeze(2, then=Step(3)))
    trainer = Trainer(model=model, args=args, train_dataset=Images(samples), callbacks=[freeze])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for e in logs:
        print(f"after epoch {e['epoch']:.0f}: loss {e['loss']:.3f}, "
              f"frozen/backbone {e['frozen/backbone']}")  # fmt: skip
    return logs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    main(parser.parse_args().epochs)
