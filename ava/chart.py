"""A metric as a terminal chart: plain text lines, no library. Pure (tests compare the text).

On a terminal the curve is drawn in braille dots (2 x 4 per character cell); off one in ASCII
`*`, so a CI log or a file shows the same shape. The x axis carries each attempt's start: its
number on the axis line, a dotted column up through the plot, so a failover is visible where it
happened.

    2.31 ┤⠑⠢⡀        ┊
         │   ⠈⠒⠤⣀     ┊
    1.62 ┤       ⠉⠒⠢⠤⣀⣀⣀⡀
         └1─────────2──────
          0      step     250
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Braille: the bit of each dot in a 2-wide, 4-high cell (Unicode's order), from U+2800.
_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
MIN_WIDTH = 30
MIN_HEIGHT = 4


@dataclass(frozen=True)
class Mark:
    """A labelled x position: where an attempt started."""

    x: float
    label: str


def render(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    width: int = 80,
    height: int = 10,
    marks: Sequence[Mark] = (),
    x_name: str = "step",
    unicode: bool = True,
) -> list[str]:
    """The chart of ys against xs (same length, xs ascending) in exactly `width` columns or
    fewer, `height` rows of plot plus two of axis. NaN and infinite values are left out."""
    width, height = max(width, MIN_WIDTH), max(height, MIN_HEIGHT)
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and math.isfinite(x)]
    if not pairs:
        return ["(no finite values)"]
    low, high = min(y for _, y in pairs), max(y for _, y in pairs)
    if high == low:
        low, high = (
            low - 0.5 if low == 0 else low - abs(low) * 0.05,
            high + 0.5 if high == 0 else high + abs(high) * 0.05,
        )
    x_low, x_high = min(x for x, _ in pairs), max(x for x, _ in pairs)
    if x_high == x_low:
        x_high = x_low + 1
    labels = [_label(high), _label((high + low) / 2), _label(low)]
    gutter = max(len(t) for t in labels) + 1
    cols = width - gutter - 1  # the axis character on the left
    sx, sy = (2, 4) if unicode else (1, 1)
    dots_w, dots_h = cols * sx, height * sy

    def dot_x(x: float) -> int:
        return min(dots_w - 1, max(0, round((x - x_low) / (x_high - x_low) * (dots_w - 1))))

    def dot_y(y: float) -> int:  # 0 at the top
        return min(dots_h - 1, max(0, round((high - y) / (high - low) * (dots_h - 1))))

    lit: set[tuple[int, int]] = set()
    previous: tuple[int, int] | None = None
    for x, y in pairs:
        here = (dot_x(x), dot_y(y))
        if previous is not None:
            lit.update(_segment(previous, here))
        lit.add(here)
        previous = here

    columns_marked = {min(cols - 1, dot_x(m.x) // sx): m.label for m in marks}
    grid = [[" "] * cols for _ in range(height)]
    for row in range(height):
        for col in range(cols):
            if unicode:
                bits = 0
                for dy in range(4):
                    for dx in range(2):
                        if (col * 2 + dx, row * 4 + dy) in lit:
                            bits |= _BRAILLE_BITS[dy][dx]
                cell = chr(0x2800 + bits) if bits else " "
            else:
                cell = "*" if (col, row) in lit else " "
            if cell == " " and col in columns_marked and col > 0:
                cell = "┊" if unicode else ":"
            grid[row][col] = cell

    label_rows = {0: labels[0], (height - 1) // 2: labels[1], height - 1: labels[2]}
    tick, bar = ("┤", "│") if unicode else ("+", "|")
    lines = []
    for row in range(height):
        text = label_rows.get(row, "")
        lines.append(f"{text.rjust(gutter - 1)} {tick if row in label_rows else bar}{''.join(grid[row])}".rstrip())
    axis = ["─" if unicode else "-"] * cols
    for col, label in columns_marked.items():
        axis[col] = label[:1]
    lines.append(" " * gutter + ("└" if unicode else "+") + "".join(axis))
    lines.append(" " * (gutter + 1) + _x_labels(x_low, x_high, cols, x_name))
    return lines


def _segment(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    """The dots of a straight line from a to b, ends included."""
    steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
    return [
        (round(a[0] + (b[0] - a[0]) * i / steps), round(a[1] + (b[1] - a[1]) * i / steps)) for i in range(steps + 1)
    ]


def _label(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def _x_labels(low: float, high: float, cols: int, name: str) -> str:
    """`low` under the axis's left end, `high` under its right end, the axis's name between."""
    left, right = _label(low), _label(high)
    middle = name.center(max(0, cols - len(left) - len(right)))
    if len(left) + len(middle) + len(right) > cols:
        return f"{left} {right}"[:cols]
    return left + middle + right
