"""The Timeline tab: every span of one request on its own time axis.

One row per span, nested under its parent (client, proxy, queue, server, app, then the
middleware and user spans inside), each with its bar, its event ticks and its duration.
The highlighted span's attributes and events show beside the waterfall.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hopscope.tracing.model import Event, Span, Trace
from rich.cells import cell_len, set_cell_size
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from . import formatting
from .waterfall import Tick, axis, bar, kind_colour, span_kind

__all__ = ["Timeline", "span_rows", "trace_window"]

Clock = Callable[[], int]

_LEVEL_COLOURS = {
    "debug": "#8a8a8a",
    "info": "#5fafff",
    "warning": "#ffd75f",
    "error": "#ff5f5f",
    "critical": "#ff5f5f",
}


def _tick(event: Event) -> Tick:
    name = event.name
    if name == "exception":
        return (event.ts, "✖", "#ff5f5f")
    if name == "log":
        level = str(event.attrs.get("level", "info")).lower()
        return (event.ts, "•", _LEVEL_COLOURS.get(level, "#5fafff"))
    if name in ("response.start", "response.head"):
        return (event.ts, "▸", "#ffffff")
    if name == "disconnect":
        return (event.ts, "✕", "#ffd75f")
    if name.endswith(".body") or name.endswith(".summary"):
        return (event.ts, "·", "#ffffff")
    return (event.ts, "│", "#d0d0d0")


def span_rows(trace: Trace) -> list[tuple[int, Span]]:
    """``(depth, span)`` in tree order: each span under its parent, siblings by start."""
    spans = list(trace.spans.values())
    children: dict[str | None, list[Span]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in trace.spans else None
        children.setdefault(parent, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: (s.start is None, s.start or 0))
    rows: list[tuple[int, Span]] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            if span.span_id in seen:  # a cycle in bad data must not recurse forever
                continue
            seen.add(span.span_id)
            rows.append((depth, span))
            walk(span.span_id, depth + 1)

    walk(None, 0)
    return rows


def trace_window(trace: Trace, now: int) -> tuple[int, int]:
    """Where the trace's axis starts and ends: its first start to its last moment."""
    starts: list[int] = []
    ends: list[int] = []
    for span in list(trace.spans.values()):
        if span.start is not None:
            starts.append(span.start)
        if span.end is not None:
            ends.append(span.end)
        elif span.start is not None:
            ends.append(max(now, span.start))
        ends.extend(event.ts for event in span.events)
    if not starts:
        base = min(ends) if ends else now
        return (base, base + 1)
    t0 = min(starts)
    return (t0, max([t0 + 1, *ends]))


#: A span's events listed beside the waterfall: a table of 3,000 (a chatty logger) took
#: seconds of the UI thread at each selection.
EVENTS_SHOWN = 200


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _attr_text(key: str, value: Any) -> str:
    if key.endswith(".body") and isinstance(value, str):
        return f"({len(value) * 3 // 4:,} bytes)"
    if key.endswith("headers") and isinstance(value, list):
        return f"({len(value)} headers)"
    if key == "exception.stacktrace":
        return "(see Error)"
    return _short(value)


def describe_span(span: Span, t0: int, now: int) -> RenderableType:
    """A span's times, attributes and events, for the side panel."""
    kind = span_kind(span)
    name = formatting.clip(span.name or "(unnamed)")
    title = formatting.plain(name, style=f"bold {kind_colour(kind)}")
    title.append(f"  {kind}", style="dim")
    if span.attrs.get("error"):
        title.append("  error", style="bold #ff5f5f")
    facts = Table(show_header=False, box=None, padding=(0, 1))
    facts.add_column(style="dim", no_wrap=True)
    facts.add_column(overflow="fold")
    start = span.start
    facts.add_row("starts", "?" if start is None else f"+{formatting.duration(start - t0)}")
    if span.end is None:
        running = "running" if start is None else f"running for {formatting.duration(now - start)}"
        facts.add_row("took", running)
    else:
        facts.add_row("took", formatting.duration(span.duration_ns))
    facts.add_row("span", formatting.plain(span.span_id))
    facts.add_row("parent", formatting.plain(span.parent_id or "-"))
    attrs = Table(show_header=False, box=None, padding=(0, 1))
    attrs.add_column(style="bold cyan", no_wrap=True, max_width=28, overflow="ellipsis")
    attrs.add_column(overflow="fold", min_width=16)
    for key in sorted(span.attrs):
        # Text, not str: Rich would read "[/]" in a value as markup.
        attrs.add_row(formatting.plain(key), formatting.plain(_attr_text(key, span.attrs[key])))
    parts: list[RenderableType] = [title, facts, Text(), Text("Attributes", style="bold"), attrs]
    if span.events:
        events = Table(show_header=False, box=None, padding=(0, 1))
        events.add_column(style="dim", no_wrap=True, justify="right")
        events.add_column(style="bold", no_wrap=True)
        events.add_column(overflow="fold")
        for event in span.events[:EVENTS_SHOWN]:
            detail = ", ".join(f"{k}={_attr_text(k, v)}" for k, v in event.attrs.items())
            events.add_row(
                f"+{formatting.duration(event.ts - t0)}",
                formatting.plain(event.name),
                formatting.plain(detail),
            )
        parts += [Text(), Text(f"Events ({len(span.events)})", style="bold"), events]
        if len(span.events) > EVENTS_SHOWN:
            more = len(span.events) - EVENTS_SHOWN
            parts.append(Text(f"… {more:,} more (the Logs and Raw tabs have them)", style="dim"))
    return Group(*parts)


class _SpanRows(OptionList):
    """The spans' rows, which say when their width changed: the rows are drawn to fit
    it, and on a narrow screen the panel beside them goes under them, which widens the
    rows without resizing the timeline (its rows stayed drawn for the old width, each
    wrapped onto three lines, after a resize from under 70 columns to over)."""

    class Resized(Message):
        pass

    def on_resize(self) -> None:
        self.post_message(self.Resized())


class Timeline(Horizontal):
    """The waterfall of one trace's spans, and the highlighted span's details."""

    DEFAULT_CSS = """
    Timeline { height: 1fr; }
    Timeline > #timeline-main { width: 3fr; }
    Timeline #timeline-axis { height: 1; color: $text-muted; }
    Timeline #timeline-spans { height: 1fr; border: none; padding: 0; }
    Timeline > #timeline-attrs {
        width: 2fr; min-width: 30; padding: 0 1; border-left: solid $panel-lighten-2;
    }
    """

    LABEL_WIDTH = 30
    """The label column where the row has room (it shrinks in narrower rows)."""
    LABEL_MIN = 8
    BAR_MIN = 10
    """The bar keeps this much while the label can still give way."""
    DURATION_WIDTH = 8

    def __init__(self, clock: Clock, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._clock = clock
        self._trace: Trace | None = None
        self._rows: list[tuple[int, Span]] = []
        self._window = (0, 1)
        self._now = 0
        self._label_width = self.LABEL_WIDTH
        self._bar_width = 0
        self._described: int | None = None

    def compose(self) -> ComposeResult:
        self._axis_line = Static("", id="timeline-axis")
        self.spans_list: OptionList = _SpanRows(id="timeline-spans")
        self._span_panel = Static("", id="timeline-span")
        with Vertical(id="timeline-main"):
            yield self._axis_line
            yield self.spans_list
        with VerticalScroll(id="timeline-attrs"):
            yield self._span_panel

    @property
    def rows(self) -> list[tuple[int, Span]]:
        return self._rows

    def show(self, trace: Trace | None) -> None:
        """Draw ``trace`` (again): keeps the highlighted span when it is still there."""
        self._trace = trace
        self._now = self._clock()
        spans_list = self.spans_list
        previous = spans_list.highlighted
        previous_id = (
            self._rows[previous][1].span_id
            if previous is not None and previous < len(self._rows)
            else None
        )
        if trace is None:
            self._rows = []
            spans_list.clear_options()
            self._axis_line.update("")
            self._span_panel.update(Text("No request selected.", style="dim"))
            return
        self._rows = span_rows(trace)
        self._window = trace_window(trace, self._now)
        self._label_width, bar_width = self.fit(self._row_width())
        self._bar_width = bar_width
        t0, t1 = self._window
        ruler = Text(" " * self._label_width)
        ruler.append_text(axis(t0, t1, bar_width))
        self._axis_line.update(ruler, layout=False)
        spans_list.set_options(
            Option(self._prompt(depth, span, bar_width), id=span.span_id)
            for depth, span in self._rows
        )
        index = next(
            (i for i, (_, span) in enumerate(self._rows) if span.span_id == previous_id), 0
        )
        if self._rows:
            spans_list.highlighted = index
        self._describe(index)

    def _row_width(self) -> int:
        return self.spans_list.scrollable_content_region.width or self.size.width * 2 // 3

    @classmethod
    def fit(cls, width: int) -> tuple[int, int]:
        """``(label, bar)`` widths for rows ``width`` cells wide.

        A row is label, bar and duration, with one cell to spare: a row any wider would
        wrap in the option list and push the bar and duration onto a line of their own.
        Names are cut before the bar is, down to :attr:`BAR_MIN`; then both give way.
        """
        room = width - cls.DURATION_WIDTH - 1
        label = max(cls.LABEL_MIN, min(cls.LABEL_WIDTH, room - cls.BAR_MIN))
        return label, max(1, room - label)

    def _prompt(self, depth: int, span: Span, width: int) -> Text:
        kind = span_kind(span)
        name = formatting.printable(span.name or "(unnamed)")
        # Hops often share one name ("GET /items"): the hop tells the rows apart.
        if kind not in ("user", "queue", "background") and not name.startswith(kind):
            name = f"{kind} {name}"
        label_width = self._label_width
        # A narrowed label keeps the nesting at one cell a level, leaving room for names.
        indent = 2 if label_width >= self.LABEL_WIDTH else 1
        label = " " * (indent * depth) + name
        label_style = "bold #ff5f5f" if span.attrs.get("error") else kind_colour(kind)
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        # Cells, not characters: a wide (CJK) name cut by length overran the label
        # column and pushed the bar onto a line of its own.
        if cell_len(label) > label_width - 1:
            label = set_cell_size(label, label_width - 2) + "…"
        text.append(set_cell_size(label, label_width), style=label_style)
        t0, t1 = self._window
        stretches = []
        if span.start is not None:
            end = span.end if span.end is not None else max(self._now, span.start)
            stretches.append((kind, span.start, end))
        for segment in bar(
            # No background: the option list paints its own, highlighted row included.
            stretches,
            t0,
            t1,
            width,
            ticks=[_tick(e) for e in span.events],
        ):
            text.append(segment.text, segment.style)
        took = span.duration_ns
        if took is None and span.start is not None:
            took = self._now - span.start
        text.append(
            f" {formatting.duration(took):>{self.DURATION_WIDTH - 1}}",
            style="dim" if span.end is None else "",
        )
        return text

    def _describe(self, index: int | None) -> None:
        self._described = index
        panel = self._span_panel
        if index is None or index >= len(self._rows):
            panel.update("")
            return
        panel.update(describe_span(self._rows[index][1], self._window[0], self._now))

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option_index != self._described:  # show() described it already
            self._describe(event.option_index)

    def on_resize(self) -> None:
        self._refit()

    @on(_SpanRows.Resized)
    def _refit(self) -> None:
        fitted = (self._label_width, self._bar_width)
        if self._trace is not None and self.fit(self._row_width()) != fitted:
            self.show(self._trace)
