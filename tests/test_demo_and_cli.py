"""The demo, the command line and the examples, at tiny size."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from freezesched import Step, WarmupThenFreeze
from freezesched.__main__ import main
from freezesched.demo import format_table, make_oriented_objects, policies, run_demo
from freezesched.schedules import timeline

NAMES = ["full (ρ=1)", "frozen (ρ=∞)", "DBF (ρ=1 → ρ=5)", "cosine", "plateau", "gradient"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_plan():
    plan = policies(5)
    results = run_demo(epochs=5, samples=64, pretrain_epochs=1, seed=0, plan=plan)
    return plan, results


@pytest.fixture(scope="module")
def tiny_results(tiny_plan):
    return tiny_plan[1][:4]  # the four fixed policies


def test_demo_rows_follow_their_schedules(tiny_plan):
    plan, results = tiny_plan
    fixed = {name: int(s.timeline(5).sum()) for name, s in list(policies(5).items())[:4]}
    assert fixed == {"full (ρ=1)": 0, "frozen (ρ=∞)": 5, "DBF (ρ=1 → ρ=5)": 3, "cosine": 2}
    assert [r.label for r in results] == list(plan) == NAMES
    # The adaptive schedules decided every epoch while the demo ran; the records say
    # what they decided, and the accounting followed it.
    lines = {name: timeline(s, 5) for name, s in plan.items()}
    assert {r.label: r.frozen_ticks for r in results} == {
        name: float(line.mean(axis=1).sum()) for name, line in lines.items()
    }
    assert {k: v for k, v in zip(NAMES[:4], [0.0, 5.0, 3.0, 2.0], strict=True)} == {
        r.label: r.frozen_ticks for r in results[:4]
    }
    for r in results:
        # 64 samples in batches of 32: 2 steps per epoch, frozen exactly on frozen epochs
        assert r.steps == 10 and r.frozen_steps == 2 * int(lines[r.label].any(axis=1).sum())
        assert 0.0 <= r.metrics["val acc %"] <= 100.0
        assert r.seconds is not None and r.seconds > 0
        assert len(r.curve) == 5 and r.curve[-1] == r.flops_measured
    # The plateau observed the monitor loss after each epoch past its warm-up (1 epoch),
    # the gradient schedule the stages' norms after every epoch.
    assert plan["plateau"].adaptive_parts[0].last_observed == 3
    assert plan["gradient"].last_observed == 4
    # Per-stage freezing is front to back: the frozen stages are a prefix.
    for row in lines["gradient"]:
        assert row.tolist() == sorted(row.tolist(), reverse=True)


def _phase(run, frozen: bool):
    return next(p for p in run.phases if bool(p.frozen_modules) == frozen)


def test_demo_frozen_steps_keep_far_less_for_backward(tiny_results):
    full, frozen, dbf, _ = tiny_results
    assert [p.frozen_modules for p in full.phases] == [()]
    assert [p.frozen_modules for p in frozen.phases] == [("backbone",)]
    assert _phase(frozen, True).saved_bytes * 3 < _phase(full, False).saved_bytes
    assert _phase(dbf, True).saved_bytes == _phase(frozen, True).saved_bytes
    assert _phase(dbf, False).saved_bytes == _phase(full, False).saved_bytes
    header = format_table(tiny_results).splitlines()[0].split("  ")
    assert [h.strip() for h in header if h.strip()][:6] == [
        "policy", "frozen", "val acc %", "TFLOPs", "ΔTFLOPs", "ΔTFLOPs (2x)",
    ]  # fmt: skip


def test_demo_flops_columns(tiny_results):
    full, frozen, dbf, cosine = tiny_results
    assert full.delta_flops_measured == 0 and full.delta_flops_2x == 0
    frozen_delta = frozen.flops_measured - full.flops_measured  # same samples
    dbf_delta, cosine_delta = dbf.delta_flops_measured, cosine.delta_flops_measured
    assert frozen_delta < dbf_delta < 0 and frozen.delta_flops_2x < dbf.delta_flops_2x < 0
    # Frozen epochs save exactly per-epoch savings: DBF froze 3 of 5 epochs, frozen all 5.
    assert dbf.delta_flops_2x * 5 == frozen.delta_flops_2x * 3
    assert dbf_delta * 5 == frozen_delta * 3 and cosine_delta * 5 == frozen_delta * 2
    rows = [line.split() for line in format_table(tiny_results).splitlines()[1:]]
    assert [r[1] for r in rows[:2]] == ["(ρ=1)", "(ρ=∞)"]


def test_demo_data_are_a_pure_function_of_the_seed():
    a = make_oriented_objects(16, 8, seed=3, shifted=True)
    b = make_oriented_objects(16, 8, seed=3, shifted=True)
    c = make_oriented_objects(16, 8, seed=4, shifted=True)
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not a[0].equal(c[0])


def test_cli_demo_prints_the_table_and_writes_json_and_a_plot(tmp_path, capsys):
    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    status = main(["demo", "--epochs", "2", "--samples", "32", "--pretrain-epochs", "1",
                   "--json", str(out), "--plot", str(png)])  # fmt: skip
    assert status == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out.splitlines()
    rows = json.loads(out.read_text(encoding="utf-8"))
    expected = [int(s.timeline(2).sum()) for s in list(policies(2).values())[:4]]
    assert [r["frozen_ticks"] for r in rows][:4] == expected == [0, 2, 0, 1]
    # 2 epochs with a warm-up of 1: the plateau has one observation, no switch yet; the
    # gradient schedule has its reference only.
    assert [r["frozen_ticks"] for r in rows][4:] == [0, 0]
    # The printed table's frozen column says the same, policy by policy.
    assert [line.split("  ")[0].strip() for line in printed[1:]] == NAMES
    frozen = [*expected, 0, 0]
    assert [f"{e}/2" in line for e, line in zip(frozen, printed[1:], strict=True)] == [True] * 6
    for r in rows:  # the plotted curve ends at the table's total
        assert len(r["curve"]) == 2 and r["curve"][-1] == r["totals"]["flops_measured"]


def test_cli_timeline(capsys):
    assert main(["timeline", '{"type": "Step", "rho": 3}', "--ticks", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["Step(3)", "  frozen .##.##.  (4/7 frozen; # = frozen)"]
    assert main(["timeline", '{"type": "Step", "rho": 3}', "--ticks", "2", "--full"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "Step(rho=3)"
    layerwise = (
        '{"type": "Layerwise", "stages": [{"type": "Step", "rho": "inf"}, '
        '{"type": "Constant", "frozen": false}]}'
    )
    assert main(["timeline", layerwise, "--ticks", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        " stage 0 ###  (3/3 frozen; # = frozen)",
        " stage 1 ...  (0/3 frozen; # = frozen)",
    ]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["timeline", "{nope"], "'{nope' is not JSON (Expecting property name"),
        (["timeline", "Step(5)"], 'must be a schedule config in JSON, e.g. \'{"type": '),
        (["timeline", '{"type": "Step", "rho": 0}'], "rho must be an int in [1, 2**53 - 1]"),
        (["timeline", '{"type": "Step", "rho": 2}', "--ticks", "-1"], "stop must be an int"),
    ],
)
def test_cli_timeline_bad_input(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_plain_loop_example(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--epochs", "8"])
    namespace = runpy.run_path(str(ROOT / "examples" / "plain_loop.py"))
    history = namespace["main"](epochs=8, steps=2)
    assert history == [WarmupThenFreeze(2, then=Step(5))(e) for e in range(8)]
    assert "frozen" in capsys.readouterr().out


def test_mmengine_example(tmp_path):
    runner = runpy.run_path(str(ROOT / "examples" / "mmengine_runner.py"))["main"](
        epochs=4, work_dir=str(tmp_path), size=16
    )
    log = next(tmp_path.glob("*/*.log")).read_text()
    expected = [WarmupThenFreeze(2, then=Step(3))(e) for e in range(4)]
    for epoch, frozen in enumerate(expected, start=1):
        assert f"Epoch(train) [{epoch}][2/2]" in log
        line = next(x for x in log.splitlines() if f"Epoch(train) [{epoch}][2/2]" in x)
        assert f"frozen/backbone: {float(frozen):.4f}" in line
    assert all(p.requires_grad for p in runner.model.parameters())  # released at the end


def test_lightning_example(capsys):
    history = runpy.run_path(str(ROOT / "examples" / "lightning_trainer.py"))["main"](
        epochs=5, samples=32
    )
    assert history == [WarmupThenFreeze(2, then=Step(3))(e) for e in range(5)]
    assert "backbone frozen" in capsys.readouterr().out


def test_hf_example(tmp_path, capsys):
    logs = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))["main"](
        epochs=5, samples=32, output_dir=str(tmp_path)
    )
    assert [e["frozen/backbone"] for e in logs] == [
        float(WarmupThenFreeze(2, then=Step(3))(e)) for e in range(5)
    ]
    assert "frozen/backbone 1.0" in capsys.readouterr().out


def test_readme_cli_examples_print_what_the_readme_says(capsys):
    import shlex

    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    examples = [i for i, line in enumerate(lines) if line.startswith("$ python -m freezesched")]
    assert examples
    for i in examples:
        argv = shlex.split(lines[i])[4:]  # after "$ python -m freezesched"
        expected = []
        for line in lines[i + 1 :]:
            if line.startswith("```"):
                break
            expected.append(line)
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines() == expected


def test_cli_project_matches_the_library(capsys):
    from helpers import make_net

    from freezesched.profiling import project_policies

    argv = ["project", "--model", "helpers:make_net", "--module", "backbone",
            "--input-shape", "2,3,16,16", "--epochs", "45", "--samples", "100",
            "--warmup", "5", "--format", "json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == [
        "full (ρ=1)", "frozen (ρ=∞)", "DBF (ρ=1 → ρ=2)", "DBF (ρ=1 → ρ=5)",
        "DBF (ρ=1 → ρ=10)", "DBF (ρ=1 → ρ=∞)",
    ]  # fmt: skip
    assert [r["frozen"] for r in rows] == ["0/45", "45/45", "20/45", "32/45", "36/45", "40/45"]
    expected = project_policies(make_net(), (2, 3, 16, 16), "backbone",
                                {"x": WarmupThenFreeze(5, then=Step(5))}, epochs=45,
                                samples_per_epoch=100)[0]  # fmt: skip
    assert rows[3]["delta_tflops_2x"] == expected.delta_flops_2x / 1e12
    assert rows[3]["delta_tflops"] == expected.delta_flops_measured / 1e12


def test_cli_project_custom_policy_to_file(tmp_path, capsys):
    out = tmp_path / "t.md"
    argv = ["project", "--model", "helpers:make_net", "--module", "backbone.0,backbone.1",
            "--input-shape", "2,3,16,16", "--epochs", "10", "--samples", "10",
            "--policy", 'mine={"type": "Step", "rho": 2}', "--format", "markdown",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("| policy | frozen | TFLOPs |") and lines[2].startswith(
        "| mine | 5/10 |"
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "helpers"], "--model must look like 'package.module:factory'"),
        (["--model", "helpers:nothing"], "has no attribute 'nothing'"),
        (["--model", "collections:OrderedDict"], "gave a OrderedDict, not an nn.Module"),
        (["--model", "helpers:make_net", "--policy", "x"], "--policy must look like 'NAME=JSON'"),
        (["--model", "helpers:make_net", "--policy", 'x={"type": "Step", "rho": 0}'],
         "rho must be"),
    ],
)  # fmt: skip
def test_cli_project_bad_input(argv, fragment, capsys):
    base = ["project", "--module", "backbone", "--input-shape", "2,3,16,16", "--epochs", "2",
            "--samples", "1"]  # fmt: skip
    assert main(base + argv) == 2
    assert fragment in capsys.readouterr().err
