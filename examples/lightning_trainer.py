"""DBF in a Lightning Trainer: a callback, nothing else changes.

    python examples/lightning_trainer.py [--epochs 6]

The backbone trains for a 2-epoch warm-up, then every 3rd epoch (DBF's (ρ=1 →) ρ=3);
`frozen/backbone` is logged with the other metrics. Toy model and random data.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezesched import Step, WarmupThenFreeze
from freezesched.integrations.lightning import FreezeScheduleCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.backbone(x)), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # Every parameter from the start: frozen ones just get no gradient.
        return torch.optim.SGD(self.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)


def main(epochs: int = 6, samples: int = 64) -> list[bool]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(samples, 3, 16, 16), torch.randint(0, 4, (samples,)))
    freeze = FreezeScheduleCallback("backbone", WarmupThenFreeze(2, then=Step(3)))
    history: list[bool] = []

    class Report(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            history.append(freeze.controller.frozen["backbone"])
            print(f"epoch {trainer.current_epoch}: backbone "
                  f"{'frozen' if history[-1] else 'trainable'}")  # fmt: skip

    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[freeze, Report()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), DataLoader(data, batch_size=16, shuffle=True))
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    main(parser.parse_args().epochs)
