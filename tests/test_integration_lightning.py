"""FreezeScheduleCallback with a real Lightning Trainer on CPU (tiny random model)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_backbone_and_head
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezesched import Step, is_frozen
from freezesched.integrations.lightning import FreezeScheduleCallback


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = tiny_backbone_and_head(3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.head(self.backbone(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.changed: list[bool] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.before = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        after = pl_module.backbone.state_dict()
        self.changed.append(any(not torch.equal(self.before[k], after[k]) for k in after))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, 3, 12, 12, generator=g), torch.randint(3, (16,), generator=g)
    )
    return DataLoader(data, batch_size=4, shuffle=False)


def fit(tmp_path, name, epochs=4, ckpt_path=None, **kwargs):
    model = Tiny()
    freeze = FreezeScheduleCallback("backbone", kwargs.pop("schedule", Step(2)), **kwargs)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[freeze, recorder, ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1)],
        logger=CSVLogger(tmp_path / name, name="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model, recorder, trainer


def test_real_trainer_freezes_on_schedule_logs_and_restores(tmp_path):
    model, rec, _ = fit(tmp_path, "run")
    # Step(2): epochs 1 and 3 frozen; the backbone (with BN statistics) is bitwise still,
    # also across the model.train() Lightning calls after each validation epoch.
    assert rec.changed == [True, False, True, False]
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    by_epoch = {}
    for row in rows:
        if row.get("frozen/backbone"):
            by_epoch.setdefault(int(row["epoch"]), set()).add(float(row["frozen/backbone"]))
    assert by_epoch == {0: {0.0}, 1: {1.0}, 2: {0.0}, 3: {1.0}}
    assert not is_frozen(model.backbone)
    assert all(p.requires_grad for p in model.parameters())


def test_resume_from_mid_run_checkpoint_matches_uninterrupted_run(tmp_path):
    kwargs = {"on_unfreeze": "reset"}
    full, _, _ = fit(tmp_path, "full", **kwargs)
    expected = full.state_dict()
    ckpt = next((tmp_path / "full").glob("epoch=1-*.ckpt"))  # after frozen epoch 1
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert state["FreezeScheduleCallback{'modules': ['backbone']}"]["tick"] == 1

    resumed, rec, _ = fit(tmp_path, "resumed", ckpt_path=ckpt, **kwargs)
    assert rec.changed == [True, False]
    got = resumed.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Control: without the callback's state the unfreeze at epoch 2 does not reset the
    # momentum, so the run differs; the saved state is what makes resume exact.
    stripped = torch.load(ckpt, weights_only=False)
    stripped["callbacks"].pop("FreezeScheduleCallback{'modules': ['backbone']}")
    torch.save(stripped, tmp_path / "stripped.ckpt")
    control, _, _ = fit(tmp_path, "control", ckpt_path=tmp_path / "stripped.ckpt", **kwargs)
    got = control.state_dict()
    assert not all(torch.equal(got[k], expected[k]) for k in expected)


def test_step_ticks_follow_the_global_step(tmp_path):
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(is_frozen(pl_module.backbone))

    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[FreezeScheduleCallback("backbone", Step(3), by_epoch=False), Watch()],
    )  # fmt: skip
    trainer.fit(model, loader())
    assert seen == [Step(3)(t) for t in range(8)]


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="on_unfreeze"):
        FreezeScheduleCallback("backbone", Step(2), on_unfreeze="zero")
    with pytest.raises(TypeError, match="schedule is required"):
        FreezeScheduleCallback("backbone")
    with pytest.raises(ValueError, match="rho"):
        FreezeScheduleCallback("backbone", {"type": "Step", "rho": -1})
