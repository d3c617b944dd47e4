"""Pictures of schedules and of what they save (needs ``pip install freezesched[plot]``).

Two figures, each drawn into a Matplotlib ``Axes`` (a new one if none is given) and
returned, so they compose with the rest of a figure:

- :func:`plot_timeline`: a schedule's decisions over ticks, one row per stage for
  per-stage (layer-wise) schedules;
- :func:`plot_cumulative_flops`: training FLOPs accumulated epoch by epoch for several
  policies against the full-training baseline (see
  :func:`freezesched.profiling.cumulative_flops`);
- :func:`plot_tradeoff`: one point per policy, what it achieved against what it cost.

Figures are built with Matplotlib's object API (no ``pyplot``, so no global state and no
display needed); :func:`save` writes one to a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from freezesched._validation import check_tick, describe
from freezesched.schedules import Schedule, ScheduleLike, check_schedule, timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["new_axes", "plot_cumulative_flops", "plot_timeline", "plot_tradeoff", "save"]

_FROZEN, _TRAINABLE = "#4c72b0", "#e8e8e8"
_PREFIXES = {0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P"}


def new_axes(width: float = 8.0, height: float = 3.0) -> Axes:
    """A fresh ``Axes`` on its own ``Figure`` (no ``pyplot``).

    Raises:
        ImportError: Matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'freezesched[plot]'") from error
    return Figure(figsize=(width, height), layout="constrained").add_subplot()


def plot_timeline(
    schedule: ScheduleLike,
    ticks: int,
    *,
    start: int = 0,
    stage_labels: Sequence[str] | None = None,
    tick_label: str = "epoch",
    ax: Axes | None = None,
) -> Axes:
    """Draw when a schedule freezes: filled cells are frozen ticks.

    Args:
        schedule: A schedule or a callable ``tick -> bool`` (or tuple of bools).
        ticks: Draw ticks ``start .. ticks - 1``.
        start: The first tick.
        stage_labels: Row labels for a per-stage schedule (default ``stage 0``, ...).
        tick_label: What a tick is, for the x axis.
        ax: Draw here; a new ``Axes`` if ``None``.

    Returns:
        The ``Axes``.

    Raises:
        TypeError, ValueError: bad ``schedule``, ``ticks`` or ``stage_labels``.

    Examples:
        >>> from freezesched import Layerwise
        >>> ax = plot_timeline(Layerwise.progressive(3, first=2, last=6), 10)
        >>> [t.get_text() for t in ax.get_yticklabels()]
        ['stage 0', 'stage 1', 'stage 2']
    """
    check_schedule(schedule)
    ticks = check_tick(ticks, "ticks")
    start = check_tick(start, "start")
    if ticks <= start:
        raise ValueError(f"ticks must be greater than start ({start}), got {ticks}")
    rows = timeline(schedule, ticks, start).T  # (stages, ticks)
    if stage_labels is None:
        labels = ["frozen"] if len(rows) == 1 else [f"stage {i}" for i in range(len(rows))]
    else:
        labels = list(stage_labels)
        if len(labels) != len(rows):
            raise ValueError(
                f"stage_labels must have one label per stage ({len(rows)}), got {len(labels)}"
            )
    ax = ax if ax is not None else new_axes(8.0, 0.6 + 0.35 * len(rows))
    from matplotlib.colors import ListedColormap

    ax.imshow(
        rows.astype(np.uint8),
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap([_TRAINABLE, _FROZEN]),
        vmin=0,
        vmax=1,
        extent=(start - 0.5, ticks - 0.5, len(rows) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel(f"{tick_label} (filled = frozen)")
    frozen = int(rows.sum())
    ax.set_title(f"{_short(schedule)}: {frozen}/{rows.size} frozen", fontsize="medium")
    return ax


def plot_cumulative_flops(
    curves: Mapping[str, Sequence[float] | np.ndarray],
    *,
    baseline: str | None = None,
    unit: float | None = None,
    unit_name: str | None = None,
    tick_label: str = "epoch",
    ax: Axes | None = None,
) -> Axes:
    """Draw cumulative training FLOPs per policy; the legend gives each total and ΔF.

    Args:
        curves: Policy label -> FLOPs accumulated by the end of each epoch (e.g. from
            :func:`freezesched.profiling.cumulative_flops`).
        baseline: The label of full training, drawn dashed; ΔF in the legend is
            against it. Default: the first curve.
        unit: Divide FLOPs by this for the y axis; default: the largest of 1, 1e3, ...,
            1e15 not above the largest total (TFLOPs for real detectors).
        unit_name: The unit's name; default: FLOPs with the matching SI prefix.
        tick_label: What a tick is, for the x axis.
        ax: Draw here; a new ``Axes`` if ``None``.

    Returns:
        The ``Axes``.

    Raises:
        ValueError: no curves, curves of different lengths, or an unknown baseline.

    Examples:
        >>> ax = plot_cumulative_flops({"full": [3e12, 6e12], "DBF": [3e12, 4e12]})
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['full: 6 TFLOPs', 'DBF: 4 TFLOPs (ΔF -2)']
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"curves must be a non-empty mapping of label to values, got {curves!r}")
    arrays = {k: np.asarray(v, dtype=float) for k, v in curves.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            "curves must all have the same, non-zero length, got "
            f"{ {k: len(a) for k, a in arrays.items()} }"
        )
    base = next(iter(arrays)) if baseline is None else baseline
    if base not in arrays:
        raise ValueError(f"baseline must be one of {list(arrays)}, got {describe(baseline)}")
    ax = ax if ax is not None else new_axes(7.0, 4.0)
    epochs = np.arange(1, lengths.pop() + 1)
    total = arrays[base][-1]
    if unit is None:
        largest = max(float(np.abs(a).max()) for a in arrays.values())
        exponent = 0
        while exponent < 15 and largest >= 10.0 ** (exponent + 3):
            exponent += 3
        unit = 10.0**exponent
        unit_name = unit_name or f"{_PREFIXES[exponent]}FLOPs"
    unit_name = unit_name or "FLOPs"
    for label, values in arrays.items():
        style: dict[str, Any] = {"color": "black", "linestyle": "--"} if label == base else {}
        text = f"{label}: {values[-1] / unit:.3g} {unit_name}"
        if label != base:
            text += f" (ΔF {(values[-1] - total) / unit:+.3g})"
        ax.plot(epochs, values / unit, label=text, **style)
    ax.set_xlabel(tick_label)
    ax.set_ylabel(f"cumulative training {unit_name}")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def _unit(largest: float) -> tuple[float, str]:
    exponent = 0
    while exponent < 15 and largest >= 10.0 ** (exponent + 3):
        exponent += 3
    return 10.0**exponent, f"{_PREFIXES[exponent]}FLOPs"


def plot_tradeoff(
    points: Mapping[str, tuple[float, float | None]],
    *,
    metric: str = "accuracy",
    ax: Axes | None = None,
) -> Axes:
    """Draw one labelled point per policy: training FLOPs (x) against a metric (y).

    Args:
        points: Policy label -> ``(training FLOPs, metric)``; a ``None`` metric is left
            out.
        metric: The metric's name, for the y axis.
        ax: Draw here; a new ``Axes`` if ``None``.

    Returns:
        The ``Axes``.

    Raises:
        ValueError: no point has a metric.

    Examples:
        >>> ax = plot_tradeoff({"full": (6e12, 70.0), "frozen": (3e12, 31.0)})
        >>> ax.get_xlabel(), [t.get_text() for t in ax.texts]
        ('training TFLOPs', ['full', 'frozen'])
    """
    shown = {k: (float(x), float(y)) for k, (x, y) in points.items() if y is not None}
    if not shown:
        raise ValueError(f"points must hold at least one metric value, got {dict(points)!r}")
    unit, name = _unit(max(abs(x) for x, _ in shown.values()))
    ax = ax if ax is not None else new_axes(6.0, 4.0)
    for label, (x, y) in shown.items():
        ax.scatter([x / unit], [y], zorder=3)
        ax.annotate(label, (x / unit, y), textcoords="offset points", xytext=(5, 4),
                    fontsize="small")  # fmt: skip
    ax.set_xlabel(f"training {name}")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return ax


def save(ax: Axes, path: str, *, dpi: int = 120) -> None:
    """Write the figure holding ``ax`` to ``path`` (format from the extension)."""
    figure: Any = ax.figure
    figure.savefig(path, dpi=dpi)


def _short(schedule: object) -> str:
    if isinstance(schedule, Schedule):
        return schedule.summary()
    return str(getattr(schedule, "__name__", type(schedule).__name__))
