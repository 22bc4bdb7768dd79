"""Plain-text tables (imports nothing from difflab): the one printer behind every table difflab shows."""
from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[str]], align: str = "left", rule: bool = True) -> str:
    """``rows[0]`` is the header; columns padded to their widest cell (``align`` ``left`` or
    ``right``), with a rule of dashes under the header when ``rule``."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    pad = str.ljust if align == "left" else str.rjust
    lines = ["  ".join(pad(str(c), w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
