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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_results():
    return run_demo(epochs=5, samples=64, pretrain_epochs=1, seed=0)


def test_demo_rows_follow_their_schedules(tiny_results):
    expected = {name: int(s.timeline(5).sum()) for name, s in policies(5).items()}
    assert [r.policy for r in tiny_results] == list(expected)
    assert {r.policy: r.frozen_epochs for r in tiny_results} == expected
    assert expected == {"full (ρ=1)": 0, "frozen (ρ=∞)": 5, "DBF (ρ=1 → ρ=5)": 3, "cosine": 2}
    for r in tiny_results:
        assert 0.0 <= r.accuracy <= 1.0
        assert r.seconds > 0


def test_demo_frozen_steps_keep_far_less_for_backward(tiny_results):
    full, frozen = tiny_results[0], tiny_results[1]
    assert full.saved_bytes_frozen_step is None and frozen.saved_bytes_trainable_step is None
    assert frozen.saved_bytes_frozen_step * 3 < full.saved_bytes_trainable_step
    dbf = tiny_results[2]
    assert dbf.saved_bytes_frozen_step == frozen.saved_bytes_frozen_step
    assert dbf.saved_bytes_trainable_step == full.saved_bytes_trainable_step
    table = format_table(tiny_results)
    assert table.splitlines()[0].startswith("policy") and "DBF (ρ=1 → ρ=5)" in table


def test_demo_data_are_a_pure_function_of_the_seed():
    a = make_oriented_objects(16, 8, seed=3, shifted=True)
    b = make_oriented_objects(16, 8, seed=3, shifted=True)
    c = make_oriented_objects(16, 8, seed=4, shifted=True)
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not a[0].equal(c[0])


def test_cli_demo_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    status = main(["demo", "--epochs", "2", "--samples", "32", "--pretrain-epochs", "1",
                   "--json", str(out)])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "frozen epochs" in printed and "cosine" in printed
    rows = json.loads(out.read_text(encoding="utf-8"))
    expected = [int(s.timeline(2).sum()) for s in policies(2).values()]
    assert [r["frozen_epochs"] for r in rows] == expected == [0, 2, 0, 1]


def test_cli_timeline(capsys):
    assert main(["timeline", '{"type": "Step", "rho": 3}', "--ticks", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["Step(rho=3)", "  frozen .##.##.  (4/7 frozen; # = frozen)"]
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
        (["timeline", "{nope"], "Expecting property name"),
        (["timeline", '{"type": "Step", "rho": 0}'], "rho must be an int >= 1"),
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
