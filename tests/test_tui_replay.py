"""Playing a recording back in the UI, and resending requests from it.

Playback is checked through what the source delivers (order, pause, step, seek), never
how long it took.  Resending goes to a real uvicorn serving a Starlette app whose answer
the tests change, so "same" and "different" come from real responses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.ui import build_view_app
from hopscope.tracing.records import new_span_id, new_trace_id, to_events
from hopscope.tui.app import HopscopeApp
from hopscope.tui.replay_view import ComparisonScreen, EditScreen, TargetScreen
from hopscope.tui.save import write_trace_file
from hopscope.tui.source import RESET, PlaybackSource, QueueSource
from hopscope.tui.store import RequestStore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from textual.pilot import Pilot
from textual.widgets import Input, TextArea
from uitools import wait_for

SIZE = (120, 35)
WAIT = 10.0
Event = dict[str, Any]
SECOND = 1_000_000_000


def request_events(
    n: int, t: int, *, port: int = 80, body: bytes = b'{"n": 1}', headers: Any = ()
) -> list[Event]:
    path = f"/items/{n}"
    attrs = {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": path,
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.request.headers": [(b"host", f"127.0.0.1:{port}".encode()), *headers],
        "http.response.status_code": 200,
        "http.response.headers": [(b"content-type", b"application/json")],
        "http.response.body": [body],
        "http.response.body.size": len(body),
    }
    ids = (new_trace_id(), new_span_id(), 0)
    record = ("c", t, t + 2_000_000, *ids, "app", f"GET {path}", 1, attrs)
    return to_events(record, {"process.pid": 1})


def recording(count: int) -> list[Event]:
    """``count`` requests one second apart."""
    t = time.time_ns() - 3600 * SECOND
    return [e for n in range(count) for e in request_events(n, t + n * SECOND)]


def wait_until(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Collected:
    """A ``deliver`` that keeps what a source delivered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []

    def __call__(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend(events)

    def traces(self) -> list[str]:
        """Trace ids since the last reset, in order of first appearance."""
        with self.lock:
            events = list(self.events)
        seen: list[str] = []
        for event in events:
            if event is RESET or event.get("kind") == "reset":
                seen = []
            elif event.get("trace_id") and event["trace_id"] not in seen:
                seen.append(event["trace_id"])
        return seen

    def resets(self) -> int:
        with self.lock:
            return sum(1 for e in self.events if e.get("kind") == "reset")


def _order(events: list[Event]) -> list[str]:
    order: list[str] = []
    for event in events:
        if event["trace_id"] not in order:
            order.append(event["trace_id"])
    return order


# -- PlaybackSource ------------------------------------------------------------------------


def test_playback_delivers_everything_in_recorded_order() -> None:
    events = recording(5)
    # Given shuffled: playback orders by time.
    source = PlaybackSource(list(reversed(events)), "rec", speed=10_000)
    got = Collected()
    source.start(got)
    try:
        wait_until(lambda: len(got.traces()) == 5, "all five requests")
        assert got.traces() == _order(events)
        stamps = [e["ts"] for e in got.events]
        assert stamps == sorted(stamps)
        assert "played" in source.state()
    finally:
        source.stop()


def test_playback_pause_step_and_seek() -> None:
    events = recording(5)
    order = _order(events)
    source = PlaybackSource(events, "rec", speed=10_000)
    source.pause()
    got = Collected()
    source.start(got)
    try:
        time.sleep(0.2)
        assert got.traces() == [], "a paused playback delivered"
        assert "paused" in source.state()
        source.step()
        wait_until(lambda: len(got.traces()) == 1, "one stepped request")
        time.sleep(0.1)
        assert got.traces() == order[:1]
        source.step()
        wait_until(lambda: len(got.traces()) == 2, "a second stepped request")
        time.sleep(0.1)
        assert got.traces() == order[:2]
        assert source.paused
        # On 2 s while paused: up to the fourth request's start.
        source.seek(2)
        wait_until(lambda: len(got.traces()) == 4, "the seek forward")
        assert got.traces() == order[:4]
        # Back 10 s: everything is forgotten and fed again up to the start.
        source.seek(-10)
        wait_until(lambda: got.resets() == 1, "the reset")
        wait_until(lambda: got.traces() == order[:1], "the re-feed")
        assert source.position_ns == 0
        source.pause(False)
        wait_until(lambda: got.traces() == order, "the rest after resuming")
    finally:
        source.stop()


def test_store_forgets_everything_on_reset() -> None:
    first, second = recording(2)[:2], recording(1)
    store = RequestStore()
    change = store.ingest([*first, RESET, *second])
    assert change.reset
    assert [row.trace.trace_id for row in store.rows.values()] == _order(second)
    assert store.total == 1


# -- view --play ------------------------------------------------------------------------------


def run_app(app: HopscopeApp, scenario: Callable[[Pilot[None]], Awaitable[None]]) -> None:
    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)
            await pilot.press("q")

    asyncio.run(go())


def test_view_play_feeds_the_ui_and_space_pauses_the_playback(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_trace_file(str(path), recording(3))
    session = build_view_app(str(path), play=True, speed=10_000)
    app = session.app
    source = app.source
    assert isinstance(source, PlaybackSource)

    async def scenario(pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: len(app.store.rows) == 3, "the played requests")
        header = app.header._source_line.render()
        assert "rec.jsonl" in str(header)
        await pilot.press("space")
        assert source.paused
        await wait_for(pilot, lambda: "paused" in str(app.header._source_line.render()), "header")
        await pilot.press("left_square_bracket", "left_square_bracket", "left_square_bracket")
        await wait_for(pilot, lambda: len(app.store.rows) == 1, "the seek back in the UI")
        await pilot.press("full_stop")
        await wait_for(pilot, lambda: len(app.store.rows) == 2, "the step in the UI")
        await pilot.press("space")
        await wait_for(pilot, lambda: len(app.store.rows) == 3, "the rest")

    try:
        run_app(app, scenario)
    finally:
        session.close()


def test_view_play_options(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_trace_file(str(path), recording(1))
    result = CliRunner().invoke(main, ["view", "--help"])
    assert "--play" in result.output and "--speed" in result.output
    result = CliRunner().invoke(main, ["view", "--headless", "--play", str(path)])
    assert result.exit_code == 2
    assert "--play needs the UI" in result.output
    result = CliRunner().invoke(main, ["view", "--play", "--speed", "0", str(path)])
    assert result.exit_code == 2


# -- resending ---------------------------------------------------------------------------------


class Target:
    """A Starlette app whose answer the test changes; it remembers what it received."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] = {"n": 1}
        self.received: list[dict[str, str]] = []

        async def item(request: Request) -> JSONResponse:
            self.received.append(dict(request.headers))
            return JSONResponse(self.answer)

        self.app = Starlette(routes=[Route("/items/{n}", item)])


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def ui_with(events: list[Event]) -> HopscopeApp:
    source = QueueSource("test", live=False)
    source.push(events)
    return HopscopeApp(source)


async def select_first(app: HopscopeApp, pilot: Pilot[None]) -> None:
    await wait_for(pilot, lambda: len(app.store) >= 1, "the request")
    app.request_list.select_index(0)
    await wait_for(pilot, lambda: app.selected_trace is not None, "the selection")


async def replay_to(app: HopscopeApp, pilot: Pilot[None], expected_target: str) -> None:
    await pilot.press("r")
    screen = await wait_for(
        pilot, lambda: isinstance(app.screen, TargetScreen) and app.screen, "the target prompt"
    )
    assert screen.query_one("#target-input", Input).value == expected_target
    await pilot.press("enter")


def test_r_replays_and_shows_same_then_different(
    serve_asgi: Callable[[Any], Any],
) -> None:
    target = Target()
    with serve_asgi(target.app) as base:
        events = request_events(1, time.time_ns(), port=_port(base), body=b'{"n":1}')
        app = ui_with(events)

        async def scenario(pilot: Pilot[None]) -> None:
            await select_first(app, pilot)
            await replay_to(app, pilot, base)
            screen = await wait_for(
                pilot, lambda: isinstance(app.screen, ComparisonScreen) and app.screen, "result"
            )
            assert len(target.received) == 1
            assert "same" in screen.text()
            assert "DIFFERENT" not in screen.text()
            await pilot.press("escape")
            target.answer = {"n": 2}
            await replay_to(app, pilot, base)  # the last target is remembered
            screen = await wait_for(
                pilot,
                lambda: isinstance(app.screen, ComparisonScreen) and app.screen,
                "second result",
            )
            text = screen.text()
            assert "DIFFERENT" in text
            assert "n: 1 -> 2" in text
            await pilot.press("escape")

        run_app(app, scenario)


def test_marked_requests_are_replayed_together(serve_asgi: Callable[[Any], Any]) -> None:
    target = Target()
    with serve_asgi(target.app) as base:
        t = time.time_ns()
        events = [
            *request_events(1, t, port=_port(base), body=b'{"n":1}'),
            *request_events(2, t + SECOND, port=_port(base), body=b'{"n":1}'),
            *request_events(3, t + 2 * SECOND, port=_port(base), body=b'{"n":1}'),
        ]
        app = ui_with(events)

        async def scenario(pilot: Pilot[None]) -> None:
            await wait_for(pilot, lambda: len(app.store) == 3, "the requests")
            for index in (0, 2):
                app.request_list.select_index(index)
                await wait_for(pilot, lambda: app.selected_trace is not None, "selection")
                await pilot.pause(0.1)
                await pilot.press("m")
            assert len(app.marked) == 2
            await replay_to(app, pilot, base)
            screen = await wait_for(
                pilot, lambda: isinstance(app.screen, ComparisonScreen) and app.screen, "result"
            )
            paths = sorted(r.request.url.rsplit("/", 1)[1] for r in screen.results)
            assert paths == ["1", "3"]
            assert len(target.received) == 2
            await pilot.press("escape")

        run_app(app, scenario)


def test_e_edits_a_header_before_sending(serve_asgi: Callable[[Any], Any]) -> None:
    target = Target()
    with serve_asgi(target.app) as base:
        events = request_events(
            1, time.time_ns(), port=_port(base), body=b'{"n":1}', headers=[(b"x-token", b"old")]
        )
        app = ui_with(events)

        async def scenario(pilot: Pilot[None]) -> None:
            await select_first(app, pilot)
            await pilot.press("e")
            screen = await wait_for(
                pilot, lambda: isinstance(app.screen, EditScreen) and app.screen, "the editor"
            )
            headers = screen.query_one("#edit-headers", TextArea)
            assert "x-token: old" in headers.text
            headers.text = headers.text.replace("x-token: old", "x-token: new")
            await pilot.press("ctrl+s")
            await wait_for(
                pilot, lambda: isinstance(app.screen, ComparisonScreen), "the comparison"
            )
            assert [r.get("x-token") for r in target.received] == ["new"]
            await pilot.press("escape")

        run_app(app, scenario)


def test_unreachable_target_is_a_notification(free_port: Callable[[], int]) -> None:
    port = free_port()
    app = ui_with(request_events(1, time.time_ns(), port=port))

    async def scenario(pilot: Pilot[None]) -> None:
        await select_first(app, pilot)
        await replay_to(app, pilot, f"http://127.0.0.1:{port}")
        await wait_for(
            pilot,
            lambda: any("cannot reach" in n.message for n in app._notifications),
            "the notification",
        )
        assert not isinstance(app.screen, ComparisonScreen)
        assert app.is_running
        await pilot.press("down")  # still answering keys

    run_app(app, scenario)


@pytest.mark.parametrize("key", ["full_stop", "left_square_bracket"])
def test_playback_keys_without_a_playback_only_tell(key: str) -> None:
    app = ui_with(recording(1))

    async def scenario(pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: len(app.store) == 1, "the request")
        await pilot.press(key)
        await wait_for(
            pilot,
            lambda: any("needs a playback" in n.message for n in app._notifications),
            "the hint",
        )

    run_app(app, scenario)


def test_a_body_cut_at_capture_is_not_resent_unless_edited() -> None:
    from hopscope.tracing.replay import CapturedRequest
    from hopscope.tui.resend import Outgoing, send

    fields = {f: None for f in CapturedRequest.__dataclass_fields__}
    fields.update(
        method="POST", path="/upload", query="", headers=[], body=b"x" * 10, truncated=True,
        status=200, response_headers=[], response_body=b"", response_truncated=False,
    )  # fmt: skip
    captured = CapturedRequest(**fields)  # type: ignore[arg-type]
    # The port is never contacted: the refusal comes first.
    result = send(captured, Outgoing("POST", "http://127.0.0.1:9/upload", [], b"x" * 10))
    assert result.status is None and "truncated at capture" in (result.error or "")
    edited = send(captured, Outgoing("POST", "http://127.0.0.1:9/upload", [], b"whole"))
    assert "truncated" not in (edited.error or "")
