"""The UI as a user drives it, third round: invisible characters, wide characters in
aligned columns, copying inside dialogs, and odd traces and terminals.

Traces are real where the traffic matters: a small Starlette app wrapped by
``hopscope.tracing.wrap`` with a MemorySink, driven by httpx, its events fed to the app
through a QueueSource.  What a test reads is what the terminal would get: the
compositor's full-screen update.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import MemorySink, wrap
from hopscope.tui.app import HopscopeApp
from hopscope.tui.keymap import ENV
from rich.syntax import Syntax
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from test_tui_user import run, screen_lines
from textual.pilot import Pilot
from textual.widgets import Input, TextArea
from uitools import text_of, traced, wait_for

Event = dict[str, Any]
SIZE = (120, 40)
sly_log = logging.getLogger("hopscope.tests.sly")
#: Characters that draw nothing on a terminal yet change what is shown: bidi embeddings,
#: overrides, isolates and marks, zero-width spaces and joiners, the BOM, soft hyphens,
#: line and paragraph separators (Unicode categories Cf, Zl, Zp).
HIDDEN = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]"
)
RLO, RLI, PDI, ZWSP, BOM = "\u202e", "\u2067", "\u2069", "\u200b", "\ufeff"


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The apps read the user's config file: point them at none."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


# -- invisible characters --------------------------------------------------------------------


async def _sly(request: Request) -> Response:
    """Answers with text that reorders or hides itself on a terminal."""
    kind = request.query_params.get("kind", "")
    if kind == "json":
        return JSONResponse({"user": f"admin{RLO}nimda", "note": f"a{ZWSP}b"})
    if kind == "boom":
        sly_log.warning(f"log {RLI}isolated{PDI} end")
        raise RuntimeError(f"boom {RLO}reversed")
    if request.method == "POST":
        return Response(await request.body(), media_type="text/plain")
    if kind == "form":
        return Response(
            f"name=x{RLO}y&z{ZWSP}=1".encode(),
            media_type="application/x-www-form-urlencoded",
        )
    return PlainTextResponse(
        f"{BOM}text with a{ZWSP}hidden space and {RLO}reversed tail",
        headers={"x-quiet": "plain"},
    )


def test_bidi_and_zero_width_characters_are_shown_as_escapes_everywhere() -> None:
    """Format characters (Unicode category Cf) passed through: U+202E in a path or a
    body reversed the rest of its row on the terminal ("Trojan Source"), and U+200B or
    U+FEFF hid in it, in the list, the tabs, the timeline and the Raw events alike."""

    async def requests(client: httpx.AsyncClient) -> None:
        # Percent-decoded by the server: the app sees (and records) the characters.
        await client.get(f"/files/{RLO}gpj.exe/{ZWSP}x", params={"kind": "text"})
        await client.get("/api", params={"kind": "json"})
        await client.get("/api", params={"kind": "form"})
        await client.get(f"/boom{RLI}", params={"kind": "boom"})
        await client.post(
            "/echo",
            content=f"body {RLO}olleh{BOM}".encode(),
            headers={"x-name": f"{RLO}".encode()},  # bytes on the wire: latin-1 text
        )

    routes = [Route("/{rest:path}", _sly, methods=["GET", "POST"])]
    seen: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        app.request_list.focus()
        await pilot.press("home")
        # The tabs where each request's sly text shows (the list is always on screen).
        for tabs in ("13", "36", "3", "45", "2"):
            await pilot.press("down")
            for tab in tabs:
                await pilot.press(tab)
                await pilot.pause()
                seen.extend(screen_lines(app))

    run(traced(routes, requests), scenario)
    leaked = [line for line in seen if HIDDEN.search(line)]
    assert not leaked, leaked[:3]
    screen = "\n".join(seen)
    assert "/files/\\u202egpj.exe/\\u200bx" in screen  # the list, the request line
    assert "app GET /files/\\u202egpj.exe" in screen  # the timeline's label
    assert "\\ufefftext with a\\u200bhidden space and \\u202ereversed tail" in screen
    assert '"user": "admin\\u202enimda"' in screen  # the pretty JSON body
    assert "x\\u202ey" in screen and "z\\u200b" in screen  # form fields
    assert "log \\u2067isolated\\u2069 end" in screen  # the Logs tab
    assert "boom \\u202ereversed" in screen  # the Error tab
    assert "body \\u202eolleh\\ufeff" in screen  # a request body


def test_printable_escapes_hidden_characters_and_keeps_the_rest() -> None:
    from hopscope.tui.formatting import printable

    assert printable(f"a{RLO}b\u2066c\u200ed\U000e0041e\u2028f\udcff") == (
        "a\\u202eb\\u2066c\\u200ed\\U000e0041e\\u2028f\\udcff"
    )
    # Line breaks and tabs stay in text of several lines; other spaces and CJK stay.
    assert printable(f"日本\u00a0語\n\t{ZWSP}", lines=True) == "日本\u00a0語\n\t\\u200b"
    assert printable("\x1b\n") == "␛␊"  # control characters as before


# -- wide characters in aligned columns ------------------------------------------------------


def _columns(lines: list[str], marker: str) -> set[int]:
    """The cells at which ``marker`` starts on each line having it."""
    from rich.cells import cell_len

    return {cell_len(line[: line.index(marker)]) for line in lines if marker in line}


def test_many_pairs_and_many_log_records_align_by_cells_with_wide_characters() -> None:
    """Past 200 pairs (or log records) the panes are aligned text lines, padded by
    characters: a CJK or emoji name takes two cells, so its value (or message) started
    one cell further right per wide character, and the columns went ragged."""

    async def many(request: Request) -> Response:
        for n in range(250):
            logger = logging.getLogger("日本" if n % 2 else "hopscope.x")
            logger.warning("message %d", n)
        return PlainTextResponse("ok")

    def query(n: int) -> str:
        name = ("名前" * (n % 4)) + ("🙂" if n % 5 == 0 else "") + f"k{n}"
        return f"{name}=v{n}"

    async def requests(client: httpx.AsyncClient) -> None:
        await client.get("/many?" + "&".join(query(n) for n in range(250)))

    seen: dict[str, str] = {}

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "2")
        await pilot.pause(0.2)
        seen["request"] = text_of(app.detail._views["request"].content, width=200)
        await pilot.press("4")
        await pilot.pause(0.2)
        seen["logs"] = text_of(app.detail._views["logs"].content, width=200)

    run(traced([Route("/many", many)], requests), scenario)
    values = [line for line in seen["request"].splitlines() if re.search(r"k\d+ +v\d+$", line)]
    assert len(values) == 250, seen["request"][:500]
    assert len({cell for line in values for cell in _columns([line], " v")}) == 1, values[:6]
    logs = [line for line in seen["logs"].splitlines() if "message " in line]
    assert len(logs) == 250
    assert len(_columns(logs, "message ")) == 1, logs[:4]


# -- copying in dialogs and fields -----------------------------------------------------------


def _notes(app: HopscopeApp) -> list[str]:
    return [str(note.message) for note in app._notifications]


async def _copied(app: HopscopeApp, pilot: Pilot[None], keys: tuple[str, ...] = ()) -> str:
    """Press ``keys`` then ctrl+c; the app must still run and say what it did."""
    app._clipboard = ""
    app.clear_notifications()
    await pilot.press(*keys, "ctrl+c")
    await pilot.pause(0.1)
    assert app.is_running, "ctrl+c ended the app"
    assert _notes(app), "ctrl+c said nothing"
    return app.clipboard


def test_ctrl_c_copies_in_every_dialog_and_field_and_never_quits_from_one(
    serve_asgi: Any,
) -> None:
    """Ctrl+C with nothing selected did nothing in the dialogs (the replay prompt, the
    save prompt, edit and send, the comparison, help, the command palette) and quit
    hopscope from the filter bar, losing what was on screen.  It copies the selection,
    else the whole field, and says so."""
    from hopscope.tui.help import HelpScreen
    from hopscope.tui.replay_view import ComparisonScreen, EditScreen, TargetScreen
    from hopscope.tui.save import SaveScreen
    from textual.command import CommandPalette

    async def again(request: Request) -> Response:
        return PlainTextResponse("again")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/again", again)]), sink)
    with serve_asgi(app) as base:
        httpx.get(f"{base}/again", headers={"x-token": "t"}, timeout=10)

        async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
            def on(kind: type) -> Callable[[], bool]:
                return lambda: isinstance(app.screen, kind)

            await pilot.press("up", "r")  # the replay prompt: its field starts selected
            await wait_for(pilot, on(TargetScreen), "the replay prompt")
            assert await _copied(app, pilot) == base
            assert await _copied(app, pilot, ("end",)) == base  # nothing selected: all
            assert "Copied the field (" in _notes(app)[-1]
            assert await _copied(app, pilot, ("shift+left",) * 4) == base[-4:]
            assert _notes(app)[-1] == "Copied the selection (4 characters)."
            await pilot.press("escape", "ctrl+s")  # the save prompt
            await wait_for(pilot, on(SaveScreen), "the save prompt")
            assert (await _copied(app, pilot, ("end",))).startswith("hopscope-")
            await pilot.press("escape", "e")  # edit and send: the URL, then the headers
            await wait_for(pilot, on(EditScreen), "the editor")
            assert await _copied(app, pilot, ("end",)) == f"{base}/again"
            await pilot.press("tab")
            headers = app.screen.query_one("#edit-headers", TextArea).text
            assert "x-token: t" in headers
            assert await _copied(app, pilot) == headers
            await pilot.press("escape", "r", "enter")  # a replay, and its comparison
            await wait_for(pilot, on(ComparisonScreen), "the comparison")
            said = await _copied(app, pilot)
            assert said.startswith(f"GET {base}/again") and "same" in said, said
            await pilot.press("escape", "question_mark")
            await wait_for(pilot, on(HelpScreen), "help")
            assert await _copied(app, pilot) == ""
            assert "closes help" in _notes(app)[-1]
            await pilot.press("escape", "slash", *"status:2xx")  # the filter bar
            assert await _copied(app, pilot) == "status:2xx"
            assert "esc leaves the field; there ^c quits" in _notes(app)[-1]
            await pilot.press("escape", "s")  # an empty field: nothing to copy, said
            assert await _copied(app, pilot) == ""
            assert _notes(app)[-1] == "Nothing to copy: the field is empty."
            await pilot.press("escape", "ctrl+p", *"sav")  # Textual's command palette
            await wait_for(pilot, on(CommandPalette), "the palette")
            assert await _copied(app, pilot) == "sav"
            await pilot.press("escape", "escape", "ctrl+c")  # on the list, it quits as before
            await wait_for(pilot, lambda: not app.is_running, "the app to end")

        run(sink.events(), scenario)


# -- what the dialogs' fields and the filter echo show ---------------------------------------

#: Control characters and the invisible ones above: what must never reach the terminal.
UNSAFE = re.compile(HIDDEN.pattern[:-1] + "\x00-\x1f\x7f-\x9f]")


def test_captured_text_in_the_replay_fields_is_shown_safely_and_sent_as_captured() -> None:
    """The replay prompt took its target from the Host header and the editor its URL
    from the captured query, both into Textual inputs, which draw what they hold as it
    is: an ESC or a U+202E from the traffic reached the terminal."""
    from hopscope.tui.replay_view import EditScreen, TargetScreen
    from uitools import request_events

    events = request_events(1)
    attrs = events[0]["attrs"]
    attrs["http.request.headers"] = [["host", "ex\x1b[2Jample.com"]]
    attrs["url.query"] = f"q=\x1b[31mred\x9b1m{RLO}x"
    shown: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "r")
        await wait_for(pilot, lambda: isinstance(app.screen, TargetScreen), "the prompt")
        await pilot.pause(0.1)
        shown.extend(screen_lines(app))
        await pilot.press("enter")  # such a target is refused, in one line
        await pilot.pause(0.1)
        shown.extend(screen_lines(app))
        assert "not a target: 'http://ex␛[2Jample.com'" in _notes(app)[-1]
        await pilot.press("e")
        screen = await wait_for(
            pilot, lambda: isinstance(app.screen, EditScreen) and app.screen, "the editor"
        )
        await pilot.pause(0.1)
        shown.extend(screen_lines(app))
        field = screen.query_one("#edit-url", Input).value
        assert field.endswith("/items/1?q=␛[31mred\\x9b1m\\u202ex"), field
        url = screen.edited().url
        assert url.endswith(f"/items/1?q=\x1b[31mred\x9b1m{RLO}x"), url  # as captured
        # What a user pastes into the editors is drawn safely too.
        body = screen.query_one("#edit-body", TextArea)
        body.text = f"pasted \x1b[2J{RLO}\tend"
        await pilot.pause(0.1)
        shown.extend(screen_lines(app))
        assert body.text == f"pasted \x1b[2J{RLO}\tend"  # (what would be sent)

    run(events, scenario)
    leaked = [line for line in shown if UNSAFE.search(line)]
    assert not leaked, leaked[:3]
    assert any("/items/1?q=␛[31mred\\x9b1m\\u202ex" in line for line in shown), shown


def test_a_filter_with_control_characters_is_echoed_safely() -> None:
    """The filter bar, its error line and the status line showed a pasted filter as it
    was: its ESC reached the terminal."""
    from uitools import request_events

    shown: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        for expression in ("a\x1b[31mb", "status:\x1b[2J", f"path:{RLO}x"):
            await pilot.press("slash")
            app.query_bar.filter_input.value = expression
            await pilot.press("enter")
            await pilot.pause(0.1)
            shown.extend(screen_lines(app))
            if expression.startswith("status:"):
                error = text_of(app.query_bar.error_line.content)
                echo, caret = error.splitlines()[:2]
                assert echo.strip() == "status:␛[2J", error
                assert caret.index("^") == echo.index("␛"), error
            await pilot.press("escape")

    run(request_events(1), scenario)
    leaked = [line for line in shown if UNSAFE.search(line)]
    assert not leaked, leaked[:3]
    assert any("filter: a␛[31mb" in line for line in shown)


# -- big bodies --------------------------------------------------------------------------------


def test_the_raw_tab_of_a_request_with_a_big_body_shows_its_events_cut() -> None:
    """With a raised ``body_limit`` the event holding a 1 MB body was longer than what
    the Raw tab shows in all: the tab showed no event, only "// … 2 more events"."""
    from hopscope.tui.detail import render_raw

    async def big(request: Request) -> Response:
        return Response(bytes(range(256)) * 4096, media_type="application/octet-stream")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/big", big)]), sink, body_limit=2_000_000)

    async def requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert len((await client.get("/big")).content) == 1_048_576

    asyncio.run(requests())
    (trace,) = sink.traces()
    shown = render_raw(trace).renderables[1]  # type: ignore[attr-defined]
    raw = shown.code if isinstance(shown, Syntax) else shown.plain
    assert raw.count('"kind": "span_start"') == 1, raw[:300]
    assert '"http.response.body.size": 1048576' in raw
    assert re.search(r'"http.response.body": "[A-Za-z0-9+/]+… \([\d,]+ more characters\)"', raw)
    assert "more events" not in raw


# -- resizing ----------------------------------------------------------------------------------


def test_timeline_rows_fit_again_after_growing_out_of_a_narrow_terminal() -> None:
    """Under 70 columns the span panel sits under the rows; growing past 70 puts it
    beside them, which narrows the rows without resizing the timeline: they stayed drawn
    for the full width, each wrapped onto three lines (name, bar, duration)."""
    from uitools import request_events

    rows: list[str] = []

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await pilot.press("up", "1")
        await pilot.pause(0.2)
        for size in ((40, 60), (100, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.3)
        rows.extend(line for line in screen_lines(app) if "app GET /items/1" in line)

    run(request_events(1), scenario, size=(100, 24))
    (row,) = rows
    assert re.search(r"app GET /items/1 +█+ +500µs │", row), row


def test_a_huge_header_value_query_and_path_are_cut_with_a_count() -> None:
    """A 40,000-character query, a 500,000-character header and a 20,000-character path
    (a HAR's ``data:`` URL is longer) were laid out whole: Rich folds each line as it
    goes, and every look at the Request tab or the span froze the UI for seconds."""
    from hopscope.tracing.model import assemble
    from hopscope.tui.body_view import render_message
    from hopscope.tui.timeline import describe_span

    async def requests(client: httpx.AsyncClient) -> None:
        path = "/" + "p" * 20_000
        await client.get(path, params={"q": "x" * 40_000}, headers={"x-big": "h" * 500_000})

    (trace,) = assemble(traced([Route("/{rest:path}", _sly)], requests))
    message = render_message(trace, "request")
    line = message.renderables[0].plain  # type: ignore[attr-defined]
    cut = r"GET http://test/p{9988}… \(50,015 more characters\)  HTTP/1.1"
    assert re.fullmatch(cut, line), line[-100:]
    shown = text_of(message, width=100)
    assert len(shown) < 100_000, len(shown)
    assert "h… (490,000 more characters)" in shown  # the header
    assert "x… (30,000 more characters)" in shown  # the query's q
    (span,) = trace.spans.values()
    title = text_of(describe_span(span, 0, 0), width=100).splitlines()
    assert len(title) < 200 and "(10,005 more characters)" in "".join(title), title[-3:]
