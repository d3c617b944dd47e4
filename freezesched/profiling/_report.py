"""Tables in four formats: aligned text, Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["Format", "render_table"]

Format = Literal["text", "markdown", "csv", "json"]
FORMATS: tuple[Format, ...] = ("text", "markdown", "csv", "json")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:,.0f}"
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    fmt: Format = "text",
) -> str:
    """Render ``rows`` with the given ``(key, header)`` columns.

    Text and Markdown show formatted cells (thousands separators, ``-`` for missing);
    CSV and JSON keep the raw values under the keys, for machines.

    Args:
        rows: One mapping per row.
        columns: ``(key, header)`` pairs, in order.
        fmt: ``"text"``, ``"markdown"``, ``"csv"`` or ``"json"``.

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
