"""Plain-text tables for seminars and reports: readable in a notebook output, a terminal and a diff."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def format_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Rows as an aligned table: the first column left-aligned (labels), the rest right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    for row in cells[1:]:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells but the header has {len(header)}: {row}")
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        aligned = (
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        lines.append("  ".join(aligned))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def show_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> None:
    """Print `format_table(header, rows)`."""
    print(format_table(header, rows))
