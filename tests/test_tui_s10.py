"""Session 10's browser trial, three small bugs:

- a running stream (SSE, a long download) showed "…" as its status in the request list
  although its response head (200) was sent: the status shows once any hop's head went
  out, filters see it, the header counts finished requests only (as before);
- a HAR whose response says ``Content-Encoding: gzip`` showed "could not decode gzip" in
  the Response tab: a HAR's text is already decoded;
- a tail line of a request whose client left early was printed when the client's span
  ended, without the hops still running (``server=521ms client-gone``, no ``app=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.tail import Tail, format_line
from hopscope.tracing import MemorySink, wrap
from hopscope.tracing.filters import parse
from hopscope.tracing.har import load_har
from hopscope.tracing.model import assemble
from hopscope.tracing.servers.uvicorn_protocols import HttpToolsProtocol
from hopscope.tracing.tracefile import header_line
from hopscope.tui.app import HopscopeApp
from hopscope.tui.body_view import render_message
from hopscope.tui.keymap import ENV
from hopscope.tui.source import QueueSource, open_file
from hopscope.tui.store import RequestStore
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from test_server_hop import _serve
from test_tui_user import screen_lines
from uitools import list_lines, static_text, text_of, wait_for

Event = dict[str, Any]
SIZE = (120, 40)
T0 = 1_700_000_000_000_000_000
MS = 1_000_000


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The apps read the user's config file: point them at none."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


# -- 1. a running stream's status ---------------------------------------------------------


@contextlib.contextmanager
def streaming(sink: MemorySink) -> Iterator[list[Event]]:
    """A real SSE stream under uvicorn (server hop) and the wrapped app (app hop), held
    open after its first event: yields the wire events recorded while it runs."""
    release = threading.Event()

    async def events(request: Request) -> Response:
        async def stream() -> Any:
            yield b"data: 1\n\n"
            deadline = time.monotonic() + 10
            while not release.is_set() and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            yield b"data: 2\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = wrap(Starlette(routes=[Route("/events", events)]), sink=sink)
    with _serve(app, HttpToolsProtocol) as base, httpx.Client(base_url=base) as client:
        with client.stream("GET", "/events") as response:
            chunks = response.iter_bytes()
            assert next(chunks) == b"data: 1\n\n"
            deadline = time.monotonic() + 10
            names: list[str] = []
            while "response.head" not in names and time.monotonic() < deadline:
                time.sleep(0.02)
                names = [e.get("name", "") for e in sink.events() if e["kind"] == "event"]
            running = sink.events()
            try:
                yield running
            finally:
                release.set()
                b"".join(chunks)


def test_a_running_stream_shows_its_status_in_the_list_once_its_head_went_out(
    hop_sink: MemorySink,
) -> None:
    with streaming(hop_sink) as events:
        assert not [e for e in events if e["kind"] == "span_end"]  # still streaming
    source = QueueSource("stream")
    app = HopscopeApp(source, keymap={})
    seen: list[str] = []

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            source.push(events)
            await wait_for(pilot, lambda: app.store.total >= 1, "the stream")
            await pilot.pause()
            (row,) = [line for line in list_lines(app) if "/events" in line]
            seen.append(row)
            seen.extend(screen_lines(app))

    asyncio.run(main())
    row = seen[0]
    assert " 200 " in row and "…" not in row, row
    (trace,) = assemble(events)
    assert not trace.finished and trace.status == 200  # in flight, status known


def _running(hop: str, head: str | None) -> list[Event]:
    """One request's events: a ``hop`` span that started and sent (``head``: by that
    event) its response head, 200, and has not ended."""
    ids = {"trace_id": "a" * 32, "span_id": "b" * 16}
    events: list[Event] = [
        {
            "kind": "span_start", "ts": T0, **ids, "parent_id": None, "hop": hop,
            "name": "GET /download",
            "attrs": {"http.request.method": "GET", "url.path": "/download"},
        }
    ]  # fmt: skip
    if head == "response.start":
        attrs: dict[str, Any] = {"status": 200, "headers": [["content-type", "text/plain"]]}
        events.append({"kind": "event", "ts": T0 + MS, **ids, "name": head, "attrs": attrs})
    elif head == "response.head":
        attrs = {"http.response.status_code": 200}
        events.append({"kind": "event", "ts": T0 + MS, **ids, "name": head, "attrs": attrs})
    return events


def _end(status: int) -> Event:
    return {
        "kind": "span_end", "ts": T0 + 900 * MS, "trace_id": "a" * 32, "span_id": "b" * 16,
        "attrs": {"http.response.status_code": status},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("hop", "head"),
    [
        ("app", "response.start"),
        ("proxy", "response.start"),
        ("client", "response.start"),
        ("server", "response.head"),
    ],
)
def test_a_running_requests_known_status_is_filtered_and_counted_once_it_ends(
    hop: str, head: str
) -> None:
    store = RequestStore(freeze_gc=False)
    store.set_filter(parse("status:2xx").test, "status:2xx")
    store.ingest(_running(hop, head))
    (row,) = store.rows.values()
    assert row.trace.status == 200 and not row.trace.finished
    assert len(store) == 1  # status:2xx matches it while it runs
    assert store.inflight == {"a" * 32}
    assert not store.counts  # the header counts finished requests by status class
    store.ingest([_end(200)])
    assert store.counts == {"2xx": 1} and not store.inflight and len(store) == 1


def test_a_running_request_with_no_status_yet_matches_no_status_predicate() -> None:
    store = RequestStore(freeze_gc=False)
    store.set_filter(parse("status:2xx").test, "status:2xx")
    store.ingest(_running("app", None))
    assert len(store) == 0 and store.rows
    store.set_filter(parse("not status:5xx").test, "not status:5xx")
    assert len(store) == 1


# -- 2. a HAR's gzip response ---------------------------------------------------------------

PAGE = "hello hopscope " * 100


async def _page(request: Request) -> Response:
    return PlainTextResponse(PAGE)


def _gzip_trace_file(tmp_path: Path) -> Path:
    """A trace file of a real gzip response (Starlette's GZipMiddleware), wrapped."""
    sink = MemorySink()
    app = wrap(GZipMiddleware(Starlette(routes=[Route("/page", _page)]), minimum_size=100), sink)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/page", headers={"Accept-Encoding": "gzip"})
            assert response.headers["content-encoding"] == "gzip"

    asyncio.run(main())
    path = tmp_path / "t.jsonl"
    with path.open("w") as handle:
        handle.write(header_line())
        handle.writelines(json.dumps(event) + "\n" for event in sink.events())
    return path


def _chromium_har(path: Path) -> Path:
    """A HAR shaped as Chromium saves one: decoded text, ``compression``,
    ``_transferSize``, HTTP/2 and lowercase header names, gzip named."""
    text = PAGE
    packed = gzip.compress(text.encode())
    entry = {
        "_initiator": {"type": "other"},
        "_priority": "VeryHigh",
        "_resourceType": "document",
        "cache": {},
        "connection": "443",
        "pageref": "page_1",
        "request": {
            "method": "GET",
            "url": "https://example.test/page",
            "httpVersion": "http/2.0",
            "headers": [
                {"name": ":authority", "value": "example.test"},
                {"name": "accept-encoding", "value": "gzip, deflate, br, zstd"},
            ],
            "queryString": [],
            "cookies": [],
            "headersSize": -1,
            "bodySize": 0,
        },
        "response": {
            "status": 200,
            "statusText": "",
            "httpVersion": "http/2.0",
            "headers": [
                {"name": "content-encoding", "value": "gzip"},
                {"name": "content-type", "value": "text/plain; charset=utf-8"},
                {"name": "content-length", "value": str(len(packed))},
            ],
            "cookies": [],
            "content": {
                "size": len(text),
                "mimeType": "text/plain",
                "compression": len(text) - len(packed),
                "text": text,
            },
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
            "_transferSize": len(packed) + 120,
            "_error": None,
        },
        "serverIPAddress": "127.0.0.1",
        "startedDateTime": "2026-11-26T10:00:00.000Z",
        "time": 12.5,
        "timings": {
            "blocked": 1.0, "dns": -1, "ssl": -1, "connect": -1, "send": 0.2,
            "wait": 10.0, "receive": 1.3, "_blocked_queueing": 0.5,
        },
    }  # fmt: skip
    document = {
        "log": {
            "version": "1.2",
            "creator": {"name": "WebInspector", "version": "537.36"},
            "pages": [
                {
                    "startedDateTime": "2026-11-26T10:00:00.000Z",
                    "id": "page_1",
                    "title": "https://example.test/page",
                    "pageTimings": {"onContentLoad": 20, "onLoad": 30},
                }
            ],
            "entries": [entry],
        }
    }
    path.write_text(json.dumps(document, indent=1))
    return path


def _exported_har(tmp_path: Path) -> Path:
    har = tmp_path / "exported.har"
    result = CliRunner().invoke(
        main, ["export", str(_gzip_trace_file(tmp_path)), "--har", str(har)]
    )
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(har.read_text())["log"]["entries"]
    assert entry["response"]["content"]["text"] == PAGE  # written decoded
    return har


@pytest.mark.parametrize("kind", ["exported", "chromium"])
def test_a_har_gzip_response_is_shown_as_its_text_with_its_headers_as_sent(
    kind: str, tmp_path: Path
) -> None:
    har = _exported_har(tmp_path) if kind == "exported" else _chromium_har(tmp_path / "c.har")
    (trace,) = load_har(har)
    shown = text_of(render_message(trace, "response"), width=200)
    assert "could not decode" not in shown
    assert "hello hopscope hello hopscope" in shown
    assert "decoded from gzip" in shown
    assert "content-encoding" in shown.lower() and "gzip" in shown  # headers as sent


def test_viewing_an_exported_har_shows_the_gzip_body_in_the_response_tab(
    tmp_path: Path,
) -> None:
    source = open_file(_exported_har(tmp_path))
    app = HopscopeApp(source, keymap={})
    seen: list[str] = []

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.store.total >= 1, "the HAR's request")
            app.request_list.focus()
            await pilot.press("home", "down")
            await wait_for(pilot, lambda: app.selected_trace is not None, "a selection")
            await pilot.press("3")
            await wait_for(pilot, lambda: "Body" in static_text(app, "#response-view"), "the body")
            seen.extend(screen_lines(app))

    asyncio.run(main())
    screen = "\n".join(seen)
    assert "hello hopscope hello hopscope" in screen, screen
    assert "could not decode" not in screen


def test_a_har_body_that_still_is_gzip_is_decoded_for_display(tmp_path: Path) -> None:
    """Bytes a writer left compressed (base64 gzip) are still undone by the view."""
    har = _chromium_har(tmp_path / "c.har")
    document = json.loads(har.read_text())
    content = document["log"]["entries"][0]["response"]["content"]
    import base64

    content["text"] = base64.b64encode(gzip.compress(PAGE.encode())).decode()
    content["encoding"] = "base64"
    har.write_text(json.dumps(document))
    (trace,) = load_har(har)
    shown = text_of(render_message(trace, "response"), width=200)
    assert "hello hopscope hello hopscope" in shown and "decoded from gzip" in shown


# -- 3. tail lines of a request whose client left early -----------------------------------

SERVER, APP = "1" * 16, "2" * 16
TRACE = "c" * 32


def _gone(app_end_ms: int | None) -> list[list[Event]]:
    """Batches as a collector gets them: the server span (the root) ends at 521 ms with
    the client gone; the app span below it ends ``app_end_ms`` later (None: never)."""
    ids = {"trace_id": TRACE}
    start = [
        {
            "kind": "span_start", "ts": T0, **ids, "span_id": SERVER, "parent_id": None,
            "hop": "server", "name": "GET /events",
            "attrs": {"http.request.method": "GET", "url.path": "/events"},
        },
        {
            "kind": "span_start", "ts": T0 + MS, **ids, "span_id": APP, "parent_id": SERVER,
            "hop": "app", "name": "GET /events", "attrs": {"url.path": "/events"},
        },
        {
            "kind": "event", "ts": T0 + 2 * MS, **ids, "span_id": APP,
            "name": "response.start", "attrs": {"status": 200, "headers": []},
        },
    ]  # fmt: skip
    gone = T0 + 521 * MS
    server_end = {
        "kind": "span_end", "ts": gone, **ids, "span_id": SERVER,
        "attrs": {"http.response.status_code": 200, "disconnected": True},
    }  # fmt: skip
    # Another request's event, later: the newest time the tail has seen moves on.
    later = {
        "kind": "span_start", "ts": gone + 800 * MS, "trace_id": "d" * 32,
        "span_id": "3" * 16, "parent_id": None, "hop": "app", "name": "GET /other",
    }  # fmt: skip
    batches = [start, [server_end], [later]]
    if app_end_ms is not None:
        app_end = {
            "kind": "span_end", "ts": gone + app_end_ms * MS, **ids, "span_id": APP,
            "attrs": {"http.response.status_code": 200},
        }  # fmt: skip
        batches.append([app_end])
    return batches


def test_a_client_gone_line_waits_for_the_app_span_below_and_lists_it() -> None:
    tail = Tail(io.StringIO(), color=False, live=False, hold=0.3)
    printed = [tail.feed(batch) for batch in _gone(app_end_ms=900)]
    # Past the hold (0.8 s after the server's end), the app still ran: no line yet...
    assert printed[:3] == [[], [], []]
    # ...and the app's end, within the wait, prints it with every hop.
    (line,) = printed[3]
    assert " server=521.0ms app=1420.0ms " in line + " " and line.endswith("client-gone"), line


def test_a_hop_still_running_after_the_wait_is_listed_as_running() -> None:
    tail = Tail(io.StringIO(), color=False, live=False, hold=0.3)
    for batch in _gone(app_end_ms=None):
        assert tail.feed(batch) == []
    far = {
        "kind": "span_start", "ts": T0 + 5 * 10**9, "trace_id": "e" * 32,
        "span_id": "4" * 16, "parent_id": None, "hop": "app", "name": "GET /x",
    }  # fmt: skip
    (line,) = tail.feed([far])
    assert line.endswith("server=521.0ms app=running client-gone"), line
    # A close prints what is held the same way, at once.
    flushed = Tail(io.StringIO(), color=False, live=False, hold=0.3)
    for batch in _gone(app_end_ms=None)[:2]:
        flushed.feed(batch)
    (line,) = flushed.close()
    assert line.endswith("server=521.0ms app=running client-gone"), line


def test_a_tail_line_of_a_running_stream_shows_its_status() -> None:
    """``format_line`` (the viewer's headless lines) agrees with the list's status."""
    (trace,) = assemble(_gone(app_end_ms=None)[0])
    line = format_line(trace)
    assert " GET /events 200 ? server=running app=running" in line, line
