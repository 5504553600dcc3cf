"""Small helpers the UI tests share: waiting on a Pilot-driven app (for a condition, or
for a reload's new answer), the plain text of what a widget shows (so assertions read
what a user would read, without styles), a request's wire events for the store and
file tests, and the wire events of requests to a real app, traced."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from hopscope.tracing import MemorySink, wrap
from rich.console import Console
from starlette.applications import Starlette
from starlette.routing import BaseRoute
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Static

#: Seconds a condition may take before the test fails (only a failing test waits this long).
WAIT = 30.0


async def wait_for(pilot: Pilot[None], condition: Callable[[], Any], what: str) -> Any:
    """Let the app run until ``condition()`` is true; returns what it returned."""
    deadline = time.monotonic() + WAIT
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)
    return result


async def answered_after_saves(
    pilot: Pilot[None],
    client: httpx.AsyncClient,
    done: Callable[[httpx.Response], bool],
    save: Callable[[], object],
    deadline: float,
    why: Callable[[], object],
) -> httpx.Response:
    """GET ``/`` through ``client`` (the app running meanwhile) until ``done`` with the
    response, which it returns: a reload under the UI.  ``save`` is called at once, then
    each 5 s with no such answer (file watching may miss a save); past ``deadline`` (a
    :func:`time.monotonic` time) the test fails, saying ``why()``."""
    saved = 0.0
    while not done(answer := await client.get("/")):
        assert time.monotonic() < deadline, why()
        if time.monotonic() - saved > 5:
            save()
            saved = time.monotonic()
        await pilot.pause(0.1)
    return answer


def text_of(renderable: Any, width: int = 110) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def static_text(app: App[Any], selector: str) -> str:
    return text_of(app.query_one(selector, Static).content)


def list_lines(app: Any) -> list[str]:
    """The request list's rows on screen, as text (``app``: a HopscopeApp)."""
    request_list = app.request_list
    return [
        request_list.render_line(y).text
        for y in range(request_list.scrollable_content_region.height)
    ]


#: When :func:`request_events`' first request starts (epoch nanoseconds).
REQUEST_T0 = 1_735_732_800_000_000_000


def request_events(
    n: int, *, status: int | None = 200, marker: object = None
) -> list[dict[str, Any]]:
    """Request ``n``'s wire events: an app span with a method, a path and two headers (one
    varying with ``n``), ended with ``status`` (None: still running); ``marker`` rides
    along as an attribute."""
    trace_id, span_id = f"{n + 1:032x}", f"{n + 1:016x}"
    start = {
        "kind": "span_start",
        "ts": REQUEST_T0 + n * 1_000_000,
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": None,
        "hop": "app",
        "name": f"GET /items/{n}",
        "attrs": {
            "http.request.method": "GET",
            "url.path": f"/items/{n}",
            "http.request.headers": [["host", "example.com"], ["X-User", str(n % 7)]],
            "marker": marker,
        },
    }
    if status is None:
        return [start]
    end = {
        "kind": "span_end",
        "ts": REQUEST_T0 + n * 1_000_000 + 500_000,
        "trace_id": trace_id,
        "span_id": span_id,
        "attrs": {"http.response.status_code": status},
    }
    return [start, end]


def traced(
    routes: list[BaseRoute], requests: Callable[[httpx.AsyncClient], Awaitable[None]]
) -> list[dict[str, Any]]:
    """The wire events of ``requests`` made to a Starlette app of ``routes``, traced for
    real (its exceptions recorded, not raised to the client)."""
    sink = MemorySink()
    app = wrap(Starlette(routes=routes), sink)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await requests(client)

    asyncio.run(main())
    return sink.events()
