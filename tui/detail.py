"""The selected request, in tabs: Timeline, Request, Response, Logs, Error, Raw.

Only the active tab is drawn.  When the request changes (a new selection, or events for
a request still running) every tab is marked stale and only the one on screen is redrawn;
the others catch up when they are opened, so hidden tabs cost nothing at high rates.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from hopscope.tracing.model import Trace
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static, TabbedContent, TabPane

from . import formatting
from .body_view import TABLE_LIMIT, highlighted, render_message
from .store import trace_events
from .timeline import Timeline, trace_window

__all__ = ["TABS", "DetailPane", "render_errors", "render_logs", "render_raw"]

Clock = Callable[[], int]

TABS = ("timeline", "request", "response", "logs", "error", "raw")

#: Raw events shown before the rest is summarised: a big body repeats in them.
RAW_LIMIT = 400_000
#: An event's JSON longer than this has its long strings cut to :data:`RAW_STRING_LIMIT`.
RAW_EVENT_LIMIT = 100_000
RAW_STRING_LIMIT = 20_000

_LEVEL_STYLES = {
    "debug": "dim",
    "info": "#5fafff",
    "warning": "#ffd75f",
    "error": "bold #ff5f5f",
    "critical": "bold reverse #ff5f5f",
}


def log_records(trace: Trace) -> list[tuple[int, str, dict[str, object]]]:
    """``(ts, span name, attrs)`` of every ``log`` event, oldest first."""
    records = [
        (event.ts, span.name, event.attrs)
        for span in list(trace.spans.values())
        for event in span.events
        if event.name == "log"
    ]
    records.sort(key=lambda record: record[0])
    return records


def render_logs(trace: Trace) -> RenderableType:
    records = log_records(trace)
    if not records:
        return Text("No log records for this request.", style="dim")
    t0 = trace_window(trace, 0)[0]
    if len(records) > TABLE_LIMIT:
        return _log_lines(records, t0)
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("at", justify="right", no_wrap=True, style="dim")
    table.add_column("level", no_wrap=True)
    table.add_column("logger", no_wrap=True, style="cyan")
    table.add_column("message", overflow="fold")
    for ts, _span, attrs in records:
        level = str(attrs.get("level", ""))
        table.add_row(
            f"+{formatting.duration(ts - t0)}",
            formatting.plain(level, style=_LEVEL_STYLES.get(level.lower(), "")),
            formatting.plain(attrs.get("logger", "")),
            formatting.plain(attrs.get("message", ""), lines=True),
        )
    return table


def _log_lines(records: list[tuple[int, str, dict[str, object]]], t0: int) -> Text:
    """Many records as the table would align them, one line each: a table measures every
    cell, and 3,000 records froze the UI for 10 s."""
    rows = [
        (
            f"+{formatting.duration(ts - t0)}",
            formatting.printable(str(attrs.get("level", ""))),
            formatting.printable(str(attrs.get("logger", ""))),
            formatting.printable(str(attrs.get("message", "")), lines=True),
        )
        for ts, _span, attrs in records
    ]
    at, level, logger = (
        max(len(head), min(max(cell_len(row[n]) for row in rows), 24))
        for n, head in enumerate(("at", "level", "logger"))
    )
    text = Text(overflow="fold")
    text.append(f"{'at':>{at}} {'level':<{level}} {'logger':<{logger}} message\n", style="bold")
    for when, name, source, message in rows:
        text.append(f"{when:>{at}} ", style="dim")
        text.append(f"{formatting.pad(name, level)} ", style=_LEVEL_STYLES.get(name.lower(), ""))
        text.append(f"{formatting.pad(source, logger)} ", style="cyan")
        text.append(message)
        text.append("\n")
    text.rstrip()
    return text


def render_errors(trace: Trace) -> RenderableType:
    parts: list[RenderableType] = []
    for span in list(trace.spans.values()):
        exceptions = [event for event in span.events if event.name == "exception"]
        for event in exceptions:
            attrs = event.attrs
            head = formatting.plain(attrs.get("exception.type", "exception"), style="bold #ff5f5f")
            message = attrs.get("exception.message")
            if message:
                head.append(formatting.printable(f": {message}", lines=True), style="bold")
            where = formatting.plain(f"in {span.name or span.span_id}", style="dim")
            if attrs.get("phase"):
                where.append(formatting.printable(f" · {attrs['phase']}"))
            parts += [head, where]
            stack = attrs.get("exception.stacktrace")
            if isinstance(stack, str) and stack:
                parts.append(highlighted(formatting.printable(stack.rstrip(), lines=True), "pytb"))
            parts.append(Text())
        if not exceptions and span.attrs.get("error"):
            head = formatting.plain(span.attrs.get("exception.type", "error"), style="bold #ff5f5f")
            where_text = f"  in {span.name or span.span_id} (no traceback recorded)"
            head.append(formatting.printable(where_text), style="dim")
            parts += [head, Text()]
    if not parts:
        return Text("No errors.", style="dim")
    return Group(*parts)


def _cut(value: object) -> object:
    """``value`` with each string longer than :data:`RAW_STRING_LIMIT` cut, saying how
    much is left out."""
    if isinstance(value, str) and len(value) > RAW_STRING_LIMIT:
        return f"{value[:RAW_STRING_LIMIT]}… ({len(value) - RAW_STRING_LIMIT:,} more characters)"
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cut(item) for item in value]
    return value


def render_raw(trace: Trace) -> RenderableType:
    lines: list[str] = []
    total = 0
    events = trace_events(trace)
    for event in events:
        line = json.dumps(event, ensure_ascii=False, default=repr)
        if len(line) > RAW_EVENT_LIMIT:
            # A big captured body (a raised body_limit) took the whole budget: the tab
            # showed no event at all, only "… 2 more events".
            line = json.dumps(_cut(event), ensure_ascii=False, default=repr)
        total += len(line)
        if total > RAW_LIMIT:
            lines.append(f"// … {len(events) - len(lines)} more events")
            break
        lines.append(line)
    note = Text(
        "Events as assembled (a span's start and end attributes merged), as `save` writes them.",
        style="dim",
    )
    # JSON escapes C0 controls; C1 ones (and DEL) it leaves as they are.
    return Group(note, highlighted(formatting.printable("\n".join(lines), lines=True), "json"))


class DetailPane(Vertical):
    """Tabs about one request; draws lazily (see the module docstring)."""

    DEFAULT_CSS = """
    DetailPane { height: 1fr; }
    DetailPane TabbedContent { height: 1fr; }
    DetailPane TabPane { padding: 0 1; height: 1fr; }
    DetailPane VerticalScroll { height: 1fr; }
    """

    def __init__(self, clock: Clock, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._clock = clock
        self.trace: Trace | None = None
        self._stale: set[str] = set(TABS)
        self._labels: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        # Kept as attributes: timers reach them even while the app shuts down.
        self.tabs = TabbedContent(id="detail-tabs", initial="timeline")
        self.timeline = Timeline(self._clock, id="timeline-view")
        self._scrolls = {tab: VerticalScroll(id=f"{tab}-scroll") for tab in TABS[1:]}
        self._views = {tab: Static("", id=f"{tab}-view") for tab in TABS[1:]}
        with self.tabs:
            with TabPane("Timeline", id="timeline"):
                yield self.timeline
            for tab in TABS[1:]:
                with TabPane(tab.capitalize(), id=tab), self._scrolls[tab]:
                    yield self._views[tab]

    def show(self, trace: Trace | None) -> None:
        """A new selection: everything is stale, scroll positions start at the top."""
        self.trace = trace
        self._stale = set(TABS)
        for scroll in self._scrolls.values():
            scroll.scroll_home(animate=False)
        self._update_labels()
        self._draw(self.tabs.active)

    def changed(self) -> None:
        """The shown request received events."""
        self._stale = set(TABS)
        self._update_labels()
        self._draw(self.tabs.active)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        event.stop()
        pane_id = event.pane.id
        if pane_id is not None:
            self._draw(pane_id)

    def _update_labels(self) -> None:
        trace = self.trace
        logs = len(log_records(trace)) if trace is not None else 0
        errors = trace is not None and trace.error
        labels = {
            "logs": f"Logs ({logs})" if logs else "Logs",
            "error": "Error [#ff5f5f]●[/]" if errors else "Error",
        }
        for tab, label in labels.items():
            if self._labels.get(tab) != label:
                self._labels[tab] = label
                self.tabs.get_tab(tab).label = label

    def _draw(self, tab: str) -> None:
        if tab not in self._stale:
            return
        self._stale.discard(tab)
        trace = self.trace
        if tab == "timeline":
            self.timeline.show(trace)
            return
        view = self._views[tab]
        if trace is None:
            view.update(Text("Select a request in the list (↑/↓ or a click).", style="dim"))
            return
        content: RenderableType
        if tab == "request":
            content = render_message(trace, "request")
        elif tab == "response":
            content = render_message(trace, "response")
        elif tab == "logs":
            content = render_logs(trace)
        elif tab == "error":
            content = render_errors(trace)
        else:
            content = render_raw(trace)
        view.update(content)
