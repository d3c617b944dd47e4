"""The one renderer: cost records as aligned text, Markdown, CSV or JSON tables.

Three views of the records in :mod:`freezesched.profiling._record` and one of a counted
step: :func:`render_runs` (policies side by side, Table II/III style),
:func:`render_phases` (one run, per freeze state) and :func:`render_modules` (one step,
per module). Text and Markdown show formatted cells; CSV and JSON keep raw numbers.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from freezesched.profiling._flops import OUTSIDE, StepFlops
from freezesched.profiling._record import MemoryPlan, RunCost

__all__ = [
    "Format",
    "render_memory",
    "render_modules",
    "render_phases",
    "render_runs",
    "render_table",
]

Format = Literal["text", "markdown", "csv", "json"]
FORMATS: tuple[Format, ...] = ("text", "markdown", "csv", "json")
Column = tuple[str, str]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:,.0f}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    fmt: Format = "text",
    *,
    drop_empty: bool = False,
) -> str:
    """Render ``rows`` with the given ``(key, header)`` columns.

    Text and Markdown show formatted cells (thousands separators, ``-`` for missing);
    CSV and JSON keep the raw values under the keys, for machines.

    Args:
        rows: One mapping per row.
        columns: ``(key, header)`` pairs, in order.
        fmt: ``"text"``, ``"markdown"``, ``"csv"`` or ``"json"``.
        drop_empty: Leave out columns with no value in any row (text and Markdown only).

    Raises:
        ValueError: unknown ``fmt``.

    Examples:
        >>> rows = [{"policy": "full", "tflops": 1234567.5}, {"policy": "DBF", "tflops": None}]
        >>> print(render_table(rows, [("policy", "policy"), ("tflops", "TFLOPs")]))
        policy  TFLOPs
        full    1,234,568
        DBF     -
        >>> print(render_table(rows, [("policy", "policy")], "markdown"))
        | policy |
        |---|
        | full |
        | DBF |
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    keys = [key for key, _ in columns]
    if fmt == "json":
        return json.dumps([{k: row.get(k) for k in keys} for row in rows], indent=2,
                          ensure_ascii=False)  # fmt: skip
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(keys)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
        return buffer.getvalue().rstrip("\n")
    if drop_empty:
        columns = [(k, h) for k, h in columns if any(row.get(k) is not None for row in rows)]
        keys = [key for key, _ in columns]
    headers = [header for _, header in columns]
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(x) for x in column) for column in zip(headers, *cells, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (headers, *cells)
    )


def _tera(value: int | None) -> float | None:
    return None if value is None else value / 1e12


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _frozen(run: RunCost) -> str | None:
    if run.ticks is not None and run.frozen_ticks is not None:
        f = run.frozen_ticks
        text = f"{int(f)}" if float(f).is_integer() else f"{f:.2f}"
        return f"{text}/{run.ticks}"
    if run.steps:
        return f"{run.frozen_steps}/{run.steps}"
    return None


def render_runs(
    runs: Sequence[RunCost], fmt: Format = "text", *, metrics: Sequence[str] | None = None
) -> str:
    """Policies side by side (Table II/III style): FLOPs, ΔF, time, memory, metrics.

    The first run is the baseline for ``ΔT``, and for the measured ``ΔTFLOPs`` of a run
    that never counted a full-training step (e.g. a frozen backbone): its measured total
    minus the first run's, which is right when all runs train on the same samples. In
    text and Markdown, columns nobody filled are left out.

    Args:
        runs: The records, baseline (full training) first.
        fmt: The output format.
        metrics: Which metrics to show, in order (default: all, in order of appearance).

    Examples:
        >>> from freezesched.profiling import PhaseCost, RunCost, StepCost, FlopCount
        >>> full = StepCost((), FlopCount(forward=10**12, backward_unsplit=2 * 10**12), 0)
        >>> frozen = StepCost(("backbone",), FlopCount(forward=10**12), 6 * 10**11)
        >>> a = RunCost("full", phases=(PhaseCost((), samples=2, cost=full),),
        ...             full_training=full, metrics={"acc": 0.7})
        >>> b = RunCost("frozen", phases=(PhaseCost(("backbone",), samples=2, cost=frozen),),
        ...             metrics={"acc": 0.5})
        >>> print(render_runs([a, b]))
        policy  acc  TFLOPs  ΔTFLOPs  ΔTFLOPs (2x)
        full    0.7  6       0        0
        frozen  0.5  2       -4       -2.4
    """
    names = (
        list(metrics)
        if metrics is not None
        else list(dict.fromkeys(k for run in runs for k in run.metrics))
    )
    base = runs[0] if runs else None
    rows = []
    for run in runs:
        delta = run.delta_flops_measured
        if delta is None and base is not None and base.delta_flops_measured == 0:
            delta = run.flops_measured - base.flops_measured
        seconds = run.seconds
        base_seconds = base.seconds if base is not None else None
        frozen_phases = [p for p in run.phases if p.frozen_modules and p.saved_bytes is not None]
        trainable = [p for p in run.phases if not p.frozen_modules and p.saved_bytes is not None]
        row: dict[str, Any] = {
            "policy": run.label,
            "frozen": _frozen(run),
            "tflops": _tera(run.flops_measured) if run.counted_samples else None,
            "delta_tflops": _tera(delta),
            "delta_tflops_2x": _tera(run.delta_flops_2x) if run.counted_samples else None,
            "seconds": seconds,
            "delta_seconds": None
            if seconds is None or base_seconds is None
            else seconds - base_seconds,
            "saved_mib_frozen": _mib(max(p.saved_bytes or 0 for p in frozen_phases))
            if frozen_phases
            else None,
            "saved_mib_trainable": _mib(trainable[0].saved_bytes) if trainable else None,
            "peak_cuda_mib": _mib(
                max((p.peak_cuda_bytes for p in run.phases if p.peak_cuda_bytes), default=None)
            ),
            "schedule": run.schedule or None,
        }
        for name in names:
            row[name] = run.metrics.get(name)
        rows.append(row)
    columns: list[Column] = [("policy", "policy"), ("frozen", "frozen")]
    columns += [(name, name) for name in names]
    columns += [
        ("tflops", "TFLOPs"),
        ("delta_tflops", "ΔTFLOPs"),
        ("delta_tflops_2x", "ΔTFLOPs (2x)"),
        ("seconds", "time (s)"),
        ("delta_seconds", "ΔT (s)"),
        ("saved_mib_frozen", "saved MiB frozen"),
        ("saved_mib_trainable", "saved MiB trainable"),
        ("peak_cuda_mib", "peak CUDA MiB"),
    ]
    if fmt in ("csv", "json"):
        columns.append(("schedule", "schedule"))
    return render_table(rows, columns, fmt, drop_empty=True)


def render_phases(run: RunCost, fmt: Format = "text") -> str:
    """One run, one row per freeze state: steps, samples, per-sample GFLOPs, time, memory."""
    rows = []
    for phase in run.phases:
        cost = phase.cost
        rows.append(
            {
                "frozen": ", ".join(phase.frozen_modules) or "-",
                "steps": phase.steps or None,
                "samples": phase.samples,
                "ticks": phase.ticks,
                "gflops_forward": cost.flops.forward / 1e9 if cost else None,
                "gflops_backward": cost.flops.backward / 1e9 if cost else None,
                "gflops_2x": cost.flops_2x / 1e9 if cost else None,
                "seconds_per_step": phase.seconds_per_step,
                "saved_mib": _mib(phase.saved_bytes),
                "peak_cuda_mib": _mib(phase.peak_cuda_bytes),
            }
        )
    columns: list[Column] = [
        ("frozen", "frozen modules"),
        ("ticks", "ticks"),
        ("steps", "steps"),
        ("samples", "samples"),
        ("gflops_forward", "GFLOPs/sample fwd"),
        ("gflops_backward", "bwd"),
        ("gflops_2x", "fwd+bwd (2x)"),
        ("seconds_per_step", "s/step"),
        ("saved_mib", "saved MiB"),
        ("peak_cuda_mib", "peak CUDA MiB"),
    ]
    return render_table(rows, columns, fmt, drop_empty=True)


def render_modules(step: StepFlops, fmt: Format = "text", *, depth: int | None = None) -> str:
    """One counted step, one row per module: FLOPs by phase and kind, excluding children.

    Rows are the modules' *own* FLOPs (children excluded) plus work done outside every
    module, so the columns add up exactly to the ``total`` row. ``depth`` folds deeper
    modules into their ancestor at that depth (``depth=1``: top-level children).

    Examples:
        >>> from torch import nn
        >>> import torch
        >>> from freezesched.profiling import count_flops
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> step = count_flops(lambda: net(torch.randn(3, 4)).sum().backward(), net)
        >>> print(render_modules(step))
        module  forward  input grad  weight grad  backward (unsplit)  total
        0       96       0           0            96                  192
        2       48       0           0            96                  144
        total   144      0           0            192                 336
    """
    folded: dict[str, list[int]] = {}
    for name, count in step.exclusive.items():
        key = name
        if depth is not None and name != OUTSIDE:
            key = ".".join(name.split(".")[:depth]) if name else name
        values = folded.setdefault(key, [0, 0, 0, 0])
        for i, v in enumerate(
            (count.forward, count.input_grad, count.weight_grad, count.backward_unsplit)
        ):
            values[i] += v
    order = {name: i for i, name in enumerate(step.modules)}
    rows = [
        {
            "module": name or "(model)",
            "forward": v[0],
            "input_grad": v[1],
            "weight_grad": v[2],
            "backward_unsplit": v[3],
            "total": sum(v),
        }
        for name, v in sorted(folded.items(), key=lambda kv: order.get(kv[0], len(order)))
        if sum(v)
    ]
    t = step.total
    rows.append(
        {
            "module": "total",
            "forward": t.forward,
            "input_grad": t.input_grad,
            "weight_grad": t.weight_grad,
            "backward_unsplit": t.backward_unsplit,
            "total": t.total,
        }
    )
    columns: list[Column] = [
        ("module", "module"),
        ("forward", "forward"),
        ("input_grad", "input grad"),
        ("weight_grad", "weight grad"),
        ("backward_unsplit", "backward (unsplit)"),
        ("total", "total"),
    ]
    return render_table(rows, columns, fmt)


def _gib(value: int) -> float:
    return value / 2**30


def render_memory(plan: MemoryPlan, fmt: Format = "text") -> str:
    """A memory plan, one row per freeze state: GiB per rank by kind, and the peak.

    Text and Markdown show GiB (2**30 bytes); CSV and JSON keep bytes.

    Examples:
        >>> from freezesched.profiling import MemoryPhase, MemoryPlan
        >>> phase = MemoryPhase("frozen", ("backbone",), 10, 90, weights=400, gradients=40,
        ...                     optimizer=80, activations=2**30, buffers=0, transient=0,
        ...                     peak=2**30 + 480)
        >>> plan = MemoryPlan("toy", (1, 3), "adamw", "fp32", "none", 1, (phase,))
        >>> print(render_memory(plan, "csv"))
        phase,frozen,trainable,weights,gradients,optimizer,activations,buffers,transient,peak
        frozen,backbone,10,400,40,80,1073741824,0,0,1073742304
        >>> print(render_memory(plan).splitlines()[1].split()[-1])  # GiB in text
        1
    """
    raw = fmt in ("csv", "json")

    def size(value: int) -> float | int:
        return value if raw else round(_gib(value), 2)

    rows = [
        {
            "phase": p.label,
            "frozen": ", ".join(p.frozen_modules) or "-",
            "trainable": p.trainable_elements,
            "weights": size(p.weights),
            "gradients": size(p.gradients),
            "optimizer": size(p.optimizer),
            "activations": size(p.activations),
            "buffers": size(p.buffers),
            "transient": size(p.transient),
            "peak": size(p.peak),
        }
        for p in plan.phases
    ]
    unit = "" if raw else " GiB"
    columns: list[Column] = [
        ("phase", "phase"),
        ("frozen", "frozen"),
        ("trainable", "trainable"),
        ("weights", f"weights{unit}"),
        ("gradients", f"grads{unit}"),
        ("optimizer", f"optimizer{unit}"),
        ("activations", f"activations{unit}"),
        ("buffers", f"buffers{unit}"),
        ("transient", f"transient{unit}"),
        ("peak", f"peak{unit}"),
    ]
    return render_table(rows, columns, fmt)
