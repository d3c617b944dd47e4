"""Long differential fuzzing run of the guard against freezing by hand.

    python benchmarks/fuzz_guard.py [--examples 5000] [--seed 0]

The same cases as tests/test_fuzz.py (see tests/fuzz_guard.py), as many as asked for;
prints how many were compared and how many were rightly refused (a module trainable under
one name and frozen under another). Exits non-zero, with the failing case, on any
difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_guard import check, recipes
from hypothesis import HealthCheck, given, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    outcome = {"compared": 0, "refused": 0}

    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(recipe=recipes())
    def run(recipe) -> None:
        outcome["compared" if check(recipe) else "refused"] += 1

    start = time.perf_counter()
    run._hypothesis_internal_use_seed = args.seed  # type: ignore[attr-defined]
    run()
    seconds = time.perf_counter() - start
    print(f"{outcome['compared']} cases compared bitwise, {outcome['refused']} rightly refused, "
          f"{seconds:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
