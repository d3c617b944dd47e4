"""The worked example examples/peft_remote_sensing (issue 16, point 5), run on CPU.

Runs where peft and timm are installed (``scripts/other_torch.sh newest``).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]


def test_peft_remote_sensing_example_runs_its_schedule_and_reports_the_cost(capsys):
    namespace = runpy.run_path(str(ROOT / "examples" / "peft_remote_sensing" / "train.py"))
    result = namespace["main"](["--epochs", "5", "--warmup", "2", "--rho", "2"])
    # Top blocks: frozen through the warm-up (epochs 0, 1), then Step(2) from epoch 2.
    assert [h["top_frozen"] for h in result["history"]] == [True, True, False, True, False]
    assert result["history"][-1]["acc"] > result["history"][0]["acc"]
    run = result["run"]
    assert len(run.phases) == 2 and sum(p.steps for p in run.phases) == 5 * 6
    out = capsys.readouterr().out
    assert "top blocks trainable" in out and "LoRA + DBF top blocks" in out
