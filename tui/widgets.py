"""The TUI's heat strip: a config's per-layer bits and ranks in two terminal rows."""

from __future__ import annotations

from rich.text import Text

from edgeqra.space import Config

__all__ = ["BIT_STYLE", "RANK_GLYPH", "heat_strip"]

# One colour per bit-width for the heat strip (FP16 for completeness).
BIT_STYLE = {2: "white on red", 3: "black on dark_orange", 4: "black on yellow",
             8: "black on green", 16: "white on blue"}  # fmt: skip

# Rank as a bar height (up to this rank), so 30+ layers fit one row of an 80-column terminal.
RANK_GLYPH = ((0, "·"), (4, "▂"), (8, "▄"), (16, "▆"))


def heat_strip(config: Config) -> Text:
    """Per-layer bits (colour and digit) over per-layer rank (bar height), a column per layer."""
    text = Text()
    for c in config:
        text.append(str(c.bits) if c.bits < 10 else "F", style=BIT_STYLE.get(c.bits, ""))
    text.append("\n")
    for c in config:
        text.append(next((g for top, g in RANK_GLYPH if c.rank <= top), "█"), style="bold")
    return text
