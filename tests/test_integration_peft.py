"""The Lightning and Hugging Face callbacks with a peft model (issue 16, point 6).

The callback must never re-enable the base weights peft froze: releasing a freeze gives
each parameter back its own flag, and a schedule that would leave a peft-frozen module
"trainable" is refused when it would first apply. Runs where peft, Lightning and
Transformers are installed (``scripts/other_torch.sh newest``); skipped elsewhere.
"""

from __future__ import annotations

import pytest

peft = pytest.importorskip("peft")
pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from helpers import tiny_backbone_and_head  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from freezesched import Constant, Step, is_frozen  # noqa: E402
from freezesched.integrations.hf import FreezeScheduleCallback as HFCallback  # noqa: E402
from freezesched.integrations.lightning import (  # noqa: E402
    FreezeScheduleCallback as LightningCallback,
)
from freezesched.integrations.peft import PeftAdapters, adapter_names  # noqa: E402


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = tiny_backbone_and_head(3)

    def forward(self, x, labels=None):
        logits = self.head(self.backbone(x))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def lora_tiny() -> nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["backbone.3"], modules_to_save=["head.2"])
    model = peft.get_peft_model(Tiny(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


class Data(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 12, 12, generator=g)
        self.y = torch.randint(3, (16,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def base_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """What peft froze: the base weights (values and flags); adapters and copies left out."""
    return {
        n: (p.detach().clone(), p.requires_grad)
        for n, p in model.named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }


def assert_base_untouched(before, model: nn.Module) -> None:
    after = base_state(model)
    assert before.keys() == after.keys()
    for name, (value, flag) in before.items():
        assert not flag and not after[name][1], f"{name} was re-enabled"
        assert torch.equal(value, after[name][0]), f"{name} moved"


def lora_value(model: nn.Module) -> torch.Tensor:
    return model.base_model.model.backbone[3].lora_A["default"].weight.detach().clone()


# --- Lightning --------------------------------------------------------------------------


class LitPeft(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = lora_tiny()
        self.frozen_adapters: list[bool] = []
        self.flags_seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        adapters = [self.model.get_submodule(n) for n in adapter_names(self.model)]
        self.frozen_adapters.append(all(is_frozen(a) for a in adapters if list(a.parameters())))
        self.flags_seen.append(
            any(p.requires_grad for n, p in self.model.named_parameters() if "base_layer" in n)
        )
        return self.model(batch["x"], batch["labels"])["loss"]

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def fit_lightning(tmp_path, callback, epochs=4) -> LitPeft:
    module = LitPeft()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[callback], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Data(), batch_size=8))
    return module


def test_lightning_callback_schedules_the_adapters_and_never_re_enables_the_base(tmp_path):
    module = LitPeft()
    before, lora = base_state(module.model), lora_value(module.model)
    names = adapter_names(module.model)
    callback = LightningCallback([f"model.{n}" for n in names], Step(2))
    trainer = pl.Trainer(
        max_epochs=4, callbacks=[callback], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Data(), batch_size=8))
    # Step(2): adapters train on even epochs (2 steps per epoch), frozen on odd ones.
    assert module.frozen_adapters == [False, False, True, True, False, False, True, True]
    assert not any(module.flags_seen)  # no base weight required grad at any step
    assert_base_untouched(before, module.model)  # and none was re-enabled at the end
    assert not torch.equal(lora, lora_value(module.model))


def test_lightning_callback_refuses_to_schedule_a_base_module_peft_froze(tmp_path):
    callback = LightningCallback("model.base_model.model.backbone", Step(2),
                                 trainable=[PeftAdapters()])  # fmt: skip
    with pytest.raises(ValueError, match="peft freezes every weight of the base"):
        fit_lightning(tmp_path, callback)


# --- Hugging Face ------------------------------------------------------------------------


class Recorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.base_flags: list[bool] = []
        self.adapters_frozen: list[bool] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.base_flags.append(
            any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
        )
        self.adapters_frozen.append(is_frozen(model.base_model.model.backbone[3].lora_A))


def hf_train(tmp_path, model, callback):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    recorder = Recorder()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Data(), callbacks=[callback, recorder]
    )
    trainer.train()
    return trainer, recorder


def test_hf_callback_pins_the_peft_base_and_schedules_its_adapters(tmp_path):
    model = lora_tiny()
    before, lora = base_state(model), lora_value(model)
    bn = model.base_model.model.backbone[1]
    stats = bn.running_mean.clone()
    callback = HFCallback(
        schedules={"": Constant(True), tuple(adapter_names(model)): Step(2)},
        by_epoch=False,
        trainable=[PeftAdapters()],
    )  # the whole model frozen but its adapters and head copy; the adapters on Step(2)
    _, recorder = hf_train(tmp_path, model, callback)
    assert recorder.adapters_frozen == [False, True, False, True]  # 2 epochs of 2 steps
    assert not any(recorder.base_flags)
    assert_base_untouched(before, model)
    assert torch.equal(bn.running_mean, stats)  # pinned on every step
    assert not torch.equal(lora, lora_value(model))


def test_hf_callback_refuses_a_schedule_that_would_train_nothing_of_a_peft_model(tmp_path):
    # Exempting the adapters leaves only what peft froze: Step(2)'s trainable steps would
    # train nothing there, and freezesched will not re-enable it: refused.
    callback = HFCallback("", Step(2), by_epoch=False, trainable=[PeftAdapters()])
    with pytest.raises(ValueError, match=r"schedules\[''\] makes '' trainable at tick 0"):
        hf_train(tmp_path, lora_tiny(), callback)


def test_hf_callback_refuses_to_schedule_a_base_module_peft_froze(tmp_path):
    callback = HFCallback("base_model.model.backbone", Step(2), trainable=[PeftAdapters()])
    with pytest.raises(ValueError, match="never re-enables what it did not freeze"):
        hf_train(tmp_path, lora_tiny(), callback)
