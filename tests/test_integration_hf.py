"""FreezeScheduleCallback with a real Hugging Face Trainer on CPU (tiny random model)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_backbone_and_head
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from freezesched import FreezeController, Step, is_frozen
from freezesched.integrations.hf import FreezeScheduleCallback

STEPS_PER_EPOCH = 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = tiny_backbone_and_head(3)

    def forward(self, x, labels):
        logits = self.head(self.backbone(x))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 12, 12, generator=g)
        self.y = torch.randint(3, (16,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    """Per optimizer step: was the backbone frozen, and did its state change."""

    def __init__(self) -> None:
        self.frozen: list[bool] = []
        self.changed: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        self.frozen.append(is_frozen(model.backbone))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        after = model.backbone.state_dict()
        self.changed.append(any(not torch.equal(self.before[k], after[k]) for k in after))


def train(tmp_path, name, resume=None, epochs=4, **kwargs):
    model = Tiny()
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        num_train_epochs=epochs,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="epoch",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    recorder = Recorder()
    callback = FreezeScheduleCallback("backbone", kwargs.pop("schedule", Step(2)), **kwargs)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Data(),
        optimizers=(opt, None),
        callbacks=[callback, recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, recorder, trainer


def test_real_trainer_freezes_on_schedule_logs_and_restores(tmp_path):
    model, rec, trainer = train(tmp_path, "run")
    expected = [Step(2)(t // STEPS_PER_EPOCH) for t in range(4 * STEPS_PER_EPOCH)]
    assert rec.frozen == expected
    assert rec.changed == [not f for f in expected]  # frozen steps: bitwise unchanged
    logged = [e["frozen/backbone"] for e in trainer.state.log_history if "loss" in e]
    assert logged == [float(f) for f in expected]
    assert not is_frozen(model.backbone)
    assert all(p.requires_grad for p in model.parameters())


def test_resume_from_mid_run_checkpoint_matches_uninterrupted_run(tmp_path):
    full, _, _ = train(tmp_path, "full", on_unfreeze="reset")
    expected = full.state_dict()
    ckpt = tmp_path / "full" / f"checkpoint-{2 * STEPS_PER_EPOCH}"  # after frozen epoch 1
    resumed, rec, _ = train(tmp_path, "resumed", resume=str(ckpt), on_unfreeze="reset")
    assert rec.frozen == [Step(2)(t // STEPS_PER_EPOCH) for t in range(8, 16)]
    got = resumed.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Control: without re-deriving the frozen state at epoch 1, the unfreeze at epoch 2
    # is not seen, the stale momentum is not reset, and the run differs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FreezeController, "load_state_dict", lambda self, state, strict=True: None)
        control, _, _ = train(tmp_path, "control", resume=str(ckpt), on_unfreeze="reset")
    got = control.state_dict()
    assert not all(torch.equal(got[k], expected[k]) for k in expected)


def test_step_ticks_follow_the_global_step(tmp_path):
    _, rec, _ = train(tmp_path, "steps", epochs=2, schedule=Step(3), by_epoch=False)
    assert rec.frozen == [Step(3)(t) for t in range(2 * STEPS_PER_EPOCH)]


def test_resume_with_step_ticks_re_derives_the_state(tmp_path):
    kwargs = {"schedule": Step(3), "by_epoch": False, "on_unfreeze": "reset"}
    full, _, _ = train(tmp_path, "full", epochs=2, **kwargs)
    ckpt = tmp_path / "full" / f"checkpoint-{STEPS_PER_EPOCH}"  # step 3 was frozen
    resumed, rec, _ = train(tmp_path, "resumed", resume=str(ckpt), epochs=2, **kwargs)
    assert rec.frozen == [Step(3)(t) for t in range(4, 8)]
    expected, got = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="bn"):
        FreezeScheduleCallback("backbone", Step(2), bn="frozen")
    with pytest.raises(TypeError, match="module"):
        FreezeScheduleCallback(["backbone", 3], Step(2))
