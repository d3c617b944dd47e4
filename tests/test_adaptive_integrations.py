"""Adaptive schedules in the real frameworks: Lightning, Hugging Face and MMEngine on CPU.

The Plateau here never sees an improvement after its first observation (an absolute
threshold no metric can beat), so when it switches depends only on *which ticks were
observed*, not on the metric's values: the tests pin the plumbing (the metric is read, on
the right tick, once, and resumes exactly) without depending on numerics.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mmengine.hooks import Hook
from test_integration_hf import STEPS_PER_EPOCH, Data
from test_integration_hf import Tiny as HFTiny
from test_integration_lightning import Tiny, loader
from test_integration_mmengine import final_state, make_runner
from transformers import Trainer, TrainerCallback, TrainingArguments

from freezesched import WarmupThenFreeze, is_frozen
from freezesched.integrations.hf import FreezeScheduleCallback as HFCallback
from freezesched.integrations.lightning import FreezeScheduleCallback
from freezesched.integrations.mmengine import FreezeScheduleHook
from freezesched.schedules import GradientFreeze, Plateau


def never_improves(**kwargs) -> Plateau:
    return Plateau(mode="min", threshold=1e9, threshold_mode="abs", **kwargs)


# --- Lightning: monitor= reads a logged metric after each validation -------------------------


class EpochRecorder(pl.Callback):
    def __init__(self) -> None:
        self.frozen: list[tuple[bool, bool]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        b = pl_module.backbone
        self.frozen.append((is_frozen(b[0]), is_frozen(b[3])))


def lightning_fit(tmp_path, name, schedule, *, epochs=6, ckpt_path=None, monitor="val_loss",
                  module="backbone"):  # fmt: skip
    model = Tiny()
    freeze = FreezeScheduleCallback(module, schedule, monitor=monitor, on_unfreeze="reset")
    recorder = EpochRecorder()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        callbacks=[freeze, recorder, ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model, [f[0] for f in recorder.frozen], freeze


def test_lightning_plateau_on_a_logged_metric_resumes_exactly(tmp_path):
    def schedule():
        return WarmupThenFreeze(1, then=never_improves(patience=1))

    full, frozen, callback = lightning_fit(tmp_path, "full", schedule())
    # The plateau sees epochs 1, 2, 3 (not the sanity check): bad at 2 and 3, so it
    # freezes from epoch 4.
    assert frozen == [False, False, False, False, True, True]
    (plateau,) = callback.spec.targets["backbone"].adaptive_parts
    assert plateau.last_observed == 4 and plateau.changes == ((0, False), (3, True))

    ckpt = next((tmp_path / "full").glob("epoch=2-*.ckpt"))
    resumed, rest, _ = lightning_fit(tmp_path, "resumed", schedule(), ckpt_path=ckpt)
    assert rest == frozen[3:]
    expected, got = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Without the adaptive record (a checkpoint of an older version, say), resuming is
    # refused rather than restarted from a fresh record that would decide differently.
    stripped = torch.load(ckpt, weights_only=False)
    key = "FreezeScheduleCallback{'modules': ['backbone']}"
    stripped["callbacks"][key] = {
        k: v for k, v in stripped["callbacks"][key].items() if k != "adaptive"
    }
    torch.save(stripped, tmp_path / "stripped.ckpt")
    with pytest.raises(ValueError, match="resuming an adaptive schedule needs its record"):
        lightning_fit(tmp_path, "control", schedule(), ckpt_path=tmp_path / "stripped.ckpt")


def test_lightning_gradient_freeze_gets_the_gradient_norms(tmp_path):
    schedule = GradientFreeze(2, percentile=100, max_frozen=1, every=1)
    _, stage0, _ = lightning_fit(
        tmp_path, "grad", schedule, epochs=3, monitor=None, module=["backbone.0", "backbone.3"]
    )
    # Epoch 0 is the reference, epoch 1 gives rates: stage 0 freezes from epoch 2.
    assert schedule.changes == ((0, 0), (2, 1))
    assert stage0 == [False, False, True]


def test_an_adaptive_schedule_used_in_an_earlier_run_is_refused(tmp_path):
    schedule = WarmupThenFreeze(1, then=never_improves(patience=1))
    lightning_fit(tmp_path, "first", schedule, epochs=2)
    with pytest.raises(ValueError, match="already decided ticks in an earlier run"):
        lightning_fit(tmp_path, "second", schedule, epochs=2)


def test_lightning_monitor_is_checked(tmp_path):
    with pytest.raises(ValueError, match="monitor= must name the metric"):
        FreezeScheduleCallback("backbone", never_improves())
    with pytest.raises(ValueError, match="no schedule observes a metric"):
        FreezeScheduleCallback("backbone", {"type": "Step", "rho": 2}, monitor="val_loss")
    with pytest.raises(ValueError, match=r"monitor='val_los' must be one of trainer.callback_"):
        lightning_fit(tmp_path, "typo", never_improves(), epochs=1, monitor="val_los")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, val_check_interval=0.5,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[FreezeScheduleCallback("backbone", never_improves(),
                                                           monitor="val_loss")])  # fmt: skip
    with pytest.raises(ValueError, match=r"val_check_interval must be 1\.0, got 0\.5"):
        trainer.fit(Tiny(), loader(), loader())
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[FreezeScheduleCallback("backbone", never_improves(),
                                                           monitor="val_loss")])  # fmt: skip
    with pytest.raises(ValueError, match="this Trainer runs none"):
        trainer.fit(Tiny(), loader())  # no validation data


# --- Hugging Face: monitor= reads the evaluation metrics ------------------------------------


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.frozen: list[bool] = []
        self.stage0: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.frozen.append(is_frozen(model.backbone))
        self.stage0.append(is_frozen(model.backbone[0]))


def hf_train(tmp_path, name, callback, *, resume=None, epochs=5, eval_strategy="epoch"):
    model = HFTiny()
    args = TrainingArguments(
        output_dir=str(tmp_path / name), num_train_epochs=epochs, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, learning_rate=0.05, lr_scheduler_type="constant",
        train_sampling_strategy="sequential", save_strategy="epoch", eval_strategy=eval_strategy,
        eval_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    recorder = StepRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data(),
                      optimizers=(opt, None), callbacks=[callback, recorder])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return model, recorder


def hf_plateau() -> HFCallback:
    # "loss" means "eval_loss", as for metric_for_best_model.
    return HFCallback("backbone", WarmupThenFreeze(1, then=never_improves(patience=1)),
                      monitor="loss", on_unfreeze="reset")  # fmt: skip


def test_hf_plateau_on_the_evaluation_loss_resumes_exactly(tmp_path):
    full, rec = hf_train(tmp_path, "full", hf_plateau())
    epochs = rec.frozen[::STEPS_PER_EPOCH]
    assert epochs == [False, False, False, False, True]  # evaluations after epochs 1-3
    ckpt = tmp_path / "full" / f"checkpoint-{3 * STEPS_PER_EPOCH}"  # after epoch 2
    state = json.loads((ckpt / "trainer_state.json").read_text())
    record = state["stateful_callbacks"]["freezesched:backbone"]
    assert record["tick"] == 2 and record["last_observed"] == 2
    resumed, rec2 = hf_train(tmp_path, "resumed", hf_plateau(), resume=str(ckpt))
    assert rec2.frozen == rec.frozen[3 * STEPS_PER_EPOCH :]
    expected, got = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Without the record, resuming the adaptive schedule is refused, not guessed.
    del state["stateful_callbacks"]["freezesched:backbone"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="resuming an adaptive schedule needs its record"):
        hf_train(tmp_path, "refused", hf_plateau(), resume=str(ckpt))


def test_hf_gradient_freeze_and_checks(tmp_path):
    schedule = GradientFreeze(2, percentile=100, max_frozen=1, every=1)
    callback = HFCallback(["backbone.0", "backbone.3"], schedule)
    _, rec = hf_train(tmp_path, "grad", callback, epochs=3, eval_strategy="no")
    assert rec.stage0[::STEPS_PER_EPOCH] == [False, False, True]
    assert schedule.changes == ((0, 0), (2, 1))
    with pytest.raises(ValueError, match=r"eval_strategy=\.\.\.\) must be 'epoch', got 'steps'"):
        hf_train(tmp_path, "steps", hf_plateau(), epochs=1, eval_strategy="steps")
    with pytest.raises(ValueError, match=r"eval_strategy='no'\) never evaluates"):
        hf_train(tmp_path, "none", hf_plateau(), epochs=1, eval_strategy="no")
    typo = HFCallback("backbone", never_improves(), monitor="eval_los")
    with pytest.raises(ValueError, match="monitor='eval_los' must be one of the evaluation"):
        hf_train(tmp_path, "typo", typo, epochs=1)


# --- MMEngine: monitor= reads the validation metrics; resume re-runs a missed validation -----


class ValRecorder(Hook):
    priority = "LOWEST"

    def __init__(self) -> None:
        self.frozen: list[bool] = []
        self.accuracy: list[float] = []

    def before_train_epoch(self, runner) -> None:
        self.frozen.append(is_frozen(runner.model.backbone))

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.accuracy.append(metrics["accuracy"])


MM_HOOK = {
    "type": "FreezeScheduleHook", "module": "backbone", "monitor": "accuracy",
    "on_unfreeze": "reset",
    "schedule": {"type": "Plateau", "mode": "max", "threshold": 1.0, "threshold_mode": "abs",
                 "patience": 1},
}  # fmt: skip


def mm_train(tmp_path, name, **extra):
    runner, _ = make_runner(tmp_path, name, epochs=5, hook=MM_HOOK, **extra)
    recorder = ValRecorder()
    runner.register_hook(recorder)
    runner.train()
    return runner, recorder


def test_mmengine_plateau_on_validation_metrics_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # see test_integration_mmengine
    full, rec = mm_train(tmp_path, "full")
    assert rec.frozen == [False, False, False, True, True]  # validations after epochs 0-2
    assert len(rec.accuracy) == 5
    ckpt = tmp_path / "full" / "epoch_2.pth"  # saved after epoch 1, *before* its validation
    saved = torch.load(ckpt, weights_only=False)["freezesched"]["backbone"]
    assert saved["tick"] == 1 and saved["last_observed"] == 0

    resumed, rec2 = mm_train(tmp_path, "resumed", resume=True, load_from=str(ckpt))
    # The hook re-ran epoch 1's validation first: same weights, same value.
    assert rec2.accuracy[0] == rec.accuracy[1] and rec2.accuracy[1:] == rec.accuracy[2:]
    assert rec2.frozen == rec.frozen[2:]
    expected, got = final_state(full), final_state(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # load_from without resume starts a new run: the adaptive schedule starts afresh.
    _, rec_new = mm_train(tmp_path, "new", load_from=str(ckpt))
    assert rec_new.frozen == [False, False, False, True, True]

    # Control: without that validation the plateau misses an observation and freezes later.
    monkeypatch.setattr(FreezeScheduleHook, "_validated_after", lambda self, runner, tick: False)
    _, rec3 = mm_train(tmp_path, "control", resume=True, load_from=str(ckpt))
    assert rec3.frozen == [False, False, True]


def test_mmengine_refuses_what_it_cannot_feed():
    with pytest.raises(ValueError, match="cannot feed a gradient-driven schedule"):
        FreezeScheduleHook("backbone", {"type": "GradientFreeze", "stages": 1, "threshold": 0.1})
    with pytest.raises(ValueError, match="monitor= must name the metric"):
        FreezeScheduleHook("backbone", {"type": "Plateau"})
