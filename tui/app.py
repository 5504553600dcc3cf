"""hopscope's live terminal UI: the request list, the selected request, and the keys.

Events never reach the event loop one by one.  The source delivers lists into an
:class:`~hopscope.tui.source.Inbox` from its own thread; a timer on the UI thread takes
them out every :data:`TICK` seconds, folds them into the store for at most
:data:`INGEST_BUDGET` seconds (the rest waits for the next tick, so keys stay
responsive under any load), and then updates the widgets once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from hopscope.tracing import filters
from hopscope.tracing.model import Trace
from hopscope.tracing.replay import CapturedRequest, captured_request
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.containers import Vertical
from textual.notifications import SeverityLevel
from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Footer, Input, Static, Tabs

from . import formatting
from .commands import HopscopeCommands, bindings, keys_of
from .detail import DetailPane
from .header import HeaderBar
from .help import HelpScreen
from .keymap import dialog_bindings, dialog_keymap, in_order, load_keymap, remap
from .messages import FollowRequested, RequestSelected
from .prompt import copy_text
from .query_bar import QueryBar
from .replay_view import ComparisonScreen, EditScreen, TargetScreen
from .request_list import RequestList
from .resend import (
    Outgoing,
    Resent,
    TargetError,
    check_target,
    original_target,
    outgoing,
    send,
)
from .save import SaveScreen, default_name, write_trace_file
from .source import EventSource, FileSource, Inbox, PlaybackSource
from .store import Change, RequestStore, Row

__all__ = ["HopscopeApp"]

#: Seconds between two ingest ticks: the UI's update rate under load.
TICK = 0.075
#: Seconds of folding per tick at most; what is left waits for the next tick.
INGEST_BUDGET = 0.04
#: The same for a replay (a file loading): its requests arrive as ready traces, cheap to
#: file, and nothing happens live meanwhile.  Keys still wait for one slice at most (see
#: ``_tick``).  Opening a big file is bound by the source's thread, not by this.
LOADING_INGEST_BUDGET = 0.065
#: Events folded between two looks at the message queue (a few milliseconds' worth).
INGEST_SLICE = 500
#: Seconds the selection must stay put before the detail pane is drawn.
SELECT_SETTLE = 0.05
#: Seconds between redraws of the selected request while it is still running.
RUNNING_DETAIL_INTERVAL = 0.5


class ListStatus(Static):
    """The line under the list: follow state, counts, filter, and the "N new" marker."""

    def on_click(self) -> None:
        self.post_message(FollowRequested())


def _requests(count: int) -> str:
    """``1 request``, ``2,000 requests``."""
    return f"{count:,} request" + ("" if count == 1 else "s")


def _search_text(trace: Trace) -> str:
    query = trace.attr("url.query")
    return " ".join(
        str(part)
        for part in (
            trace.method,
            (trace.path or "") + (f"?{query}" if query else ""),
            trace.status,
            trace.route,
        )
        if part is not None
    ).lower()


class HopscopeApp(App[None]):
    """The live view of requests arriving from an :class:`EventSource`."""

    CSS_PATH = "hopscope.tcss"
    TITLE = "hopscope"
    COMMANDS = App.COMMANDS | {HopscopeCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (70, "-wide")]
    """``Screen.-narrow`` rules in hopscope.tcss fit the screen under 70 columns."""
    VERTICAL_BREAKPOINTS = [(0, "-short"), (20, "-tall")]
    """``Screen.-short`` rules keep the detail pane on screen under 20 rows."""

    BINDINGS = bindings("app")
    """Made from :data:`~hopscope.tui.commands.COMMANDS`, like the palette's entries."""

    paused: reactive[bool] = reactive(False)
    """Stop taking events out of the inbox (they wait there, see :class:`Inbox`)."""

    def __init__(
        self,
        source: EventSource,
        *,
        title: str = "hopscope",
        max_requests: int = 50_000,
        save_path: str | None = None,
        recording: str | None = None,
        keymap: Mapping[str, str] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """``keymap`` maps binding ids to keys; by default it comes from the user's
        config file (:func:`~hopscope.tui.keymap.load_keymap`, which raises
        :class:`~hopscope.tui.keymap.ConfigError` for a bad one).

        ``clock`` (epoch ns) is what "now" is for a live source: snapshots and
        screenshots stop it, so running requests are drawn as they were at one moment."""
        super().__init__()
        self._clock = clock
        self.keymap: dict[str, str] = dict(load_keymap() if keymap is None else keymap)
        """The user's keys by binding id, as given (the help screen and palette show them)."""
        # Applied here rather than by Textual, which would move remapped keys to the
        # end of the footer (see in_order); the request list gets them in compose.
        self._bindings = in_order(self._bindings, self.keymap)
        self.set_keymap(dialog_keymap(self.keymap))
        self._follow_keys = keys_of(self, "follow", "f")
        self.title = title
        self.source = source
        self.live = bool(getattr(source, "live", True))
        self.save_path = save_path
        self.recording = recording
        """A trace file the collector writes as events arrive (``-o``): saving everything
        again there would race with it, and it already holds more than the UI keeps."""
        self.store = RequestStore(max_requests)
        self.inbox = Inbox(block=not self.live)
        self._frozen_now = 0
        self._selected: str | None = None
        self._selected_trace: Trace | None = None
        self._detail_drawn = 0.0
        self._search = ""
        self._ui_ready = False
        self._show_timer: Timer | None = None
        self.playback = source if isinstance(source, PlaybackSource) else None
        self.marked: set[str] = set()
        """Requests ``m`` marked for replay."""
        self.last_target: str | None = None
        self.replayed: list[Resent] = []
        """Results of the latest replay (tests read them)."""
        self.ticks = 0
        """Ingest ticks run so far (tests and benches wait on it)."""

    # -- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # Kept as attributes: the timer must reach them whichever screen is on top.
        self.header = HeaderBar(self.source.describe(), id="header")
        self.query_bar = QueryBar(id="query")
        self.request_list = RequestList(self.store, self.now, id="requests")
        self.request_list._bindings = in_order(self.request_list._bindings, self.keymap)
        self.request_list.marked = self.marked
        self.list_status = ListStatus("", id="list-status")
        self.detail = DetailPane(self.now, id="detail")
        yield self.header
        yield self.query_bar
        with Vertical(id="main"):
            yield self.request_list
            yield self.list_status
            yield self.detail
        yield Footer()

    @property
    def selected_trace(self) -> Trace | None:
        """The request the detail pane shows (kept even after it left the buffer)."""
        return self._selected_trace

    def on_mount(self) -> None:
        self._ui_ready = True
        self.inbox.ui_thread = threading.get_ident()
        self.request_list.focus()
        self.detail.show(None)
        self.watch(self.request_list, "follow", self._update_status)
        self.watch(self.request_list, "pending", self._update_status)
        self.set_interval(TICK, self._tick)
        self.source.start(self.inbox.deliver)

    def on_unmount(self) -> None:
        self._ui_ready = False
        self.inbox.close()
        self.source.stop()

    def now(self) -> int:
        """The UI's clock: frozen while paused, the newest event's time for a replay."""
        if self.paused:
            return self._frozen_now
        if self.live:
            return self._clock()
        return self.store.latest_ts

    # -- ingest --------------------------------------------------------------------------

    async def _tick(self) -> None:
        self.ticks += 1
        change: Change | None = None
        budget = INGEST_BUDGET if self.live else LOADING_INGEST_BUDGET
        deadline = time.perf_counter() + budget
        while self._alive() and not self.paused:
            events = self.inbox.take(INGEST_SLICE)
            if not events:
                break
            change = self.store.ingest(events, change)
            if time.perf_counter() >= deadline:
                break
            # Between slices, let the app's message loop run: a key waits for one
            # slice at most, not for the whole tick.
            await asyncio.sleep(0)
        if not self._alive() or (self.paused and change is None):
            return
        with self.batch_update():
            if change is not None:
                self._apply(change)
            self.request_list.tick()
            selected = self._selected_trace
            if (
                selected is not None
                and not selected.finished
                and time.monotonic() - self._detail_drawn > RUNNING_DETAIL_INTERVAL
            ):
                self._redraw_detail()
            self._update_header()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Textual's notification, read as plain text by default: messages carry paths,
        URLs and commands from the traffic, where ``[/]`` broke the markup (a crash) and
        ``[@click=...]`` made a clickable action; their control characters are shown."""
        if not markup:
            message = formatting.printable(message, lines=True)
            title = formatting.printable(title)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def _alive(self) -> bool:
        # is_running: the timer can fire once more while the app shuts down.
        return self._ui_ready and self.is_running

    def _apply(self, change: Change) -> None:
        if change.reset:
            self._forget_selection()
            self.request_list.reset(forget_cursor=True)
        for event in change.notices:
            severity = event.get("severity", "information")
            if severity not in ("information", "warning", "error"):
                severity = "information"
            self.notify(str(event.get("message", "")), severity=severity, timeout=8)
        self.request_list.apply(change)
        if self._selected is not None and self._selected in change.touched:
            row = self.store.get(self._selected)
            if row is not None:
                self._selected_trace = row.trace
            if time.monotonic() - self._detail_drawn > TICK:
                self._redraw_detail()
        if change.view_changed:
            self._update_status()

    def _redraw_detail(self) -> None:
        self._detail_drawn = time.monotonic()
        self.detail.changed()

    def _update_header(self) -> None:
        store = self.store
        if self.playback is not None:
            self.header.show_source(f"{self.playback.describe()}  {self.playback.state()}")
        elif isinstance(self.source, FileSource):
            self.header.show_source(self._loading_label(self.source))
        now_s = self.now() // 1_000_000_000 if self.live else None
        self.header.update_stats(
            paused=self.paused,
            total=store.total,
            counts=store.counts,
            inflight=len(store.inflight),
            dropped=store.dropped + self.inbox.dropped,
            rejected=store.rejected,
            rate=store.rate_series(now_s),
        )

    def _loading_label(self, source: FileSource) -> str:
        """``trace.jsonl · loading 42%`` until every request is in, then the count."""
        name = source.describe()
        if source.done.is_set() and not self.inbox.pending:
            return f"{name} · {_requests(self.store.total)}"
        percent = int(source.progress() * 100)
        return f"{name} · loading {min(percent, 99)}%"

    def _update_status(self) -> None:
        request_list = self.request_list
        store = self.store
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        if self.paused:
            text.append(" ⏸ paused ", style="bold #ffd75f")
        elif request_list.follow:
            text.append(" ● following ", style="bold #5fd75f")
        else:
            text.append(" ○ scrolled ", style="bold")
        shown, held = len(store), len(store.rows)
        if store.filter is not None:
            text.append(f" {shown:,} of {_requests(held)}", style="")
            text.append(f"  filter: {formatting.printable(store.filter_text)}", style="#5fafff")
        else:
            text.append(f" {_requests(held)}", style="")
        if held >= store.max_requests:
            text.append(f" (newest {store.max_requests:,} kept)", style="dim")
        if request_list.pending:
            text.append(f"   ▼ {request_list.pending:,} new", style="bold reverse #ffd75f")
            text.append(f"  {self._follow_keys} to follow", style="dim")
        self.list_status.update(text, layout=False)

    def watch_paused(self, paused: bool) -> None:
        if paused:
            self._frozen_now = self._clock() if self.live else self.store.latest_ts
        if self._ui_ready:
            self._update_status()
            self._update_header()

    # -- selection ---------------------------------------------------------------------

    @on(RequestSelected)
    def _on_selected(self, message: RequestSelected) -> None:
        row = self.store.get(message.trace_id)
        self._selected = message.trace_id
        self._selected_trace = row.trace if row is not None else None
        # Holding an arrow key moves through many rows: draw the detail once it settles.
        if self._show_timer is not None:
            self._show_timer.stop()
        self._show_timer = self.set_timer(SELECT_SETTLE, self._show_selected)

    def _show_selected(self) -> None:
        self._show_timer = None
        if not self._alive():
            return
        self._detail_drawn = time.monotonic()
        self.detail.show(self._selected_trace)

    @on(FollowRequested)
    def _on_follow_requested(self) -> None:
        self.action_follow()

    def key_ctrl_c(self) -> None:
        """Ctrl+C that no binding took: a field of Textual's own (the command palette's)
        with nothing selected copies all of it, as ours do (see :func:`copy_text`)."""
        focused = self.focused
        if isinstance(focused, Input):
            copy_text(focused, focused.selected_text, focused.value)

    # -- filter and search -----------------------------------------------------------------

    @on(Input.Submitted, "#filter-input")
    def _on_filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.apply_filter(event.value):
            self.request_list.focus()

    @on(Input.Changed, "#filter-input")
    def _on_filter_changed(self, event: Input.Changed) -> None:
        # Once an error is on screen, follow the edits so the caret stays honest.
        if self.query_bar.has_error:
            try:
                filters.parse(event.value)
            except filters.FilterError as exc:
                self.query_bar.show_error(event.value, exc.position, str(exc))
            else:
                self.query_bar.clear_error()

    def apply_filter(self, expression: str) -> bool:
        """Filter the list; a bad expression is shown with a caret and changes nothing."""
        try:
            parsed = filters.parse(expression)
        except filters.FilterError as exc:
            self.query_bar.show_error(expression, exc.position, str(exc))
            return False
        self.query_bar.clear_error()
        text = expression.strip()
        self.store.set_filter(parsed.test if text else None, text)
        self.request_list.reset()
        self._update_status()
        return True

    @on(Input.Submitted, "#search-input")
    def _on_search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._search = event.value.strip().lower()
        if self._search:
            self._find(-1, from_end=True)
        self.request_list.focus()

    def _find(self, direction: int, *, from_end: bool = False) -> None:
        needle = self._search
        if not needle:
            keys = keys_of(self, "search", "s")
            self.notify(
                f"Nothing to search for: press {keys} and type some text.", severity="warning"
            )
            return
        found = self.request_list.find(
            lambda trace: needle in _search_text(trace), direction, from_end=from_end
        )
        if not found:
            self.notify(f"No request matches {needle!r}.", severity="warning")

    # -- actions -----------------------------------------------------------------------

    def action_help(self) -> None:
        sections: list[tuple[str, Any]] = [
            ("Everywhere", remap(self.BINDINGS, self.keymap)),
            ("Request list", remap(RequestList.BINDINGS, self.keymap)),
            ("Dialogs", remap(dialog_bindings(), self.keymap)),
        ]
        self.push_screen(HelpScreen(sections, filters.help_table()))

    def action_focus_filter(self) -> None:
        self.query_bar.filter_input.focus()

    def action_clear_filter(self) -> None:
        self.query_bar.filter_input.value = ""
        self.apply_filter("")

    def action_focus_search(self) -> None:
        self.query_bar.search_input.focus()

    def action_search_next(self, direction: int) -> None:
        self._find(direction)

    def action_toggle_pause(self) -> None:
        if self.playback is not None:
            # Playback itself pauses: stopping ingest would only pile events up.
            self.playback.pause(not self.playback.paused)
            self._update_header()
            return
        self.paused = not self.paused

    def action_step(self) -> None:
        if self.playback is None:
            self.notify("Stepping needs a playback: hopscope view FILE --play.")
            return
        self.playback.step()

    def action_seek(self, seconds: float) -> None:
        if self.playback is None:
            self.notify("Seeking needs a playback: hopscope view FILE --play.")
            return
        self.playback.seek(seconds)
        self._update_header()

    def action_follow(self) -> None:
        self.request_list.follow = True
        self.request_list.focus()

    def action_clear(self) -> None:
        self.store.clear()
        self.request_list.reset(forget_cursor=True)
        self._forget_selection()
        self._update_status()
        self._update_header()

    def _forget_selection(self) -> None:
        self.marked.clear()
        self._selected = None
        self._selected_trace = None
        if self._show_timer is not None:
            self._show_timer.stop()
            self._show_timer = None
        self.detail.show(None)

    def action_to_list(self) -> None:
        self.request_list.focus()

    def action_list_first(self) -> None:
        """The list's home key, for the palette (which runs app actions)."""
        self.request_list.focus()
        self.request_list.action_first()

    def action_focus_detail(self) -> None:
        # The TabbedContent itself takes no focus: its tab strip does.
        self.detail.tabs.query_one(Tabs).focus()

    def action_show_tab(self, tab: str) -> None:
        self.detail.tabs.active = tab

    def action_copy_curl(self) -> None:
        self.action_copy_as("curl")

    def action_copy_as(self, form: str) -> None:
        """Copy the selected request as a curl or HTTPie command or an httpx script: the
        same text ``hopscope export --curl/--httpie/--httpx`` prints, secrets left out
        and what could not be reproduced said in comments at the top."""
        trace = self._selected_trace
        if trace is None:
            self.notify("Select a request first.", severity="warning")
            return
        from hopscope.tracing.copyas import CopyError, as_curl, as_httpie, as_httpx

        forms = {
            "curl": (as_curl, "curl"),
            "httpie": (as_httpie, "HTTPie"),
            "httpx": (as_httpx, "httpx"),
        }
        chosen = forms.get(form)
        if chosen is None:
            self.notify(f"Unknown copy form {form!r}.", severity="error")
            return
        make, name = chosen
        try:
            text = make(trace)
        except CopyError as exc:  # a trace without an HTTP request (spans only)
            self.notify(f"Nothing to copy: {exc}.", severity="warning")
            return
        self.copy_to_clipboard(text)
        shown = text if len(text) <= 300 else text[:299] + "…"
        noted = text.startswith("#")  # something could not be reproduced: say so
        self.notify(
            shown, title=f"Copied as {name}", severity="warning" if noted else "information"
        )

    def action_save(self, filtered: bool = False) -> None:
        rows: list[Row] | None = list(self.store.view) if filtered else None
        if self.recording and not filtered:
            self.notify(f"Every request is saved to {self.recording} as it arrives (-o).")
            return
        if self.save_path:
            self.save(self.save_path, rows)
            return

        def chosen(path: str | None) -> None:
            if path:
                self.save(path, rows)

        self.push_screen(SaveScreen(default_name()), chosen)

    def save(self, path: str, rows: list[Row] | None = None) -> None:
        """Write the held requests (or ``rows``) to ``path`` in a background thread."""
        # The copy is made here, on the UI thread, so ingestion cannot change it mid-write.
        events = self.store.export_events(rows)
        requests = len(self.store.rows) if rows is None else len(rows)
        self._write(path, events, requests)

    @work(thread=True, exclusive=True, group="save", exit_on_error=False)
    def _write(self, path: str, events: list[dict[str, Any]], requests: int) -> None:
        try:
            count = write_trace_file(path, events)
        except OSError as exc:
            self.notify(f"Could not save {path}: {exc.strerror or exc}", severity="error")
            return
        self.notify(f"Saved {_requests(requests)} ({count:,} events) to {path}")

    # -- replay --------------------------------------------------------------------------

    def action_mark(self) -> None:
        trace = self._selected_trace
        if trace is None:
            self.notify("Select a request first.", severity="warning")
            return
        if trace.trace_id in self.marked:
            self.marked.discard(trace.trace_id)
        else:
            self.marked.add(trace.trace_id)
        self.request_list.refresh()
        replay, mark = keys_of(self, "replay", "r"), keys_of(self, "mark", "m")
        self.notify(f"{len(self.marked)} marked for replay ({replay} sends them, {mark} unmarks).")

    def _replay_jobs(self, only_selected: bool = False) -> list[tuple[Trace, CapturedRequest]]:
        if self.marked and not only_selected:
            rows = self.store.rows.values()
            traces = [row.trace for row in rows if row.trace.trace_id in self.marked]
        else:
            traces = [self._selected_trace] if self._selected_trace is not None else []
        if not traces:
            if self.marked and not only_selected:  # marked, then evicted by newer requests
                self.notify(
                    f"The {len(self.marked)} marked request(s) are no longer held "
                    "(newer ones took their place): mark others.",
                    severity="warning",
                )
            else:
                self.notify("Select a request first (m marks several).", severity="warning")
            return []
        jobs = []
        for trace in traces:
            captured = captured_request(trace)
            if captured is None or captured.websocket:
                self.notify(f"{trace.path or trace.trace_id}: not an HTTP request, skipped.")
                continue
            jobs.append((trace, captured))
        return jobs

    def action_replay(self) -> None:
        jobs = self._replay_jobs()
        if not jobs:
            return
        suggestion = self.last_target or original_target(jobs[0][0])

        def chosen(typed: str | None) -> None:
            if not typed:
                return
            try:
                target = check_target(typed)
            except TargetError as exc:
                self.notify(str(exc), severity="error")
                return
            self.last_target = target
            self._send([(captured, outgoing(captured, target)) for _, captured in jobs])

        self.push_screen(TargetScreen(suggestion, len(jobs)), chosen)

    def action_edit_replay(self) -> None:
        jobs = self._replay_jobs(only_selected=True)
        if not jobs:
            return
        trace, captured = jobs[0]
        request = outgoing(captured, self.last_target or original_target(trace))

        def edited(changed: Outgoing | None) -> None:
            if changed is not None:
                self._send([(captured, changed)])

        self.push_screen(EditScreen(request), edited)

    @work(thread=True, group="replay", exit_on_error=False)
    def _send(self, jobs: list[tuple[CapturedRequest, Outgoing]]) -> None:
        results = []
        edit_keys = keys_of(self, "edit-replay", "e")
        for captured, request in jobs:
            result = send(captured, request, edit_keys=edit_keys)
            if result.unreachable:
                self.call_from_thread(self.notify, result.error or "", severity="error")
                break
            results.append(result)
        if results:
            self.call_from_thread(self._show_results, results)

    def _show_results(self, results: list[Resent]) -> None:
        self.replayed = results
        self.push_screen(ComparisonScreen(results))
