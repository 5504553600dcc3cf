"""What the UI looks like: SVG snapshots of its main views (pytest-textual-snapshot).

The events are a real recording of ``hopscope demo`` (``tests/data/demo-trace.jsonl``,
made stable by ``tests/data/make_demo_trace.py``), replayed as a live stream that is cut
in the middle of its last request (``make_demo_trace.cut``, which the README's screenshots
use too), so one request is still in flight.  Everything that would otherwise change
between runs is fixed: the UI's clock (``HopscopeApp(clock=...)``) is stopped at the
moment of the cut, so growing bars, running durations and the requests/s sparkline hold
still; times of day are shown in UTC; input cursors do not blink.

After a deliberate change to the UI, update and review the snapshots::

    pytest tests/test_tui_snapshots.py --snapshot-update
    git diff tests/__snapshots__/        # or open the SVGs in a browser

A failing run writes ``snapshot_report.html`` showing the old and new screens, and the
failure itself prints the rows that differ as text, so a CI log says what changed.  A
mismatch is tried once more on a fresh app before it fails: a screen that matches on the
second try passes with a warning carrying the first try's differences (a race in the
test's waiting, not a change of the UI), and one that differs twice fails.
"""

from __future__ import annotations

import difflib
import html
import os
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import textual._doc
from data.make_demo_trace import cut
from hopscope.tracing.tracefile import read_events
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import QueueSource
from textual.pilot import Pilot
from textual.widgets import Input
from uitools import wait_for

DATA = Path(__file__).parent / "data" / "demo-trace.jsonl"
SIZE = (120, 35)

Event = dict[str, Any]
Compare = Callable[..., bool]
Scenario = Callable[[HopscopeApp, Pilot[None]], Awaitable[None]]
Before = Callable[[Pilot[None]], Awaitable[None]]
TEXT = re.compile(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>')


def demo_stream() -> tuple[list[Event], int]:
    """The recording up to the cut, and the moment of the cut."""
    return cut(list(read_events(DATA)))


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """The list shows local times of day: make "local" the same everywhere."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def make_app() -> tuple[HopscopeApp, Callable[[Scenario], Before]]:
    """A UI fed the demo stream, and how to run a scenario on it once it is all in."""
    events, now = demo_stream()
    source = QueueSource("demo http://127.0.0.1:8000")
    source.push(events)
    app = HopscopeApp(source, title="hopscope demo", clock=lambda: now)

    def before(scenario: Scenario) -> Before:
        async def run_before(pilot: Pilot[None]) -> None:
            for field in app.query(Input):
                field.cursor_blink = False
            await wait_for(pilot, lambda: app.store.total == 12 and not app.inbox.pending, "rows")
            assert len(app.store.inflight) == 1
            await scenario(app, pilot)
            await pilot.pause(0.1)  # a tick or so, for the header and status line

        return run_before

    return app, before


def screen_rows(svg: str) -> list[str]:
    """The text of an SVG screenshot, row by row: enough to read a difference in a log."""
    rows: dict[float, list[tuple[float, str]]] = {}
    for match in TEXT.finditer(svg):
        x, y, text = float(match[1]), float(match[2]), html.unescape(match[3])
        rows.setdefault(y, []).append((x, text))
    return ["".join(text for _, text in sorted(row)) for _, row in sorted(rows.items())]


def normalized(svg: str) -> str:
    """As pytest-textual-snapshot compares: without the per-run id Rich puts in class names."""
    return re.sub(r"\bterminal-\d+-([\w-]+)", r"terminal-\1", svg)


@pytest.fixture
def shot(
    snap_compare: Compare, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Scenario], bool]:
    """Compare the screen after ``scenario`` with the stored SVG (see the module docstring)."""
    taken: list[str] = []
    take = textual._doc.take_svg_screenshot

    def taking(*args: Any, **kwargs: Any) -> str:
        taken.append(take(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(textual._doc, "take_svg_screenshot", taking)
    name = request.node.name
    stored = Path(__file__).parent / "__snapshots__" / Path(__file__).stem / f"{name}.svg"

    def compare(scenario: Scenario) -> bool:
        app, before = make_app()
        if snap_compare(app, terminal_size=SIZE, run_before=before(scenario)):
            return True
        if not stored.exists() or not taken:
            return False
        expected = stored.read_text(encoding="utf-8")
        diff = "\n".join(
            difflib.unified_diff(
                screen_rows(expected), screen_rows(taken[-1]), "stored", "this run", lineterm=""
            )
        )
        print(f"{name}: the screen differs from the stored one:\n{diff or '(colours only)'}")
        app, before = make_app()
        again = take(app, terminal_size=SIZE, run_before=before(scenario))
        if normalized(again) != normalized(expected):
            return False
        warnings.warn(f"{name} matched on a second try; the first:\n{diff}", stacklevel=1)
        return True

    return compare


async def enter(pilot: Pilot[None], key: str, field: Input, text: str) -> None:
    """``key`` focuses ``field``; ``text`` goes in whole (each key press waits for the
    app to go idle, slow with a request in flight), then enter."""
    await pilot.press(key)
    assert field.has_focus
    field.value = text
    await pilot.press("end", "enter")


async def select(app: HopscopeApp, pilot: Pilot[None], text: str, *keys: str) -> None:
    """Search for ``text`` (the newest match is selected; ``n`` goes to older ones)."""
    await enter(pilot, "s", app.query_bar.search_input, text)
    await pilot.press(*keys)
    await wait_for(pilot, lambda: app.detail.trace is app.selected_trace, "the detail pane")


def test_request_list(shot: Callable[[Scenario], bool]) -> None:
    """The list: a 404, a 500, and the newest request still running (selected)."""

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up")
        await wait_for(pilot, lambda: app.detail.trace is not None, "the selection")
        assert app.selected_trace is not None and not app.selected_trace.finished

    assert shot(scenario)


def test_timeline_of_a_request_through_every_hop(shot: Callable[[Scenario], bool]) -> None:
    """GET /api/slow: client, proxy, queue, server, app, and db.query/render user spans;
    the first db.query is highlighted."""

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await select(app, pilot, "/api/slow", "n")
        timeline = app.detail.timeline
        assert app.selected_trace is not None and app.selected_trace.finished
        kinds = [span.hop for _, span in timeline.rows]
        assert {"client", "proxy", "server", "app"} <= set(kinds)
        names = [span.name for _, span in timeline.rows]
        assert "queue" in names and "db.query" in names
        timeline.spans_list.focus()
        timeline.spans_list.highlighted = names.index("db.query")

    assert shot(scenario)


def test_error_tab_of_a_500(shot: Callable[[Scenario], bool]) -> None:
    """GET /api/boom: the app's exception and its traceback."""

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await select(app, pilot, "/api/boom", "5")
        assert app.selected_trace is not None and app.selected_trace.status == 500
        assert app.detail.tabs.active == "error"

    assert shot(scenario)


def test_filter_with_an_error_caret(shot: Callable[[Scenario], bool]) -> None:
    """A filter with a typo: the caret points at it; the filter in force stays, and so
    does the request selected in its list."""

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        field = app.query_bar.filter_input
        await enter(pilot, "slash", field, "duration>50ms")
        kept = len(app.store)
        assert 0 < kept < 12
        await pilot.press("up")
        await wait_for(pilot, lambda: app.detail.trace is not None, "the selection")
        await enter(pilot, "slash", field, "duration>50ms and stauts:200")
        assert app.query_bar.has_error and field.has_focus
        assert app.store.filter_text == "duration>50ms" and len(app.store) == kept

    assert shot(scenario)
