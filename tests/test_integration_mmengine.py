"""FreezeScheduleHook with a real mmengine Runner on CPU, configured from a config file."""

from __future__ import annotations

import json

import mm_toy
import pytest
import torch
from helpers import run_ranks
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from freezesched import Step, is_frozen
from freezesched.integrations.mmengine import FreezeScheduleHook


class Recorder(Hook):
    """Per epoch (or iteration): did the backbone's state change, and what was logged."""

    priority = "LOWEST"

    def __init__(self, by_epoch: bool = True) -> None:
        self.by_epoch = by_epoch
        self.changed: list[bool] = []
        self.logged: list[float] = []

    def _snapshot(self, runner) -> None:
        self.before = {k: v.clone() for k, v in runner.model.backbone.state_dict().items()}

    def _compare(self, runner) -> None:
        after = runner.model.backbone.state_dict()
        self.changed.append(any(not torch.equal(self.before[k], after[k]) for k in after))
        if "train/frozen/backbone" in runner.message_hub.log_scalars:
            self.logged.append(runner.message_hub.get_scalar("train/frozen/backbone").current())

    def before_train_epoch(self, runner) -> None:
        if self.by_epoch:
            self._snapshot(runner)

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch:
            self._compare(runner)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if not self.by_epoch:
            self._snapshot(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self.by_epoch:
            self._compare(runner)


def make_runner(tmp_path, name, epochs=4, hook=None, **extra) -> tuple[Runner, Recorder]:
    hook = hook or {
        "type": "FreezeScheduleHook",
        "module": "backbone",
        "schedule": {"type": "Step", "rho": 2},
        "on_unfreeze": "reset",
    }
    work_dir = tmp_path / name
    work_dir.mkdir()
    path = work_dir / "config.py"
    Config(mm_toy.config(str(work_dir), epochs, hook, **extra)).dump(str(path))
    runner = Runner.from_cfg(Config.fromfile(str(path)))  # the user's path: a config file
    recorder = Recorder(by_epoch=extra.get("train_cfg", {}).get("by_epoch", True))
    runner.register_hook(recorder)
    return runner, recorder


def final_state(runner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


def test_config_alone_freezes_on_schedule_logs_state_and_restores(tmp_path):
    runner, rec = make_runner(tmp_path, "run")
    runner.train()
    # Step(2): epochs 1 and 3 frozen -> backbone (weights and BN statistics) bitwise still.
    assert rec.changed == [True, False, True, False]
    assert rec.logged == [0.0, 1.0, 0.0, 1.0]
    log = next((tmp_path / "run").glob("*/*.log")).read_text()
    assert "frozen/backbone: 1.0000" in log
    assert "frozen/backbone: 0.0000" in log
    scalars = next((tmp_path / "run").glob("*/vis_data/scalars.json")).read_text()
    logged = [json.loads(line).get("frozen/backbone") for line in scalars.splitlines()]
    assert {0.0, 1.0} <= set(logged)
    # After training the model is exactly as it would be without the hook.
    model = runner.model
    assert not is_frozen(model.backbone)
    assert all(p.requires_grad for p in model.parameters())
    assert "forward" not in vars(model.backbone)
    ckpt = torch.load(tmp_path / "run" / "epoch_2.pth", weights_only=False)
    assert ckpt["freezesched"]["backbone"]["tick"] == 1


def test_resume_from_mid_run_checkpoint_matches_uninterrupted_run(tmp_path, monkeypatch):
    # mmengine 0.10 resumes with a bare torch.load, which torch >= 2.6 refuses for its
    # HistoryBuffer objects; this is torch's documented opt-out (see docs/integrations.md).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    full, _ = make_runner(tmp_path, "full")
    full.train()
    expected = final_state(full)
    ckpt = tmp_path / "full" / "epoch_2.pth"  # saved after the frozen epoch 1

    resumed, rec = make_runner(tmp_path, "resumed", resume=True, load_from=str(ckpt))
    resumed.train()
    assert rec.changed == [True, False]  # epochs 2 and 3
    assert rec.logged == [0.0, 1.0]
    got = final_state(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Control: without the hook's state in the checkpoint, on_unfreeze="reset" is not
    # replayed at epoch 2 (stale momentum is applied), and the result differs.
    stripped = torch.load(ckpt, weights_only=False)
    del stripped["freezesched"]
    torch.save(stripped, tmp_path / "stripped.pth")
    control, _ = make_runner(
        tmp_path, "control", resume=True, load_from=str(tmp_path / "stripped.pth")
    )
    control.train()
    got = final_state(control)
    assert not all(torch.equal(got[k], expected[k]) for k in expected)


def test_iteration_ticks_follow_an_iteration_based_loop(tmp_path):
    runner, rec = make_runner(
        tmp_path,
        "iters",
        train_cfg={"by_epoch": False, "max_iters": 6, "val_interval": 100},
        default_hooks={"logger": {"type": "LoggerHook", "interval": 1}},
        log_processor={"by_epoch": False},
    )
    runner.train()
    assert rec.changed == [True, False] * 3
    assert rec.logged == [0.0, 1.0] * 3


def test_layerwise_schedule_over_a_list_of_modules(tmp_path):
    hook = {
        "type": "FreezeScheduleHook",
        "module": ["backbone.0", "backbone.3"],
        "schedule": {"type": "Layerwise", "stages": [{"type": "Constant", "frozen": True},
                                                     {"type": "Step", "rho": 2}]},
    }  # fmt: skip
    runner, rec = make_runner(tmp_path, "layers", epochs=2, hook=hook)
    first = runner.model.backbone[0].weight.detach().clone()
    runner.train()
    assert torch.equal(runner.model.backbone[0].weight, first)  # frozen throughout
    assert rec.changed == [True, True]  # stage 2 trains in epoch 0, the BN after it in 1
    scalars = next((tmp_path / "layers").glob("*/vis_data/scalars.json")).read_text()
    rows = [json.loads(line) for line in scalars.splitlines()]
    assert {r.get("frozen/backbone.0") for r in rows if "loss" in r} == {1.0}
    assert [r.get("frozen/backbone.3") for r in rows if "loss" in r][::4] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("hook", "error", "message"),
    [
        ({"schedule": {"type": "Stepp", "rho": 2}}, ValueError, "Stepp"),
        ({"schedule": {"type": "Step", "rho": 0}}, ValueError, "rho"),
        ({}, TypeError, "schedule is required"),
        ({"schedule": {"type": "Step", "rho": 2}, "bn": "frozen"}, ValueError, "bn"),
        (
            {"schedule": {"type": "Step", "rho": 2}, "on_unfreeze": "zero"},
            ValueError,
            "on_unfreeze",
        ),
        ({"schedule": {"type": "Step", "rho": 2}, "module": 3}, TypeError, "module"),
    ],
)
def test_bad_hook_config_fails_when_the_runner_is_built(tmp_path, hook, error, message):
    with pytest.raises(error, match=message):
        make_runner(tmp_path, "bad", hook={"type": "FreezeScheduleHook", **hook})


def test_unknown_module_name_fails_before_the_first_step_and_touches_nothing(tmp_path):
    hook = {
        "type": "FreezeScheduleHook",
        "module": "bakbone",
        "schedule": {"type": "Step", "rho": 2},
    }
    runner, rec = make_runner(tmp_path, "typo", hook=hook)
    with pytest.raises(ValueError, match="bakbone"):
        runner.train()
    assert rec.changed == []
    assert all(p.requires_grad for p in runner.model.parameters())


def test_hook_accepts_schedule_objects_and_a_schedules_mapping():
    hook = FreezeScheduleHook(schedules={"backbone": Step(2), "head": {"type": "Step", "rho": 3}})
    assert hook.name == "backbone+head"
    with pytest.raises(TypeError, match="not both"):
        FreezeScheduleHook(schedule=Step(2), schedules={"backbone": Step(2)})


def test_hook_under_two_process_gloo_ddp(tmp_path):
    import mm_ddp_worker

    outcomes = run_ranks(mm_ddp_worker.run, 2, 180, str(tmp_path / "rendezvous"), str(tmp_path))
    for payload in outcomes.values():
        assert "find_unused_parameters=True" in payload["refused"]
        assert payload["moved"] == [True, False, True, False]
        assert payload["out_of_sync"] == 0
