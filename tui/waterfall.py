"""Waterfall bars: a request's hops on a shared time axis, drawn to 1/8 of a cell.

The list and the timeline both draw with :func:`bar`.  A cell is sampled at eight points;
where a bar begins, ends or changes hop inside a cell, a left-eighths block character
(``▏▎▍▌▋▊▉``) draws the left part in one colour and its background the right part in
another, which is as fine as a terminal gets without pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import pairwise

from hopscope.tracing.model import Span, Trace
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

__all__ = [
    "HOPS",
    "KIND_COLOURS",
    "Stretch",
    "Tick",
    "axis",
    "bar",
    "hop_stretches",
    "span_kind",
]

HOPS = ("client", "proxy", "queue", "server", "app")

KIND_COLOURS: dict[str, str] = {
    "client": "#5f87d7",
    "proxy": "#af87ff",
    "queue": "#d7af5f",
    "server": "#5fafaf",
    "app": "#5fd75f",
    "background": "#d787d7",
    "user": "#ff875f",
    "error": "#ff5f5f",
}
_OTHER_COLOUR = "#8a8a8a"

#: How deep a hop sits: in a row's single bar the innermost hop running wins.
_DEPTH = {"client": 0, "proxy": 1, "queue": 2, "server": 3, "app": 4, "background": 5}

_EIGHTHS = " ▏▎▍▌▋▊▉█"

Stretch = tuple[str, int, int]
"""``(kind, start_ns, end_ns)``: one colour of a bar."""
Tick = tuple[int, str, str]
"""``(ts_ns, character, colour)``: an event marked on a bar."""


def span_kind(span: Span) -> str:
    """The colour family of a span: its hop, or ``queue``, ``user``, ``background``."""
    kind = span.attrs.get("span.kind")
    if kind == "queue" or (span.hop == "server" and span.name == "queue"):
        return "queue"
    if kind == "user":
        return "user"
    if span.hop == "app" and span.name == "background":
        return "background"
    return span.hop


def kind_colour(kind: str) -> str:
    return KIND_COLOURS.get(kind, _OTHER_COLOUR)


def hop_stretches(trace: Trace, now: int) -> list[Stretch]:
    """A request's hops flattened into one bar: at each moment the innermost hop running.

    So a proxied request reads client, proxy, queue, server, app and back out, like the
    phases of a browser's network waterfall.  Spans still running end at ``now``; user
    spans are detail for the timeline and are left out.
    """
    intervals: list[tuple[int, int, int, str]] = []
    for span in trace.outline():
        if span.start is None:
            continue
        kind = span_kind(span)
        depth = _DEPTH.get(kind)
        if depth is None:
            continue
        end = span.end if span.end is not None else max(now, span.start)
        intervals.append((depth, span.start, end, kind))
    if not intervals:
        return []
    if len(intervals) == 1:
        _, start, end, kind = intervals[0]
        return [(kind, start, end)]
    points = sorted({p for _, s, e, _ in intervals for p in (s, e)})
    out: list[Stretch] = []
    for a, b in pairwise(points):
        best_depth = -1
        best_kind = ""
        for depth, s, e, kind in intervals:
            if s <= a and e >= b and depth > best_depth:
                best_depth, best_kind = depth, kind
        if best_depth < 0:
            continue
        if out and out[-1][0] == best_kind and out[-1][2] == a:
            out[-1] = (best_kind, out[-1][1], b)
        else:
            out.append((best_kind, a, b))
    if not out:  # every span took no time at all
        deepest = max(intervals)
        return [(deepest[3], deepest[1], deepest[2])]
    return out


@lru_cache(maxsize=512)
def _style(fg: str | None, bg: str | None, reverse: bool = False) -> Style:
    return Style(
        color=Color.parse(fg) if fg else None,
        bgcolor=Color.parse(bg) if bg else None,
        reverse=reverse or None,
    )


def bar(
    stretches: Sequence[Stretch],
    t0: int,
    t1: int,
    width: int,
    *,
    background: str | None = None,
    ticks: Iterable[Tick] = (),
) -> list[Segment]:
    """Exactly ``width`` cells drawing ``stretches`` on the axis ``t0``..``t1`` (ns).

    ``background`` is the colour behind the bar (a hex string); partial cells need it to
    draw their empty part.  A stretch shorter than an eighth of a cell still shows one.
    """
    if width <= 0:
        return []
    span_ns = max(t1 - t0, 1)
    count = width * 8
    samples: list[str | None] = [None] * count
    for kind, start, end in stretches:
        a = round((start - t0) * count / span_ns)
        b = round((end - t0) * count / span_ns)
        a = min(max(a, 0), count - 1)
        b = min(max(b, a + 1), count)
        samples[a:b] = [kind] * (b - a)

    cells: list[tuple[str, Style]] = []
    for index in range(width):
        cell = samples[index * 8 : index * 8 + 8]
        left = cell[0]
        run = 1
        while run < 8 and cell[run] == left:
            run += 1
        if run == 8:
            if left is None:
                cells.append((" ", _style(None, background)))
            else:
                cells.append(("█", _style(kind_colour(left), background)))
            continue
        right = next((k for k in cell[run:] if k is not None and k != left), None)
        left_colour = kind_colour(left) if left is not None else background
        right_colour = kind_colour(right) if right is not None else background
        if left_colour is None and right_colour is not None:
            # No known background to draw the empty left part with: swap the colours.
            cells.append((_EIGHTHS[run], _style(right_colour, None, reverse=True)))
        else:
            cells.append((_EIGHTHS[run], _style(left_colour, right_colour)))

    for ts, char, colour in ticks:
        index = int((ts - t0) * width / span_ns)
        if 0 <= index < width or (index == width and ts <= t1):
            index = min(index, width - 1)
            under = samples[index * 8 + 4]
            cells[index] = (char, _style(colour, kind_colour(under) if under else background))

    segments: list[Segment] = []
    text = ""
    style: Style | None = None
    for char, cell_style in cells:
        if cell_style is style:
            text += char
        else:
            if text:
                segments.append(Segment(text, style))
            text, style = char, cell_style
    if text:
        segments.append(Segment(text, style))
    return segments


def _nice_step(raw: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten (ns) at least ``raw``."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= raw:
                return step * factor
        step *= 10


def _tick_label(value: int, step: int) -> str:
    if step >= 1_000_000_000:
        unit, scale = "s", 1e9
    elif step >= 1_000_000:
        unit, scale = "ms", 1e6
    else:
        unit, scale = "µs", 1e3
    if value == 0:
        return "0"
    return f"{value / scale:g}{unit}"


def axis(t0: int, t1: int, width: int, style: str = "dim") -> Text:
    """A ruler of ``width`` cells: ``0    50ms    100ms``, each label starting at its tick."""
    span_ns = max(t1 - t0, 1)
    text = Text(" " * max(width, 0), style=style, no_wrap=True, end="")
    if width < 2:
        return text
    step = _nice_step(span_ns / max(1, width // 10))
    chars = [" "] * width
    free = 0
    value = 0
    while value <= span_ns:
        position = int(value * width / span_ns)
        label = "╵" + _tick_label(value, step) if value else "╵0"
        if position >= free and position + len(label) <= width:
            chars[position : position + len(label)] = list(label)
            free = position + len(label) + 1
        value += step
    text.plain = "".join(chars)
    return text
