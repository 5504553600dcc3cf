"""Small helpers the UI tests share: waiting on a Pilot-driven app, and the plain text of
what a widget shows (so assertions read what a user would read, without styles)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
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
