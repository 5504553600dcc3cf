"""The terminal UI: store, sources and widgets, driven headless with Textual's pilot.

Events are real wire events: either recorded by the ASGI middleware around a Starlette
app served by uvicorn, or made from records (the tuples the middlewares emit) through
``to_events``, which is how the outer hops (client, proxy, queue) reach the UI too.
The app ingests on a timer, so tests wait for conditions in bounded loops.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import FileSink, MemorySink, wrap
from hopscope.tracing.copyas import as_curl
from hopscope.tracing.exceptions import exception_event
from hopscope.tracing.model import TraceBuilder, assemble
from hopscope.tracing.records import Record, new_span_id, new_trace_id, to_events
from hopscope.tracing.tracefile import load
from hopscope.tui.app import HopscopeApp
from hopscope.tui.body_view import render_body
from hopscope.tui.commands import PALETTE, HopscopeCommands
from hopscope.tui.detail import render_errors, render_logs, render_raw
from hopscope.tui.exchange import Body
from hopscope.tui.help import HelpScreen
from hopscope.tui.save import SaveScreen
from hopscope.tui.source import FileSource, Inbox, QueueSource
from hopscope.tui.store import RequestStore, trace_events
from hopscope.tui.waterfall import bar, hop_stretches
from textual import events
from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import Static
from uitools import list_lines, static_text, text_of, wait_for

SIZE = (120, 35)
WAIT = 10.0
Event = dict[str, Any]

# -- making events ---------------------------------------------------------------------


def request_records(
    n: int,
    *,
    t: int | None = None,
    status: int | None = 200,
    path: str | None = None,
    method: str = "GET",
    hops: bool = False,
    error: bool = False,
    logs: int = 0,
    request_body: bytes = b"",
    response_body: bytes = b'{"ok": true}',
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> list[Record]:
    """One request as the middlewares record it; ``status=None`` leaves it running."""
    t = t if t is not None else time.time_ns()
    trace_id, app_id, user_id = new_trace_id(), new_span_id(), new_span_id()
    path = path or f"/items/{n}"
    records: list[Record] = []
    parent = 0
    if hops:
        client, proxy, queue, server = (new_span_id() for _ in range(4))
        records += [
            ("c", t, t + 9_000_000, trace_id, client, 0, "client", f"{method} {path}", 1, {}),
            ("c", t + 500_000, t + 8_500_000, trace_id, proxy, client, "proxy", "proxy", 1, {}),
            (
                "c",
                t + 1_000_000,
                t + 2_000_000,
                trace_id,
                queue,
                proxy,
                "server",
                "queue",
                1,
                {"span.kind": "queue"},
            ),
            ("c", t + 2_000_000, t + 8_000_000, trace_id, server, proxy, "server", "srv", 1, {}),
        ]
        parent = server
        t += 2_500_000
    headers = [(b"host", b"testserver"), (b"content-type", b"application/json"), *extra_headers]
    start_attrs = {
        "interface": "asgi",
        "http.request.method": method,
        "url.scheme": "http",
        "url.path": path,
        "url.query": f"n={n}",
        "http.request.headers": headers,
    }
    records.append(("s", t, trace_id, app_id, parent, "app", f"{method} {path}", 1, start_attrs))
    records.append(
        ("s", t + 200_000, trace_id, user_id, app_id, "app", "db", 1, {"span.kind": "user"})
    )
    for k in range(logs):
        log = {"level": "WARNING", "logger": "app.db", "message": f"slow query {n}.{k}"}
        records.append(("p", t + 300_000, trace_id, user_id, "log", log))
    records.append(("e", t + 1_000_000, trace_id, user_id, None))
    if error:
        try:
            raise RuntimeError(f"boom {n}")
        except RuntimeError as exc:
            records.append(exception_event(trace_id, app_id, exc, phase="before_response"))
    if status is not None:
        end = {
            "http.response.status_code": status,
            "http.response.headers": [(b"content-type", b"application/json")],
            "http.response.body": [response_body],
            "http.response.body.size": len(response_body),
            "http.request.body": [request_body],
            "http.request.body.size": len(request_body),
        }
        records.append(("e", t + 3_000_000, trace_id, app_id, end))
    return records


def request_events(n: int, **options: Any) -> list[Event]:
    info = {"process.pid": 4242}
    return [e for r in request_records(n, **options) for e in to_events(r, info)]


# -- driving the app ---------------------------------------------------------------------


def run(
    scenario: Callable[[HopscopeApp, Pilot[None], QueueSource], Awaitable[None]],
    **options: Any,
) -> None:
    """Run ``scenario`` against a headless app fed by a QueueSource."""
    source = QueueSource("live test")

    async def main() -> None:
        app = HopscopeApp(source, **options)
        async with app.run_test(size=SIZE) as pilot:
            await scenario(app, pilot, source)

    asyncio.run(main())


# -- the store, alone ------------------------------------------------------------------------


def test_store_rows_follow_arrival_and_the_ring_is_bounded() -> None:
    store = RequestStore(max_requests=50)
    for n in range(120):
        store.ingest(request_events(n))
    assert len(store) == 50
    assert store.total == 120
    assert [row.trace.path for row in store.view] == [f"/items/{n}" for n in range(70, 120)]
    assert store.counts["2xx"] == 120
    assert not store.inflight


def test_store_refilters_a_request_when_it_finishes() -> None:
    store = RequestStore()
    store.set_filter(lambda trace: trace.status == 500, "status:500")
    events = request_events(1, status=500)
    running = [
        e
        for e in events
        if not (e["kind"] == "span_end" and e["attrs"].get("http.response.status_code"))
    ]
    store.ingest(running)
    assert len(store) == 0
    assert len(store.inflight) == 1
    change = store.ingest([e for e in events if e not in running])
    assert change.view_changed and len(store) == 1
    assert not store.inflight
    store.set_filter(None)
    assert len(store) == 1


def test_store_counts_bad_events_and_keeps_going() -> None:
    store = RequestStore()
    change = store.ingest([{"kind": "span_start"}, {"kind": "nonsense"}, *request_events(1)])
    assert change.rejected == 2
    store.ingest(["not an event", *request_events(2)], change)  # type: ignore[list-item]
    assert change.rejected == 3 and store.rejected == 3
    assert len(store) == 2


def test_exported_events_assemble_into_the_same_trace() -> None:
    events = request_events(1, hops=True, error=True, logs=2)
    (original,) = assemble(events)
    (again,) = assemble(trace_events(original))
    assert again == original


# -- sources ---------------------------------------------------------------------------------


def test_inbox_hands_out_slices_in_order_and_drops_past_its_limit() -> None:
    inbox = Inbox(limit=10)
    inbox.deliver([{"n": i} for i in range(6)])
    inbox.deliver([{"n": i} for i in range(6, 9)])
    inbox.deliver([{"n": 99}] * 5)  # would pass the limit: refused whole
    assert inbox.dropped == 5
    taken = [e["n"] for e in inbox.take(4)] + [e["n"] for e in inbox.take(4)]
    assert taken == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [e["n"] for e in inbox.take(100)] == [8]
    assert inbox.take(100) == []


def test_a_replay_waits_for_the_ui_instead_of_dropping() -> None:
    inbox = Inbox(block=True, high_water=5, limit=8)
    done = threading.Event()

    def reader() -> None:
        for batch in range(6):
            inbox.deliver([{"n": batch * 5 + i} for i in range(5)])
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    got: list[int] = []
    deadline = time.monotonic() + WAIT
    while not (done.is_set() and inbox.pending == 0):
        assert time.monotonic() < deadline, "the reader never finished"
        assert inbox.pending <= 10  # high water plus the list being handed over
        got += [e["n"] for e in inbox.take(3)]
        time.sleep(0.005)
    thread.join(WAIT)
    assert got == list(range(30)) and inbox.dropped == 0


def test_queue_source_keeps_events_pushed_before_start() -> None:
    source = QueueSource()
    source.push(request_events(1))
    got: list[list[Event]] = []
    source.start(got.append)
    source.push(request_events(2))
    source.stop()
    source.push(request_events(3))
    assert len(got) == 2


# -- waterfall, bodies, curl -----------------------------------------------------------------


def test_hop_stretches_read_outside_in_and_back() -> None:
    (trace,) = assemble(request_events(1, hops=True))
    kinds = [kind for kind, _, _ in hop_stretches(trace, time.time_ns())]
    assert kinds == ["client", "proxy", "queue", "server", "app", "server", "proxy", "client"]


def test_bar_fills_exactly_its_width_at_eighth_resolution() -> None:
    segments = bar([("app", 0, 120)], 0, 800, 10, background="#000000")
    text = "".join(segment.text for segment in segments)
    assert len(text) == 10
    assert text[0] == "█" and text[1] == "▌" and text[2:] == " " * 8  # 1.5 cells
    tiny = "".join(s.text for s in bar([("app", 0, 1)], 0, 10**9, 10, background="#000000"))
    assert tiny[0] == "▏"  # too short to see, shown as one eighth anyway


def test_bodies_render_as_what_they_are() -> None:
    json_body = text_of(render_body(Body(b'{"a": [1, 2]}', 13, False, "text/plain", "")))
    assert '"a": [' in json_body and "\n    1," in json_body
    form = text_of(
        render_body(Body(b"name=ada&lang=py", 16, False, "application/x-www-form-urlencoded", ""))
    )
    assert "name" in form and "ada" in form and "lang" in form
    binary = text_of(render_body(Body(bytes(range(40)), 40, False, "application/octet-stream", "")))
    assert "00000000  00 01 02 03" in binary
    import gzip

    packed = gzip.compress(b"hello gzip")
    unpacked = text_of(render_body(Body(packed, len(packed), False, "text/plain", "gzip")))
    assert "hello gzip" in unpacked and "decoded from gzip" in unpacked


def test_logs_errors_and_raw_tabs_render_what_the_trace_holds() -> None:
    (trace,) = assemble(request_events(3, error=True, logs=2))
    logs = text_of(render_logs(trace))
    assert "WARNING" in logs and "app.db" in logs and "slow query 3.1" in logs
    errors = text_of(render_errors(trace))
    assert "builtins.RuntimeError: boom 3" in errors and "before_response" in errors
    assert 'raise RuntimeError(f"boom {n}")' in errors
    raw = text_of(render_raw(trace), width=2000)
    assert raw.count('"kind": "span_start"') == 2 and '"name": "exception"' in raw
    (quiet,) = assemble(request_events(4))
    assert "No log records" in text_of(render_logs(quiet))
    assert "No errors" in text_of(render_errors(quiet))


def test_copy_curl_is_what_export_prints_with_the_secrets_left_out() -> None:
    """The UI's ``y`` once had a curl of its own that put Authorization on the clipboard
    while ``hopscope export --curl`` left it out: both now give the same text."""
    events = request_events(
        7,
        method="POST",
        request_body=b'{"qty": 2}',
        extra_headers=((b"x-note", b"it's"), (b"authorization", b"Bearer s3cret")),
    )
    (trace,) = assemble(events)

    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(events)
        await wait_for(pilot, lambda: len(app.store) == 1, "the row")
        await pilot.press("up", "y")
        command = app.clipboard
        assert command == as_curl(trace)
        assert "curl -X POST" not in command  # a body makes it a POST: no -X needed
        assert "curl 'http://testserver/items/7?n=7'" in command
        assert "-H 'content-type: application/json'" in command
        assert "-H 'x-note: it'\"'\"'s'" in command
        assert "--data-binary '{\"qty\": 2}'" in command
        assert "s3cret" not in command
        assert "# header authorization is left out (secret)" in command
        (note,) = [n for n in app._notifications if n.title == "Copied as curl"]
        assert note.severity == "warning"  # something was left out: said so

    run(scenario)


def test_every_palette_entry_runs_an_app_action() -> None:
    for title, action, _ in PALETTE:
        name = action.split("(")[0]
        assert callable(getattr(HopscopeApp, f"action_{name}", None)), title
    titles = [title for title, _, _ in PALETTE]
    areas = ("app: ", "view: ", "export: ", "replay: ", "playback: ")
    assert all(t.startswith(areas) for t in titles)
    assert HopscopeCommands in HopscopeApp.COMMANDS


# -- the app -------------------------------------------------------------------------------


def test_pushed_events_appear_as_rows() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push([e for n in range(3) for e in request_events(n, status=200 + n)])
        await wait_for(pilot, lambda: len(app.store) == 3, "three rows")
        await pilot.pause(0.1)
        lines = list_lines(app)
        assert lines[0].startswith("time")
        assert "/items/0?n=0" in lines[1] and "200" in lines[1]
        assert "/items/2?n=2" in lines[3] and "202" in lines[3]
        assert "3 req" in static_text(app, "#header-stats")

    run(scenario)


def test_follow_mode_is_released_by_scrolling_and_counts_new_rows() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        request_list = app.request_list
        source.push([e for n in range(100) for e in request_events(n)])
        await wait_for(pilot, lambda: len(app.store) == 100, "100 rows")
        await pilot.pause(0.1)
        assert request_list.follow
        assert request_list.scroll_y == request_list.max_scroll_y > 0
        assert "/items/99?" in list_lines(app)[-1]

        # A mouse wheel step up releases follow; scrolling back to the bottom takes it again.
        wheel_up = events.MouseScrollUp(request_list, 10, 5, 0, -1, 0, False, False, False)
        request_list.post_message(wheel_up)
        await pilot.pause(0.05)
        assert not request_list.follow and request_list.scroll_y < request_list.max_scroll_y
        await pilot.press("end")
        assert request_list.follow

        await pilot.press("pageup")
        assert not request_list.follow
        source.push([e for n in range(100, 112) for e in request_events(n)])
        await wait_for(pilot, lambda: len(app.store) == 112, "12 more rows")
        await pilot.pause(0.1)
        assert request_list.pending == 12
        assert request_list.scroll_y < request_list.max_scroll_y
        assert "12 new" in text_of(app.list_status.content)  # type: ignore[arg-type]

        await pilot.press("f")
        assert request_list.follow and request_list.pending == 0
        await pilot.pause(0.1)
        assert request_list.scroll_y == request_list.max_scroll_y
        assert "/items/111?" in list_lines(app)[-1]

    run(scenario)


def test_selecting_a_row_shows_that_request(serve_asgi: Any) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create(request: Request) -> JSONResponse:
        payload = await request.json()
        return JSONResponse({"created": payload["name"]}, status_code=201)

    sink = MemorySink()
    web = wrap(Starlette(routes=[Route("/things", create, methods=["POST"])]), sink=sink)
    with serve_asgi(web) as base_url, httpx.Client(base_url=base_url) as client:
        for name in ("alpha", "beta", "gamma"):
            response = client.post("/things", json={"name": name}, headers={"x-name": name})
            assert response.status_code == 201
    deadline = time.monotonic() + WAIT
    while len(assemble(sink.events())) < 3 or not all(t.finished for t in assemble(sink.events())):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    events = sink.events()

    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(events)
        await wait_for(pilot, lambda: len(app.store) == 3, "three rows")
        await pilot.pause(0.1)
        # The second data row is "beta" (rows are in arrival order): click it.
        await pilot.click("#requests", offset=(30, 2))
        await wait_for(pilot, lambda: app.selected_trace is not None, "a selection")
        assert app.selected_trace is not None
        assert app.selected_trace.status == 201
        await pilot.press("2")
        await wait_for(pilot, lambda: "x-name" in static_text(app, "#request-view"), "headers")
        request = static_text(app, "#request-view")
        assert "POST http://127.0.0.1" in request and "/things" in request
        assert "beta" in request and '"name": "beta"' in request
        assert "alpha" not in request
        await pilot.press("3")
        await wait_for(pilot, lambda: "created" in static_text(app, "#response-view"), "body")
        response = static_text(app, "#response-view")
        assert "201" in response and '"created": "beta"' in response

    run(scenario)


def test_timeline_shows_hop_segments() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(request_events(1, hops=True, logs=1))
        await wait_for(pilot, lambda: len(app.store) == 1, "a row")
        await pilot.press("up")
        await wait_for(pilot, lambda: bool(app.detail.timeline.rows), "timeline rows")
        rows = app.detail.timeline.rows
        names = [(depth, span.name) for depth, span in rows]
        assert names == [
            (0, "GET /items/1"),
            (1, "proxy"),
            (2, "queue"),
            (2, "srv"),
            (3, "GET /items/1"),
            (4, "db"),
        ]
        options = app.detail.timeline.spans_list
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(len(rows))]
        assert prompts[0].startswith("client GET /items/1")
        assert "█" in prompts[0] and "█" in prompts[4]
        assert "•" in prompts[5]  # the log record's tick on the db span
        assert "Logs (1)" in str(app.detail.tabs.get_tab("logs").label)

        # Highlighting a span shows its attributes.
        options.highlighted = 2
        await wait_for(
            pilot, lambda: "span.kind" in static_text(app, "#timeline-span"), "span attributes"
        )
        described = static_text(app, "#timeline-span")
        assert "queue" in described and "1.0ms" in described

    run(scenario)


def test_filter_reduces_rows_and_a_bad_one_keeps_the_old_filter() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        statuses = [200, 404, 500, 200, 503, 201]
        source.push([e for n, s in enumerate(statuses) for e in request_events(n, status=s)])
        await wait_for(pilot, lambda: len(app.store) == 6, "six rows")
        await pilot.press("slash", *"status:5xx", "enter")
        assert len(app.store) == 2
        assert {row.trace.status for row in app.store.view} == {500, 503}
        assert not app.query_bar.has_error

        await pilot.press("slash")
        app.query_bar.filter_input.value = "status:>>5"
        await pilot.press("enter")
        assert app.query_bar.has_error
        error = text_of(app.query_bar.error_line.content).splitlines()  # type: ignore[arg-type]
        assert error[0].strip() == "status:>>5"
        caret = error[1].index("^")
        assert error[0][caret] == ">" and caret == error[0].index(">>") + 1
        assert "column 9" in error[2]  # 1-based, under the caret at index 8
        assert app.store.filter_text == "status:5xx" and len(app.store) == 2

        # New requests go through the filter that is still in force.
        source.push(request_events(10, status=502) + request_events(11, status=200))
        await wait_for(pilot, lambda: app.store.total == 8, "two more")
        assert len(app.store) == 3

    run(scenario)


def test_help_screen_opens_and_closes() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        help_text = text_of(app.screen.query_one("#help-content", Static).content)  # type: ignore[arg-type]
        assert "Filter" in help_text and "Copy curl" in help_text and "status:5xx" in help_text
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")

    run(scenario)


def test_save_writes_a_loadable_private_file(tmp_path: Path) -> None:
    target = tmp_path / "saved.jsonl"
    target.write_text("old")
    target.chmod(0o644)

    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push([e for n in range(5) for e in request_events(n, status=200 + n, error=n == 4)])
        await wait_for(pilot, lambda: len(app.store) == 5, "five rows")
        await pilot.press("ctrl+s")
        await app.workers.wait_for_complete()

    run(scenario, save_path=str(target))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    traces = load(target, strict=True)
    assert sorted(t.status or 0 for t in traces) == [200, 201, 202, 203, 204]
    assert sum(t.error for t in traces) == 1


def test_save_prompts_for_a_path_without_dash_o(tmp_path: Path) -> None:
    target = tmp_path / "chosen.jsonl"

    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(request_events(1))
        await wait_for(pilot, lambda: len(app.store) == 1, "a row")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SaveScreen), "the prompt")
        app.screen.query_one("#save-path").value = str(target)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_for(pilot, lambda: target.exists(), "the file")
        await app.workers.wait_for_complete()

    run(scenario)
    assert len(load(target, strict=True)) == 1


def test_ring_buffer_stays_at_max_requests() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push([e for n in range(130) for e in request_events(n)])
        await wait_for(pilot, lambda: app.store.total == 130, "all requests")
        assert len(app.store) == 40 and len(app.store.builder.traces) == 40
        await pilot.pause(0.1)
        assert "/items/129?" in list_lines(app)[-1]
        assert "newest 40 kept" in text_of(app.list_status.content)  # type: ignore[arg-type]

    run(scenario, max_requests=40)


def test_search_selects_matching_requests() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        paths = ["/a/cat", "/b/dog", "/c/cat", "/d/eel"]
        source.push([e for n, p in enumerate(paths) for e in request_events(n, path=p)])
        await wait_for(pilot, lambda: len(app.store) == 4, "four rows")
        await pilot.press("s", *"cat", "enter")
        assert app.selected_trace is not None and app.selected_trace.path == "/c/cat"
        await pilot.press("n")
        assert app.selected_trace.path == "/a/cat"
        await pilot.press("N")
        assert app.selected_trace.path == "/c/cat"

    run(scenario)


def test_copy_curl_of_the_selected_request_by_key_and_from_the_palette() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(request_events(5, method="DELETE") + request_events(6, method="PUT"))
        await wait_for(pilot, lambda: len(app.store) == 2, "two rows")
        await pilot.press("up", "up", "y")
        assert app.clipboard.startswith("curl -X DELETE 'http://testserver/items/5?n=5'")

        await pilot.press("down", "ctrl+p")
        await wait_for(pilot, lambda: CommandPalette.is_open(app), "the palette")
        await pilot.press(*"export: copy request as curl", "enter")
        await wait_for(pilot, lambda: "PUT" in app.clipboard, "the palette's copy")
        assert app.clipboard.startswith("curl -X PUT 'http://testserver/items/6?n=6'")

    run(scenario)


def test_copy_as_httpie_and_httpx_from_the_palette_actions() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(request_events(7, method="PATCH"))
        await wait_for(pilot, lambda: len(app.store) == 1, "a row")
        await pilot.press("up")
        await app.run_action("copy_as('httpie')")
        assert app.clipboard.startswith("http --ignore-stdin PATCH 'http://testserver/items/7")
        await app.run_action("copy_as('httpx')")
        assert "import httpx" in app.clipboard
        assert "client.request('PATCH', 'http://testserver/items/7" in app.clipboard

    run(scenario)


def test_file_source_replays_a_file_made_by_file_sink(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    sink = FileSink(path)
    for n in range(25):
        for record in request_records(n, status=200 if n % 5 else 500):
            sink.emit(record)
    sink.close()
    source = FileSource(path, batch_size=7)
    assert source.describe() == "trace.jsonl"

    async def main() -> None:
        app = HopscopeApp(source)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: len(app.store) == 25, "25 rows")
            assert app.store.counts == {"2xx": 20, "5xx": 5}
            assert "trace.jsonl" in static_text(app, "#header-source")

    asyncio.run(main())


def test_file_source_refuses_a_file_that_is_not_a_trace(tmp_path: Path) -> None:
    from hopscope.tracing import TraceFileError

    path = tmp_path / "nope.jsonl"
    path.write_text(json.dumps({"hello": 1}) + "\n")
    with pytest.raises(TraceFileError, match="not a hopscope trace file"):
        FileSource(path)


def test_builder_bound_matches_the_store() -> None:
    # The store relies on TraceBuilder evicting oldest-first; keep that assumption checked.
    builder = TraceBuilder(max_traces=2)
    for n in range(3):
        builder.extend(request_events(n))
    assert [t.path for t in builder.traces.values()] == ["/items/1", "/items/2"]


def test_pause_holds_events_back_and_clear_forgets_everything() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        source.push(request_events(1))
        await wait_for(pilot, lambda: len(app.store) == 1, "a row")
        await pilot.press("space")
        assert app.paused
        source.push(request_events(2))
        ticks = app.ticks
        await wait_for(pilot, lambda: app.ticks >= ticks + 3, "three ticks")
        assert len(app.store) == 1 and app.inbox.pending > 0
        assert "paused" in static_text(app, "#header-source")
        await pilot.press("space")
        await wait_for(pilot, lambda: len(app.store) == 2, "the held request")

        await pilot.press("up", "c")
        assert len(app.store) == 0 and app.store.total == 0
        assert app.selected_trace is None
        source.push(request_events(3))
        await wait_for(pilot, lambda: len(app.store) == 1, "a new row")
        assert app.request_list.cursor_row is None

    run(scenario)


def test_running_request_bar_grows_until_it_ends() -> None:
    async def scenario(app: HopscopeApp, pilot: Pilot[None], source: QueueSource) -> None:
        start = time.time_ns()
        source.push(request_events(1, t=start - 50_000_000, status=200))
        events = request_events(2, t=start, status=None)
        source.push(events)
        await wait_for(pilot, lambda: len(app.store) == 2, "two rows")
        assert len(app.store.inflight) == 1

        def running_bar() -> int:
            return list_lines(app)[2].count("█")

        await pilot.pause(0.1)
        first = running_bar()
        await wait_for(pilot, lambda: running_bar() > first, "the bar to grow")
        assert "…" in list_lines(app)[2]  # no status yet

    run(scenario)
