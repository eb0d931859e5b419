"""Plain-text tables for terminals."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """Three left-aligned columns, two spaces apart (the last one unpadded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)

