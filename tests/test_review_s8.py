"""Bugs found reviewing session 8's changes, each pinned by a test that failed before
its fix."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_proxy import HOST
from test_proxy_listener import read_responses
from test_proxy_user import OK, by_path, scripted
from test_proxy_user2 import H2C

pytestmark = pytest.mark.timeout(60)


def test_many_upgrade_requests_pipelined_in_one_read_are_all_answered() -> None:
    # Each Upgrade request answered as a plain one (h2c) parsed what followed it with a
    # nested call: 1,500 of them in one read ran out of stack (a RecursionError
    # traceback, and the connection reset with none answered).  Plain GETs went through.
    count = 1500
    with scripted(by_path({})) as (upstream, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=30) as sock:
            with contextlib.suppress(ConnectionResetError):
                sock.sendall(H2C * count)
            responses = read_responses(sock, count, timeout=30)
        assert len(responses) == count
        assert set(responses) == {OK}
        assert len(upstream.heads) == count


def test_the_bootstraps_note_of_what_was_said_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bootstrap created its note with the default mode (0o755 under a 022 umask: an
    # executable file); inject's notes and hopscope's saved files are 0600.
    from hopscope.app.run import BOOTSTRAP_DIR

    spec = importlib.util.spec_from_file_location(
        "hopscope_bootstrap_under_test", BOOTSTRAP_DIR / "sitecustomize.py"
    )
    assert spec is not None and spec.loader is not None
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    monkeypatch.setenv("HOPSCOPE_SAID", str(tmp_path))
    previous = os.umask(0o022)
    try:
        assert bootstrap._hopscope_first_to_say("cannot import hopscope") is True
        assert bootstrap._hopscope_first_to_say("cannot import hopscope") is False
    finally:
        os.umask(previous)
    (note,) = tmp_path.iterdir()
    assert stat.S_IMODE(note.stat().st_mode) == 0o600


def test_a_trace_file_with_broken_trailer_pairs_shows_its_response() -> None:
    # Broken header pairs were made harmless this session, trailer pairs not: one that
    # is not a pair raised out of the Response tab, which ends the UI.
    from hopscope.tracing.model import assemble
    from hopscope.tracing.records import new_span_id, new_trace_id
    from hopscope.tui.body_view import render_message
    from rich.console import Console

    ids = {"trace_id": f"{new_trace_id():032x}", "span_id": f"{new_span_id():016x}"}
    attrs = {
        "http.request.method": "GET",
        "url.path": "/t",
        "http.response.status_code": 200,
        "http.response.trailers": [["grpc-status", "0"], 5, None, ["only"], ["a", "b", "c"]],
    }
    start = {"kind": "span_start", "ts": 1_000, **ids, "parent_id": None, "hop": "app"}
    events = [
        start | {"name": "GET /t", "attrs": attrs},
        {"kind": "span_end", "ts": 2_000, **ids, "attrs": {}},
    ]
    (trace,) = assemble(events)
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(render_message(trace, "response"))
    shown = console.export_text()
    assert "Trailers" in shown and "grpc-status" in shown and "only" not in shown


def test_a_content_type_with_control_characters_never_reaches_the_terminal() -> None:
    # The Body heading names the Content-Type as the network sent it: an ESC there went
    # to the terminal raw (headers, paths and bodies were made printable, not this).
    from hopscope.tui.body_view import render_body
    from hopscope.tui.exchange import Body
    from rich.console import Console

    for data in (b"", b"hi"):
        captured = Body(
            data=data,
            size=len(data),
            truncated=False,
            content_type="text/plain\x1b]0;title\x07\x1b[31m",
            content_encoding="",
        )
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render_body(captured))
        shown = console.export_text()
        assert "\x1b" not in shown and "\x07" not in shown
        assert "text/plain␛]0;title␇␛[31m" in shown


def test_a_websocket_handshake_with_an_absolute_target_is_refused() -> None:
    """As the plain path refuses ``GET http://elsewhere/`` (never an open proxy): before,
    ``GET ws://elsewhere/ws`` went upstream as it was (with a prefix, ``/prefixws://...``)."""
    from test_proxy_user2 import REFUSED, exchange, scripted, websocket_head

    with scripted(lambda head: REFUSED) as (upstream, proxy):
        (response,) = exchange(proxy, websocket_head(b"ws://elsewhere.example/ws"), 1)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert b"not an open proxy" in response
        assert upstream.heads == []


def test_a_port_out_of_range_is_said_as_such(tmp_path: Path) -> None:
    """``--listen 127.0.0.1:99999`` said "expected HOST:PORT, ...", which it was."""
    from hopscope.tracing.sinks import parse_address

    with pytest.raises(ValueError, match=r"port 99999 is out of range \(0-65535\)"):
        parse_address("127.0.0.1:99999")
    assert parse_address("127.0.0.1:65535") == ("tcp", ("127.0.0.1", 65535))
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "tail", "--listen", "127.0.0.1:99999"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "out of range" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_replaying_marked_requests_that_were_evicted_says_so() -> None:
    """``r`` said "Select a request first" when every marked request had left the ring."""
    from hopscope.tui.app import HopscopeApp
    from hopscope.tui.source import QueueSource
    from test_tui_replay import recording, select_first
    from uitools import wait_for

    events = recording(4)
    first, rest = events[: len(events) // 4], events[len(events) // 4 :]
    source = QueueSource("test", live=False)
    source.push(first)
    app = HopscopeApp(source, max_requests=2)

    async def go() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await select_first(app, pilot)
            await pilot.press("m")
            await wait_for(pilot, lambda: len(app.marked) == 1, "the mark")
            source.push(rest)
            await wait_for(pilot, lambda: len(app.store) >= 2, "the newer requests")
            await pilot.press("r")
            await wait_for(
                pilot,
                lambda: any("no longer held" in str(n.message) for n in app._notifications),
                "the notification",
            )
            await pilot.press("q")

    asyncio.run(go())


@pytest.mark.parametrize(
    "command", [["view", "--headless"], ["tail"], ["export", "--har", "o.har"]]
)
def test_a_har_file_that_is_not_json_is_said_to_be_one_by_every_command(
    tmp_path: Path, command: list[str]
) -> None:
    """view and tail said "not a hopscope trace file (no header line)" of a broken
    ``.har`` while export said "not a HAR file": the file's name says what it meant."""
    (tmp_path / "broken.har").write_text("hello, not json\n")
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", *command[:1], "broken.har", *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["Error: broken.har is not a HAR file (not JSON)"]
