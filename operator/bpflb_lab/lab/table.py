"""Plain-text tables for the lab's human output (status, check)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    out = []
    for line in table:
        cells = [c.ljust(w) for c, w in zip(line, widths, strict=False)] + line[len(widths):]
        out.append((indent + "  ".join(cells)).rstrip())
    return out
