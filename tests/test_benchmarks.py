"""The benchmarks still run (tiny sizes; their numbers are recorded in benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, script, *args], cwd=BENCH, capture_output=True, text=True, check=True,
        timeout=300,
    )  # fmt: skip
    return done.stdout


def test_timeline_speed_benchmark(tmp_path):
    out = _run("timeline_speed.py", "--ticks", "10000", "--repeat", "1",
               "--json", str(tmp_path / "t.json"))  # fmt: skip
    assert "Cosine(0, 1e6)" in out
    records = json.loads((tmp_path / "t.json").read_text())
    assert len(records) == 9 and all(r["ticks"] == 10_000 for r in records[:8])
    assert records[8]["schedule"] == "project(1600 epochs) x 6"
    assert "Eq. 1 projection, 1,600 epochs" in out


def test_accounting_overhead_benchmark(tmp_path):
    out = _run("accounting_overhead.py", "--steps", "8", "--epoch-steps", "2", "--size", "32",
               "--json", str(tmp_path / "o.json"))  # fmt: skip
    assert "projected overhead" in out
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["steps"] > 0 and record["extra_per_counted_step_s"] > -1
