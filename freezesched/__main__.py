"""Command line: ``python -m freezesched demo`` and ``python -m freezesched timeline``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from freezesched.demo import format_table, run_demo, to_json

    print(
        f"freezesched demo: fine-tuning a pretrained CNN for {args.epochs} epochs on "
        f"{args.samples} embedded synthetic images under four policies (CPU)...",
        file=sys.stderr,
    )
    results = run_demo(
        epochs=args.epochs,
        samples=args.samples,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(to_json(results) + "\n")
    return 0


def _timeline(args: argparse.Namespace) -> int:
    from freezesched.schedules import schedule_from_config

    try:
        schedule = schedule_from_config(json.loads(args.schedule))
        line = schedule.timeline(args.ticks, start=args.start)
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        print(f"freezesched timeline: {error}", file=sys.stderr)
        return 2
    print(repr(schedule))
    rows = line.reshape(len(line), -1).T
    for i, row in enumerate(rows):
        label = "frozen" if len(rows) == 1 else f"stage {i}"
        marks = "".join("#" if f else "." for f in row)
        print(f"{label:>8} {marks}  ({int(row.sum())}/{len(row)} frozen; # = frozen)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freezesched", description="Freezing schedules for PyTorch fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune a small CNN under four freezing policies")
    demo.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs per policy")
    demo.add_argument("--samples", type=int, default=768, help="training images")
    demo.add_argument("--pretrain-epochs", type=int, default=4, help="source-task epochs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    demo.set_defaults(run=_demo)
    timeline = sub.add_parser("timeline", help="print a schedule's decisions over ticks")
    timeline.add_argument(
        "schedule", help='a schedule config as JSON, e.g. \'{"type": "Step", "rho": 5}\''
    )
    timeline.add_argument("--ticks", type=int, default=40, help="one past the last tick")
    timeline.add_argument("--start", type=int, default=0, help="the first tick")
    timeline.set_defaults(run=_timeline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
