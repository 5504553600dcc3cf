"""The live request list: a Line API widget over the store's view.

Only the rows on screen are ever rendered (``render_line``), and rendered rows are kept
in an LRU cache keyed by everything that changes their look, so a batch that touches no
visible row costs nothing to draw.  The first line is a sticky column header with the
waterfall's time axis; the axis spans the rows on screen, so it is shared by every bar
in view and moves as the view scrolls, like a browser's network waterfall.

Follow mode keeps the newest row in view.  Any scroll the user makes away from the
bottom releases it (Toolong's "tail"); rows that arrive meanwhile are counted in
:attr:`RequestList.pending`, and scrolling back to the bottom (or ``f``/``end``)
re-engages it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hopscope.tracing.model import Trace, outer_first
from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from . import formatting
from .commands import bindings
from .messages import RequestSelected
from .store import Change, RequestStore, Row
from .waterfall import axis, bar, hop_stretches

__all__ = ["Columns", "RequestList"]

Clock = Callable[[], int]


#: Narrowest list (in cells) that still gets the waterfall.
WATERFALL_MIN = 70
#: Narrowest waterfall worth drawing.
WATERFALL_SMALLEST = 12
TIME_WIDTH, METHOD_WIDTH, STATUS_WIDTH, DURATION_WIDTH, SIZE_WIDTH = 12, 7, 3, 7, 5
#: Path cells kept before the waterfall shrinks and then size and time make way.
PATH_MIN = 16


@dataclass(frozen=True, slots=True)
class Columns:
    """Cell widths of a row; the path takes what the others leave.

    A width of 0 means the column is left out: on a narrow terminal the waterfall
    shrinks and then goes, then the size, then the time of day, so that method, path,
    status and duration stay readable down to about 40 cells.
    """

    time: int = TIME_WIDTH
    method: int = METHOD_WIDTH
    path: int = 20
    status: int = STATUS_WIDTH
    duration: int = DURATION_WIDTH
    size: int = SIZE_WIDTH
    waterfall: int = 0

    @classmethod
    def fit(cls, width: int) -> Columns:
        time, size = TIME_WIDTH, SIZE_WIDTH
        method, status, duration = METHOD_WIDTH, STATUS_WIDTH, DURATION_WIDTH
        waterfall = max(WATERFALL_SMALLEST, int(width * 0.32)) if width >= WATERFALL_MIN else 0

        def path_left() -> int:
            # Each column is followed by one blank cell; the bar has one before it.
            used = sum(w + 1 for w in (time, method, status, duration, size) if w)
            return width - used - 1 - (waterfall + 1 if waterfall else 0)

        if waterfall and path_left() < PATH_MIN:
            waterfall = max(waterfall - (PATH_MIN - path_left()), 0)
            if waterfall < WATERFALL_SMALLEST:
                waterfall = 0
        if path_left() < PATH_MIN:
            size = 0
        if path_left() < PATH_MIN:
            time = 0
        return cls(time=time, path=max(path_left(), 4), size=size, waterfall=waterfall)


def _fit(text: str, width: int) -> str:
    """``text`` padded or cut to ``width`` cells, an ellipsis marking a cut."""
    if cell_len(text) <= width:
        return set_cell_size(text, width)
    return set_cell_size(text, max(width - 1, 0)) + "…" if width else ""


def _row_attr(trace: Trace, key: str) -> object:
    """``exchange.attr`` from the trace's outline: a row drawn from a file's summary
    does not read the trace's events (the outline carries the attributes rows show)."""
    found = [span for span in trace.outline() if key in span.attrs]
    return min(found, key=outer_first).attrs[key] if found else None


def row_axis(rows: list[Row], now: int) -> tuple[int, int]:
    """The time span the given rows cover: earliest start to latest end (or now)."""
    t0: int | None = None
    t1 = 0
    for row in rows:
        trace = row.trace
        start = trace.start
        if start is None:
            continue
        end = trace.end
        if end is None:
            ends = [s.end for s in trace.outline() if s.end is not None]
            end = max([now, *ends])
        if t0 is None or start < t0:
            t0 = start
        if end > t1:
            t1 = end
    if t0 is None:
        return (now, now + 1)
    return (t0, max(t1, t0 + 1))


class RequestList(ScrollView, can_focus=True):
    """Requests in arrival order, newest at the bottom."""

    BINDINGS = bindings("list")

    COMPONENT_CLASSES = {
        "request-list--header",
        "request-list--cursor",
        "request-list--dim",
    }

    DEFAULT_CSS = """
    RequestList {
        overflow-x: hidden;
        overflow-y: scroll;
    }
    RequestList > .request-list--header { text-style: bold; }
    RequestList > .request-list--cursor { background: $accent 40%; }
    RequestList:focus > .request-list--cursor { background: $accent 70%; }
    RequestList > .request-list--dim { color: $text-muted; }
    """

    follow: reactive[bool] = reactive(True)
    """Keep the newest request in view."""
    pending: reactive[int] = reactive(0)
    """Rows that arrived since follow mode was released."""

    def __init__(self, store: RequestStore, clock: Clock, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self._clock = clock
        self._strips: LRUCache[tuple[object, ...], Strip] = LRUCache(1024)
        self._cursor_seq: int | None = None
        self._top_seq: int | None = None
        self._axis = (0, 1)
        self._now = 0
        self._inflight_visible = False
        self._auto_scroll = False
        self._styles = (Style(), Style(), Style(), Style())
        self.marked: set[str] = set()
        """Trace ids marked for replay: their time column starts with a mark."""

    # -- what the app calls --------------------------------------------------------

    @property
    def cursor_row(self) -> Row | None:
        if self._cursor_seq is None:
            return None
        index = self.store.index_of(self._cursor_seq)
        return self.store[index] if index is not None else None

    @property
    def page_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def apply(self, change: Change) -> None:
        """Take in what a batch did to the store: resize, keep place or follow, repaint."""
        if change.view_changed:
            self._sync_virtual_size()
            if self.follow:
                self._scroll_auto(self.max_scroll_y)
            else:
                self.pending += change.appended
                self._keep_top()
            self.refresh()
        elif change.touched and self._any_visible(change.touched):
            self.refresh()

    def tick(self) -> None:
        """Called by the app's timer: running requests' bars grow with the clock."""
        if self._inflight_visible:
            self.refresh()

    def reset(self, *, forget_cursor: bool = False) -> None:
        """After a clear or a new filter: rows moved wholesale."""
        if forget_cursor:
            self._cursor_seq = None
            self._top_seq = None
        self._strips.clear()
        self.pending = 0
        self._sync_virtual_size()
        if self.follow:
            self._scroll_auto(self.max_scroll_y)
        else:
            index = self._cursor_index()
            if index is None and self._top_seq is not None:
                index = self.store.nearest_index(self._top_seq)
            self._scroll_auto(max(0, (index or 0) - self.page_rows // 2))
        self.refresh()

    def select_index(self, index: int, *, center: bool = False) -> None:
        """Move the cursor to view row ``index``, scroll it into view, announce it."""
        if not len(self.store):
            return
        index = min(max(index, 0), len(self.store) - 1)
        row = self.store[index]
        self._cursor_seq = row.seq
        top = int(self.scroll_y)
        if center:
            self._scroll_user(max(0, index - self.page_rows // 2))
        elif index < top:
            self._scroll_user(index)
        elif index >= top + self.page_rows:
            self._scroll_user(index - self.page_rows + 1)
        self.refresh()
        self.post_message(RequestSelected(row.trace.trace_id))

    def find(
        self, predicate: Callable[[Trace], bool], direction: int, *, from_end: bool = False
    ) -> bool:
        """Select the next row (up for ``-1``, down for ``1``) matching, wrapping around.

        The search starts at the cursor, or past the newest row with ``from_end``.
        """
        count = len(self.store)
        if not count:
            return False
        start = None if from_end else self._cursor_index()
        if start is None:
            start = count if direction < 0 else -1
        for step in range(1, count + 1):
            index = (start + direction * step) % count
            if predicate(self.store[index].trace):
                self.select_index(index, center=True)
                return True
        return False

    # -- actions ---------------------------------------------------------------------

    def action_cursor(self, delta: int) -> None:
        index = self._cursor_index()
        if index is None:
            top = int(self.scroll_y)
            last_visible = min(len(self.store), top + self.page_rows) - 1
            index = last_visible if delta < 0 else top
        else:
            index += delta
        self.select_index(index)

    def action_page(self, direction: int) -> None:
        self._scroll_user(self.scroll_y + direction * self.page_rows)

    def action_first(self) -> None:
        self._scroll_user(0)

    def action_follow(self) -> None:
        self.follow = True

    # -- scrolling and follow mode ---------------------------------------------------

    def watch_follow(self, follow: bool) -> None:
        self.set_class(follow, "-following")
        if follow:
            self.pending = 0
            self._scroll_auto(self.max_scroll_y)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if not self._auto_scroll:
            # Only a user's scroll gets here: the bottom means "follow", anywhere else not.
            self.follow = new_value >= self.max_scroll_y

    def _scroll_auto(self, y: float) -> None:
        self._auto_scroll = True
        try:
            self.scroll_to(y=y, animate=False, force=True)
        finally:
            self._auto_scroll = False

    def _scroll_user(self, y: float) -> None:
        y = min(max(y, 0), self.max_scroll_y)
        if y == self.scroll_y:
            return
        self.scroll_to(y=y, animate=False)

    def _keep_top(self) -> None:
        """Rows came and went: scroll so the row that was on top stays on top."""
        if self._top_seq is None:
            return
        index = self.store.nearest_index(self._top_seq)
        if index is not None and index != int(self.scroll_y):
            self._scroll_auto(index)

    def _sync_virtual_size(self) -> None:
        size = Size(self.scrollable_content_region.width, len(self.store) + 1)
        if size == self.virtual_size:
            return
        if self.size.height and size.width == self.virtual_size.width:
            # Only the row count changed.  Setting ``virtual_size`` would lay out the
            # whole screen, at every tick; the scrollbar is always shown (overflow-y:
            # scroll), so nothing outside this widget moves: update it in place.
            self.set_reactive(RequestList.virtual_size, size)
            self._auto_scroll = True  # a clamp of scroll_y here is not the user's doing
            try:
                self._scroll_update(size)
            finally:
                self._auto_scroll = False
            self.refresh()
        else:
            self.virtual_size = size

    def on_resize(self, event: events.Resize) -> None:
        self._strips.clear()
        self._sync_virtual_size()
        if self.follow:
            self._scroll_auto(self.max_scroll_y)

    def on_mount(self) -> None:
        self._sync_virtual_size()

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:
            return
        index = int(self.scroll_y) + offset.y - 1
        if index < len(self.store):
            self.follow = False
            self.select_index(index)

    # -- rendering -------------------------------------------------------------------

    def _cursor_index(self) -> int | None:
        if self._cursor_seq is None:
            return None
        return self.store.index_of(self._cursor_seq)

    def _visible_rows(self) -> list[Row]:
        top = int(self.scroll_y)
        return self.store.view[top : top + self.page_rows]

    def _any_visible(self, trace_ids: set[str]) -> bool:
        return any(row.trace.trace_id in trace_ids for row in self._visible_rows())

    def render_lines(self, crop: Region) -> list[Strip]:
        # Styles are looked up once per repaint, not once per line.
        base = self.rich_style
        self._styles = (
            base,
            base + self.get_component_rich_style("request-list--cursor"),
            self._foreground("request-list--dim"),
            self._foreground("request-list--header"),
        )
        self._now = now = self._clock()
        rows = self._visible_rows()
        self._top_seq = rows[0].seq if rows else None
        self._inflight_visible = any(not row.trace.finished for row in rows)
        new_axis = row_axis(rows, now)
        if new_axis != self._axis:
            self._axis = new_axis
            if crop.height < self.size.height:
                self.refresh()  # a partial repaint would mix two axes
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base, cursor_style, _, _ = self._styles
        if y == 0:
            return self._header(width, base)
        index = int(self.scroll_y) + y - 1
        if index >= len(self.store):
            return Strip.blank(width, base)
        row = self.store[index]
        is_cursor = row.seq == self._cursor_seq
        running = not row.trace.finished
        marked = row.trace.trace_id in self.marked
        key = (
            row.seq,
            row.version,
            width,
            self._axis,
            is_cursor,
            self._now if running else 0,
            marked,
        )
        strip = self._strips.get(key)
        if strip is None:
            strip = self._row_strip(row.trace, width, cursor_style if is_cursor else base, marked)
            self._strips[key] = strip
        return strip

    def _foreground(self, component: str) -> Style:
        """A component's colour and text style without its background, which would
        paint over the cursor row's."""
        style = self.get_component_rich_style(component)
        return Style(color=style.color, bold=style.bold, dim=style.dim, italic=style.italic)

    def _header(self, width: int, base: Style) -> Strip:
        key = ("header", width, self._axis)
        strip = self._strips.get(key)
        if strip is not None:
            return strip
        columns = Columns.fit(width)
        _, _, dim_fg, header_fg = self._styles
        style = base + header_fg
        dim = base + dim_fg
        text = (
            (f"{'time':<{columns.time}} " if columns.time else "")
            + f"{'method':<{columns.method}} "
            + f"{set_cell_size('path', columns.path)} {'st':>{columns.status}} "
            + f"{'took':>{columns.duration}} "
            + (f"{'size':>{columns.size}} " if columns.size else "")
        )
        segments = [Segment(text, style)]
        if columns.waterfall:
            t0, t1 = self._axis
            segments.append(Segment(" " + axis(t0, t1, columns.waterfall).plain, dim))
        strip = Strip(segments).adjust_cell_length(width, base)
        self._strips[key] = strip
        return strip

    def _row_strip(self, trace: Trace, width: int, style: Style, marked: bool = False) -> Strip:
        columns = Columns.fit(width)
        dim = style + self._styles[2]
        # What the network sent, made safe for the terminal (one scan when it is).
        method = formatting.printable(trace.method or "?")
        if _row_attr(trace, "network.protocol.name") == "websocket":
            method = "WS"
        path = formatting.printable(trace.path or "")
        query = _row_attr(trace, "url.query")
        if query:
            query = formatting.printable(str(query))
        status = trace.status
        running = not trace.finished
        if status is not None:
            status_text = str(status)
        else:
            status_text = "…" if running else ("ERR" if trace.error else "-")
        took = trace.duration_ns
        if took is None and trace.start is not None:
            took = self._now - trace.start
        size_attr = _row_attr(trace, "http.response.body.size")
        body_size = size_attr if isinstance(size_attr, int) else None
        segments = []
        if columns.time:
            clock = formatting.clock(trace.start)
            segments.append(
                Segment("●" + clock[1:] + " ", style + Style(color="#ffd75f", bold=True))
                if marked
                else Segment(clock + " ", dim)
            )
        elif marked:  # no time column to carry the mark: the method does
            method = "●" + method
        segments.append(
            Segment(set_cell_size(method, columns.method) + " ", style + Style(bold=True))
        )
        if query and cell_len(path) < columns.path:
            rest = _fit(f"?{query}", columns.path - cell_len(path))
            segments += [Segment(path, style), Segment(rest + " ", dim)]
        else:
            segments.append(Segment(_fit(path, columns.path) + " ", style))
        segments += [
            Segment(
                f"{status_text:>{columns.status}} ",
                style + formatting.status_style(status, trace.error),
            ),
            Segment(f"{formatting.duration(took):>{columns.duration}} ", dim if running else style),
        ]
        if columns.size:
            segments.append(Segment(f"{formatting.size(body_size):>{columns.size}} ", dim))
        if columns.waterfall:
            t0, t1 = self._axis
            background = style.bgcolor.get_truecolor().hex if style.bgcolor else None
            segments.append(Segment(" ", style))
            segments.extend(
                bar(
                    hop_stretches(trace, self._now),
                    t0,
                    t1,
                    columns.waterfall,
                    background=background,
                )
            )
        return Strip(segments).adjust_cell_length(width, style)
