"""The UI as a demanding user drives it: hostile traffic, tiny terminals, every key.

Traces are real: a small Starlette app wrapped by ``hopscope.tracing.wrap`` with a
MemorySink, driven by httpx, its events fed to the app through a QueueSource.  What a
test reads is what the terminal would get: the compositor's full-screen update.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets.sync.client
from hopscope.tracing import MemorySink, load, wrap
from hopscope.tracing.records import new_span_id, new_trace_id, to_events
from hopscope.tui.app import HopscopeApp
from hopscope.tui.keymap import ENV
from hopscope.tui.replay_view import ComparisonScreen, EditScreen, TargetScreen
from hopscope.tui.save import write_trace_file
from hopscope.tui.source import QueueSource
from rich.console import Group
from rich.syntax import Syntax
from rich.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from textual.pilot import Pilot
from textual.widgets import Input, TextArea
from uitools import text_of, traced, wait_for

Event = dict[str, Any]
SIZE = (120, 40)
chatty_log = logging.getLogger("hopscope.tests.chatty")
#: What must never reach the terminal from the traffic: C0 controls (ESC among them),
#: DEL and C1 controls.  The UI's own escape sequences are not in the strips' text.
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The apps read the user's config file: point them at none."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


# -- traffic -------------------------------------------------------------------------------


async def _hostile(request: Request) -> Response:
    kind = request.query_params.get("kind", "")
    if kind == "ansi":
        return PlainTextResponse(
            "red \x1b[31mRED\x1b[0m title \x1b]0;pwned\x07 clear\x1b[2J c1 \x9b31m end",
            headers={"x-evil": "\x1b[7mreverse", "x-markup": "[/] [bold]b[/bold]"},
        )
    if kind == "boom":
        chatty_log.warning("log \x1b[31mred\x1b[0m [/] \x9b1m")
        raise RuntimeError("boom \x1b]0;title\x07 \x1b[2J [/]")
    if kind == "markup":
        return PlainTextResponse("[/]closing [@click=app.quit]quit[/]")
    body = await request.body()
    return Response(body or b"ok", media_type=request.headers.get("content-type"))


def recorded(requests: Callable[[httpx.AsyncClient], Awaitable[None]]) -> list[Event]:
    """The wire events of ``requests`` made to :func:`_hostile`, traced for real."""
    return traced([Route("/{rest:path}", _hostile, methods=["GET", "POST"])], requests)


def screen_lines(app: HopscopeApp) -> list[str]:
    """Every line of the screen as the terminal would get it, without styles."""
    update = app.screen._compositor.render_full_update()
    return ["".join(segment.text for segment in strip) for strip in update.strips]


def run(
    events: list[Event],
    scenario: Callable[[HopscopeApp, Pilot[None]], Awaitable[None]],
    *,
    size: tuple[int, int] = SIZE,
    **options: Any,
) -> HopscopeApp:
    """``scenario`` on an app that was fed ``events`` (all of them in, before it runs)."""
    source = QueueSource("user test")
    app = HopscopeApp(source, keymap={}, **options)
    requests = len({event["trace_id"] for event in events})

    async def main() -> None:
        # With notifications on screen (run_test leaves them out by default).
        async with app.run_test(size=size, notifications=True) as pilot:
            source.push(events)
            await wait_for(pilot, lambda: app.store.total >= requests, "the requests")
            await scenario(app, pilot)

    asyncio.run(main())
    return app


async def visit_every_tab(
    app: HopscopeApp, pilot: Pilot[None], seen: list[str], tabs: str = "123456"
) -> None:
    """Select each request in turn and look at each tab, keeping what the screen said."""
    app.request_list.focus()
    await pilot.press("home")
    for _ in range(len(app.store)):
        await pilot.press("down")
        for tab in tabs:
            await pilot.press(tab)
            await pilot.pause()
            seen.extend(screen_lines(app))


# -- what the traffic says is text, never terminal codes or markup --------------------------


def test_control_characters_in_the_traffic_never_reach_the_terminal() -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        await client.get("/ansi", params={"kind": "ansi"})
        # Percent-decoded by the server: the app sees (and records) a raw ESC and BEL.
        await client.get("/%1b[31mred%1b]0;title%07/%1b[2Jpath?kind=boom&q=%1b[5m%C2%9B")
        await client.post(
            "/post",
            content=b"\xff\xfe bad utf8 \x1b[31m and \x1b]0;x\x07",
            headers={"content-type": "text/plain", "x-log": b"\x1b[1mbold\x9b1m"},
        )

    events = recorded(requests)
    seen: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await visit_every_tab(app, pilot, seen)
        await pilot.press("y")  # the curl command is shown in a notification
        await pilot.pause(0.2)
        seen.extend(screen_lines(app))

    run(events, scenario)
    leaked = [line for line in seen if CONTROLS.search(line)]
    assert not leaked, leaked[:3]
    screen = "\n".join(seen)
    assert "␛[31mred" in screen  # the path, in the list and the detail
    assert "␛[7mreverse" in screen  # a response header
    assert "bold\\x9b1m" in screen  # a C1 control, in a request header
    assert "log ␛[31mred␛[0m [/] \\x9b1m" in screen  # the Logs tab
    assert "boom ␛]0;title␇ ␛[2J [/]" in screen  # the Error tab


def test_markup_in_the_traffic_is_shown_as_text_and_never_crashes() -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        await client.get("/x[/]y[bold]", params={"kind": "markup"})
        await client.get("/ansi", params={"kind": "ansi"})

    events = recorded(requests)
    seen: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await visit_every_tab(app, pilot, seen, "1236")  # no logs, no errors there
        await pilot.press("up", "y")  # the first request
        await pilot.pause(0.2)
        seen.extend(screen_lines(app))
        assert app.is_running

    app = run(events, scenario)
    assert app.return_code is None and app._exception is None
    screen = "\n".join(seen)
    assert "/x[/]y[bold]" in screen  # the path, as sent
    assert "[/] [bold]b[/bold]" in screen  # a header value, not styled
    assert "[@click=app.quit]quit[/]" in screen  # the body, not a link to an action
    notes = [str(n.message) for n in app._notifications]
    assert any("curl" in note and "/x[/]y[bold]" in note for note in notes), notes


# -- small terminals -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 12), (80, 16), (20, 8)])
def test_the_detail_pane_stays_on_screen_in_a_short_terminal(size: tuple[int, int]) -> None:
    """Under 17 rows the list and the detail pane's minimum heights did not fit: the
    detail pane was laid out under the footer, and a selected request showed nowhere."""

    async def requests(client: httpx.AsyncClient) -> None:
        for n in range(6):
            await client.post(f"/short/{n}", content=b"hello")

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "2")  # the newest but one, its Request tab
        await pilot.pause(0.2)
        detail, footer = app.detail.region, app.screen.query_one("Footer").region
        assert detail.height >= 2 and detail.bottom <= footer.y, (detail, footer)
        assert app.request_list.region.height >= 2
        if size[1] >= 12:  # room for the tabs and the request's first line
            lines = screen_lines(app)
            assert any(line.lstrip().startswith("POST http") for line in lines), lines

    run(recorded(requests), scenario, size=size)


# -- websockets ------------------------------------------------------------------------------


async def _echo_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    for _ in range(3):
        text = await websocket.receive_text()
        await websocket.send_text(f"echo {text}")
    data = await websocket.receive_bytes()
    await websocket.send_bytes(data[::-1])
    await websocket.close(code=4001, reason="done here")


def test_the_response_tab_of_a_websocket_shows_its_messages(serve_asgi: Any) -> None:
    """The messages were recorded but the Response tab said "Body (empty)"."""
    sink = MemorySink()
    app = wrap(Starlette(routes=[WebSocketRoute("/ws/echo", _echo_socket)]), sink)
    with serve_asgi(app) as base:
        url = base.replace("http", "ws", 1) + "/ws/echo"
        with websockets.sync.client.connect(url, open_timeout=10) as socket:
            for n in range(3):
                socket.send(f"hello {n}")
                assert socket.recv(timeout=10) == f"echo hello {n}"
            socket.send(b"\x00\x01\xfe")
            assert socket.recv(timeout=10) == b"\xfe\x01\x00"
            with pytest.raises(websockets.ConnectionClosed):
                socket.recv(timeout=10)
        deadline = time.monotonic() + 10  # the server thread ends the span after the close
        while not (sink.traces() and sink.traces()[0].finished):
            assert time.monotonic() < deadline, "the websocket's trace never ended"
            time.sleep(0.02)
    shown: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "3")
        await pilot.pause(0.2)
        shown.extend(screen_lines(app))

    run(sink.events(), scenario)
    screen = "\n".join(shown)
    assert "WS      /ws/echo" in screen  # the row
    assert "Messages  4 in, 4 out" in screen
    for line in ("→ in    7B  hello 0", "← out  12B  echo hello 2", "→ in    3B  00 01 fe"):
        assert line in screen, screen
    assert "← out   3B  fe 01 00" in screen
    assert "closed 4001 done here" in screen
    assert "Body" not in screen


# -- big requests ----------------------------------------------------------------------------


def _flat(renderable: Any) -> list[Any]:
    """``renderable`` and everything a Group holds, depth first."""
    if isinstance(renderable, Group):
        return [item for part in renderable.renderables for item in _flat(part)]
    return [renderable]


def test_thousands_of_headers_and_a_big_body_are_shown_whole_without_a_table() -> None:
    """3,000 response headers were a Rich table (4 s of the UI thread per look at the
    Response tab), the Raw tab highlighted 400,000 characters (another 4 s), and a
    captured body longer than the 256 KiB shown simply stopped, without a word (a
    1 MB JSON body with a raised ``body_limit``)."""

    async def many_headers(request: Request) -> Response:
        response = PlainTextResponse("many")
        for n in range(3000):
            response.headers.append(f"x-h{n}", f"value {n}")
        return response

    async def big_json(request: Request) -> Response:
        rows = [{"i": n, "name": "x" * 30} for n in range(10_000)]
        return Response(json.dumps({"items": rows}), media_type="application/json")

    sink = MemorySink()
    app = wrap(
        Starlette(routes=[Route("/headers", many_headers), Route("/big", big_json)]),
        sink,
        body_limit=2_000_000,
    )

    async def requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/headers")
            assert len((await client.get("/big")).content) > 400_000

    asyncio.run(requests())
    seen: dict[str, Any] = {}

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "3")  # the newest request, /big: its response
        await pilot.pause(0.2)
        seen["big"] = app.detail._views["response"].content
        await pilot.press("up")  # /headers
        await pilot.pause(0.2)
        seen["headers"] = app.detail._views["response"].content
        await pilot.press("6")
        await pilot.pause(0.2)
        seen["raw"] = app.detail._views["raw"].content

    run(sink.events(), scenario)
    parts = _flat(seen["headers"])
    assert not [part for part in parts if isinstance(part, Table) and part.row_count > 200]
    said = text_of(seen["headers"], width=100)
    assert "Headers (3002)" in said  # with content-type and content-length
    for n in (0, 1500, 2999):
        assert re.search(rf"x-h{n}\s+value {n}\n", said), n
    assert not [part for part in _flat(seen["raw"]) if isinstance(part, Syntax)]
    big = text_of(seen["big"], width=100)
    assert re.search(r"Body  \d+K · application/json  · showing the first 256K of \d+K", big)


def test_a_wide_character_name_keeps_its_timeline_row_on_one_line() -> None:
    """The label was cut and padded by characters: CJK ones take two cells each, so the
    row overran its width and the bar and duration wrapped onto a line of their own."""

    async def requests(client: httpx.AsyncClient) -> None:
        await client.get("/日本語のパス/とても長い名前のリソース/さらに")

    rows: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "1")
        await pilot.pause(0.2)
        rows.extend(line for line in screen_lines(app) if "app GET /日本語" in line)

    run(recorded(requests), scenario, size=(100, 30))
    (row,) = rows
    assert re.search(r"app GET /日本語\S*… [█▏▎▍▌▋▊▉▸│·]+ +\d+(\.\d+)?(µs|ms) │", row), row


# -- filters ---------------------------------------------------------------------------------


def test_the_filter_error_caret_points_past_wide_characters() -> None:
    """The caret was indented by characters: after CJK text it pointed to the middle of
    the expression instead of where the mistake is."""

    async def requests(client: httpx.AsyncClient) -> None:
        await client.get("/日本語")

    said: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("slash")
        app.query_bar.filter_input.value = "path:/日本語 and"
        await pilot.press("end", "enter")
        await pilot.pause(0.2)
        said.extend(text_of(app.query_bar.error_line.content).splitlines())
        assert len(app.store) == 1  # the old filter (none) stays

    run(recorded(requests), scenario)
    expression, caret, message = said[:3]
    assert expression.strip() == "path:/日本語 and"
    assert "after 'and'" in message
    # The mistake is at the end: the caret sits one cell past the expression's last one.
    assert caret.index("^") == len(expression.rstrip()) + 3, said  # 日本語: three cells more


# -- replay from the UI ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\xff\xfe binary\r\n--boundary\r\nline\r\n",
        b"text\nwith mixed\r\nline ends\r\n",
        b"\x1b[31mred\x1b[0m \x1b]0;title\x07 text",
    ],
    ids=["binary", "mixed-line-ends", "terminal-codes"],
)
def test_edit_and_send_keeps_a_body_it_did_not_touch(serve_asgi: Any, body: bytes) -> None:
    """The editor shows the body as UTF-8 text: a binary body came back from it with
    U+FFFD in place of its bytes, mixed line ends as one kind, and that was sent though
    only a header was edited; terminal codes in it reached the terminal raw."""
    received: list[tuple[bytes, str | None]] = []

    async def upload(request: Request) -> Response:
        received.append((await request.body(), request.headers.get("x-token")))
        return PlainTextResponse("stored")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/upload", upload, methods=["POST"])]), sink)
    with serve_asgi(app) as base:
        httpx.post(f"{base}/upload", content=body, headers={"x-token": "old"}, timeout=10)
        deadline = time.monotonic() + 10
        while not (sink.traces() and sink.traces()[0].finished):
            assert time.monotonic() < deadline, "the upload's trace never ended"
            time.sleep(0.02)

        async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
            await pilot.press("up", "e")
            screen = await wait_for(
                pilot, lambda: isinstance(app.screen, EditScreen) and app.screen, "the editor"
            )
            await pilot.pause(0.2)
            leaked = [line for line in screen_lines(app) if CONTROLS.search(line)]
            assert not leaked, leaked
            headers = screen.query_one("#edit-headers", TextArea)
            headers.text = headers.text.replace("x-token: old", "x-token: new")
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ComparisonScreen), "the answer")

        run(sink.events(), scenario)
    assert received == [(body, "old"), (body, "new")]


def test_one_request_is_one_request_in_the_status_line_and_the_save_message(
    tmp_path: Path,
) -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        await client.get("/only")

    path = tmp_path / "one.jsonl"
    said: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app._notifications, "the save's message")
        said.append(text_of(app.list_status.content))
        said.extend(str(note.message) for note in app._notifications)

    run(recorded(requests), scenario, save_path=str(path))
    status, saved = said
    assert status.split() == ["●", "following", "1", "request"], status
    assert saved.startswith("Saved 1 request (") and str(path) in saved, saved
    assert len(load(path)) == 1


def test_a_request_that_logs_a_thousand_lines_is_drawn_without_tables() -> None:
    """The Logs tab laid 3,000 records out as a Rich table (10 s of the UI thread), and
    the Timeline's side panel listed every event of the span in another."""

    async def chatty(request: Request) -> Response:
        for n in range(1000):
            chatty_log.warning("step %d of [/]1000", n)
        return PlainTextResponse("done")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/chatty", chatty)]), sink)

    async def requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/chatty")

    asyncio.run(requests())
    seen: dict[str, Any] = {}

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up")  # the Timeline tab: the app span, with its events
        await pilot.pause(0.2)
        seen["span"] = app.detail.timeline._span_panel.content
        await pilot.press("4")
        await pilot.pause(0.2)
        seen["logs"] = app.detail._views["logs"].content
        seen["label"] = str(app.detail.tabs.get_tab("logs").label)

    run(sink.events(), scenario)
    assert seen["label"] == "Logs (1000)"
    assert not [part for part in _flat(seen["logs"]) if isinstance(part, Table)]
    logs = text_of(seen["logs"], width=100).splitlines()
    assert logs[0].split() == ["at", "level", "logger", "message"]
    assert re.fullmatch(r" *\+\S+ WARNING hopscope\.tests\.chatty step 0 of \[/\]1000 *", logs[1])
    assert "step 999 of [/]1000" in logs[-1]
    span = text_of(seen["span"], width=100)
    events = int(re.search(r"Events \((\d+)\)", span)[1])  # type: ignore[index]
    assert events > 1000 and f"… {events - 200} more" in span, span[-300:]


def test_the_replay_prompt_takes_host_port_and_refuses_what_is_no_target(
    serve_asgi: Any,
) -> None:
    """``localhost:8000`` (no scheme) went to httpx as it was and came back as a
    "comparison" saying "missing an 'http://' protocol"; any other typo too."""
    hits: list[str] = []

    async def again(request: Request) -> Response:
        hits.append(request.url.path)
        return PlainTextResponse("again")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/again", again)]), sink)
    with serve_asgi(app) as base:
        httpx.get(f"{base}/again", timeout=10)
        host_port = base.removeprefix("http://")

        async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
            await pilot.press("up")
            for typed in ("ftp://example.com", "127.0.0.1:99999", "not a target", host_port):
                await pilot.press("r")
                screen = await wait_for(
                    pilot, lambda: isinstance(app.screen, TargetScreen) and app.screen, "prompt"
                )
                screen.query_one("#target-input", Input).value = typed
                await pilot.press("enter")
                await pilot.pause(0.2)
                if typed != host_port:
                    assert not isinstance(app.screen, ComparisonScreen)
                    said = str(list(app._notifications)[-1].message)
                    assert said.startswith(f"not a target: {typed!r}"), said
                    assert said.endswith("give http://HOST:PORT"), said
            await wait_for(pilot, lambda: isinstance(app.screen, ComparisonScreen), "the answer")
            assert "same" in app.screen.text()  # type: ignore[attr-defined]
            assert app.last_target == base

        run(sink.events(), scenario)
    assert hits == ["/again", "/again"]


# -- traces that are not what the UI expects -------------------------------------------------


def test_a_trace_file_with_broken_header_pairs_and_a_spans_only_trace_do_not_crash(
    tmp_path: Path,
) -> None:
    """A response header "pair" that was a number (a hand-edited or foreign file) made
    the Response tab raise; "copy as HTTPie / httpx" of a trace without an HTTP request
    (a background job's spans) raised CopyError out of the action: both ended the UI."""
    t = time.time_ns()
    job = ("c", t, t + 5_000_000, new_trace_id(), new_span_id(), 0, "app", "nightly job", 1, {})
    broken = {
        "http.request.method": "GET",
        "url.path": "/broken",
        "http.response.status_code": 200,
        "http.response.headers": [["x-good", "yes"], 5, None, ["only-a-name"], ["a", "b", "c"]],
    }
    ids = {"trace_id": f"{new_trace_id():032x}", "span_id": f"{new_span_id():016x}"}
    request = [  # written as a file would hold them: records could not carry such pairs
        {"kind": "span_start", "ts": t, **ids, "parent_id": None, "hop": "app"}
        | {"name": "GET /broken", "attrs": broken},
        {"kind": "span_end", "ts": t + 2_000_000, **ids, "attrs": {}},
    ]
    path = tmp_path / "odd.jsonl"
    events = [*to_events(job, {}), *request]
    write_trace_file(str(path), events)
    shown: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "3")  # GET /broken, its response
        await pilot.pause(0.2)
        shown.append(text_of(app.detail._views["response"].content))
        await pilot.press("up")  # the job
        await pilot.pause(0.2)
        for form in ("httpie", "httpx"):
            await app.run_action(f"copy_as('{form}')")
        await pilot.pause(0.2)
        shown.extend(str(note.message) for note in app._notifications)
        assert app.is_running

    run(load_events(path), scenario)
    assert "Headers (1)" in shown[0] and "x-good  yes" in shown[0]
    assert sum(note.startswith("Nothing to copy: ") for note in shown[1:]) == 2, shown


def load_events(path: Path) -> list[Event]:
    from hopscope.tracing.tracefile import read_events

    return list(read_events(str(path)))


def test_an_upload_the_app_did_not_read_says_so_in_the_request_body() -> None:
    """The middlewares record what the app read: an unread upload is 0 bytes there, and
    the Request tab must not call it empty (sent chunked, its size is unknown)."""
    from hopscope.tui.body_view import render_body
    from hopscope.tui.exchange import body

    async def unread(request: Request) -> Response:
        return PlainTextResponse("not reading that")

    async def chunks() -> Any:
        yield b"a" * 1000
        yield b"b" * 1000

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/{rest:path}", unread, methods=["POST"])]), sink)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.post("/sized", content=b"x" * 5000)
            await client.post("/chunked", content=chunks())
            await client.post("/empty", content=b"")

    asyncio.run(main())
    shown = {t.path: text_of(render_body(body(t, "request"))) for t in sink.traces()}
    assert "not read by the app: 5,000 bytes sent" in shown["/sized"]
    assert "not read by the app: sent chunked, size unknown" in shown["/chunked"]
    assert "(empty)" in shown["/empty"] and "not read" not in shown["/empty"]
