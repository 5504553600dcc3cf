"""The commands' UI: sessions built by the command functions, driven with Textual's pilot.

Everything is real: the collector and the demo's engine are child processes, the demo
app is uvicorn with hopscope's server hook behind hopscope's proxy, the watched app is a
wrapped Starlette app sending through a SocketSink.  After ``q`` each test checks that
no process it started is still running and no port it opened still accepts.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.demo.run import build_demo_app
from hopscope.app.run import build_run_target_app
from hopscope.app.ui import Session, build_proxy_app, build_view_app, build_watch_app
from hopscope.tracing import SocketSink, wrap
from hopscope.tracing.model import Trace
from hopscope.tracing.records import new_span_id, new_trace_id, to_events
from hopscope.tui.app import HopscopeApp
from hopscope.tui.save import write_trace_file
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from textual.pilot import Pilot
from uitools import wait_for

SIZE = (120, 35)
WAIT = 30.0

Scenario = Callable[[HopscopeApp, Pilot[None]], Awaitable[None]]


# -- processes and ports ---------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _accepts(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) == 0


@pytest.fixture
def started() -> Iterator[Callable[[Callable[[], Session]], Session]]:
    """``started(build)`` builds a session and notes the processes it started; at the end
    the session is closed (as the command does after the UI) and checked to have left
    no process running and no port open."""
    sessions: list[tuple[Session, set[int]]] = []

    def build(make: Callable[[], Session]) -> Session:
        before = _descendants(os.getpid())
        session = make()
        sessions.append((session, _descendants(os.getpid()) - before))
        return session

    yield build
    for session, pids in sessions:
        session.close()
        assert not [pid for pid in pids if _running(pid)], "a child process is still running"
        opened = [url for url in session.urls.values() if _accepts(url)]
        assert not opened, f"still listening: {opened}"


def drive(session: Session, scenario: Scenario, quit_key: str = "q") -> None:
    """Run ``scenario`` in the session's app, then press ``quit_key``: the app must end."""

    async def main() -> None:
        app = session.app
        async with app.run_test(size=SIZE) as pilot:
            await scenario(app, pilot)
            await pilot.press(quit_key)
            deadline = time.monotonic() + 5
            while app.is_running and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not app.is_running, f"{quit_key} did not end the app"

    asyncio.run(main())


def traces(app: HopscopeApp) -> list[Trace]:
    return [row.trace for row in app.store.rows.values()]


def list_text(app: HopscopeApp) -> str:
    request_list = app.request_list
    height = request_list.scrollable_content_region.height
    return "\n".join(request_list.render_line(y).text for y in range(height))


# -- demo ---------------------------------------------------------------------------------------


def _every_hop(app: HopscopeApp) -> Trace | None:
    for trace in traces(app):
        if trace.path == "/api/slow" and trace.finished:
            if {span.hop for span in trace.spans.values()} >= {"client", "proxy", "server", "app"}:
                return trace
    return None


def test_demo_shows_every_hop_of_the_demo_apps_requests_in_one_trace(
    started: Callable[[Callable[[], Session]], Session], tmp_path: Path
) -> None:
    out = tmp_path / "demo.jsonl"
    session = started(lambda: build_demo_app(delay=0.02, requests=12, output=str(out)))
    assert set(session.urls) == {"proxy", "app", "collector"}

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        trace = await wait_for(pilot, lambda: _every_hop(app), "a request with every hop")
        root = trace.root
        # The traffic generator's span is the root; the proxy joined it by traceparent.
        assert root is not None and root.hop == "client"
        assert str(root.attrs["user_agent.original"]).startswith("python-httpx/")
        names = [event.name for event in root.events]
        assert {"request.head.sent", "request.sent", "response.start", "response.end"} <= set(names)
        (proxy_side,) = trace.children(root)
        assert proxy_side.hop == "client"  # the request as the proxy got it
        assert [s.hop for s in trace.children(proxy_side)] == ["proxy"]
        assert any(s.name == "db.query" for s in trace.spans.values())
        await wait_for(pilot, lambda: "/api/slow" in list_text(app), "the row on screen")
        assert app.live and app.recording == str(out)

    drive(session, scenario)
    session.close()
    saved = out.read_text().splitlines()
    assert json.loads(saved[0])["format"] == "hopscope" and len(saved) > 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
    return seen


def test_demo_in_a_real_terminal_stops_everything_on_q(tmp_path: Path) -> None:
    port, out = _free_port(), tmp_path / "demo.jsonl"
    fd, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 35, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hopscope.app", "demo", "--port", str(port), "-o", str(out)],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=dict(os.environ, TERM="xterm-256color"),
        start_new_session=True,
    )
    os.close(terminal)
    try:
        screen = _read_until(fd, b"/api/slow", WAIT)
        assert b"/api/slow" in screen, screen[-2000:]
        helpers = _descendants(proc.pid)
        assert len(helpers) >= 3  # collector, demo engine, demo app
        os.write(fd, b"q")
        deadline = time.monotonic() + WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            _read_until(fd, b"\x00", 0.1)  # keep the terminal drained
        assert proc.returncode == 0, "q did not end hopscope cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
    assert not [p for p in helpers if _running(p)]
    assert not _accepts(f"http://127.0.0.1:{port}")
    assert len(out.read_text().splitlines()) > 10


def test_ctrl_c_stops_the_demo_too(started: Callable[[Callable[[], Session]], Session]) -> None:
    session = started(lambda: build_demo_app(delay=0.05))

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: app.store.rows, "a first request")

    drive(session, scenario, quit_key="ctrl+c")


# -- view ----------------------------------------------------------------------------------------


def _saved(path: Path, paths: list[str]) -> None:
    events: list[dict[str, Any]] = []
    t = time.time_ns()
    for n, url_path in enumerate(paths):
        start = t + n * 10_000_000
        attrs = {
            "http.request.method": "GET",
            "url.path": url_path,
            "http.response.status_code": 200 + n,
        }
        ids = (new_trace_id(), new_span_id(), 0)
        record = ("c", start, start + 2_000_000, *ids, "app", f"GET {url_path}", 1, attrs)
        events += to_events(record, {"process.pid": 1})
    write_trace_file(str(path), events)


def test_view_shows_a_saved_files_requests(
    started: Callable[[Callable[[], Session]], Session], tmp_path: Path
) -> None:
    path = tmp_path / "saved.jsonl"
    _saved(path, ["/first", "/second", "/third"])
    session = started(lambda: build_view_app(str(path)))

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: len(app.store.rows) == 3, "the file's three requests")
        assert [t.path for t in traces(app)] == ["/first", "/second", "/third"]
        assert [t.status for t in traces(app)] == [200, 201, 202]
        assert not app.live
        await wait_for(pilot, lambda: "/third" in list_text(app), "the rows on screen")

    drive(session, scenario)


def test_view_opens_a_har_file(started: Callable[[Callable[[], Session]], Session]) -> None:
    har = Path(__file__).parent / "data" / "chrome.har"
    entries = json.loads(har.read_text())["log"]["entries"]
    session = started(lambda: build_view_app(str(har)))

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: len(app.store.rows) == len(entries), "the HAR's entries")
        assert {t.method for t in traces(app)} == {e["request"]["method"] for e in entries}

    drive(session, scenario)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot open"),
        ("this is not a trace\n", "not a hopscope trace file"),
        ('{"log": {"version": "1.2"}}', "no log.entries"),
    ],
    ids=["missing", "garbage", "broken-har"],
)
def test_view_bad_file_is_one_line_exit_1_and_no_ui(
    tmp_path: Path, content: str | None, fragment: str
) -> None:
    path = tmp_path / "bad"
    if content is not None:
        path.write_text(content)
    for mode in ("--ui", "--headless"):
        result = CliRunner().invoke(main, ["view", mode, str(path)])
        assert result.exit_code == 1, result.output
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
        assert "Traceback" not in result.output and "\x1b[" not in result.output


@pytest.mark.parametrize("command", ["demo", "watch"])
def test_a_port_in_use_is_one_line_before_any_ui(command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        option = ["--port", str(port)] if command == "demo" else ["--listen", f"127.0.0.1:{port}"]
        result = CliRunner().invoke(main, [command, "--ui", *option])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "already in use" in err, err


def test_without_a_terminal_view_prints_lines_instead_of_a_ui(tmp_path: Path) -> None:
    path = tmp_path / "saved.jsonl"
    _saved(path, ["/first", "/second"])
    result = CliRunner().invoke(main, ["view", str(path)])  # CliRunner's stdout is no tty
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "GET /first 200" in lines[0]


# -- watch, proxy, run ---------------------------------------------------------------------------


async def _index(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "path": request.url.path})


def _starlette() -> Starlette:
    return Starlette(routes=[Route("/{name}", _index)])


def test_watch_shows_a_wrapped_apps_requests(
    started: Callable[[Callable[[], Session]], Session], serve_asgi: Any
) -> None:
    session = started(lambda: build_watch_app("127.0.0.1:0"))
    sink = SocketSink(session.urls["collector"])
    try:
        with serve_asgi(wrap(_starlette(), sink=sink)) as base:

            async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
                async with httpx.AsyncClient(base_url=base) as client:
                    for name in ("alpha", "beta", "gamma"):
                        assert (await client.get(f"/{name}")).status_code == 200
                await wait_for(pilot, lambda: len(app.store.rows) == 3, "three requests")
                assert [t.path for t in traces(app)] == ["/alpha", "/beta", "/gamma"]
                assert "watch tcp://127.0.0.1:" in app.source.describe()

            drive(session, scenario)
    finally:
        sink.close()


def test_proxy_ui_records_the_client_and_proxy_hops(
    started: Callable[[Callable[[], Session]], Session], serve_asgi: Any
) -> None:
    with serve_asgi(_starlette()) as upstream:
        session = started(
            lambda: build_proxy_app(upstream, listen="127.0.0.1:0", collector="127.0.0.1:0")
        )
        front = session.urls["proxy"]

        async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
            async with httpx.AsyncClient(base_url=front) as client:
                assert (await client.get("/through")).json()["path"] == "/through"
            trace = await wait_for(
                pilot, lambda: [t for t in traces(app) if t.finished], "the proxied request"
            )
            assert {s.hop for s in trace[0].spans.values()} == {"client", "proxy"}
            assert trace[0].status == 200

        drive(session, scenario)


APP = """
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def pid(request):
    return JSONResponse({"pid": os.getpid()})

app = Starlette(routes=[Route("/pid", pid)])
"""


def test_run_target_under_the_ui_and_its_exit_status(
    started: Callable[[Callable[[], Session]], Session], tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(APP)
    session = started(lambda: build_run_target_app("app:app", port=0, app_dir=str(tmp_path)))
    assert set(session.urls) == {"app", "proxy", "collector"}

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        async with httpx.AsyncClient(base_url=session.urls["proxy"]) as client:
            pid = (await client.get("/pid")).json()["pid"]
        # The proxy and the app process send their parts separately: wait for all of them.
        hops = {"client", "proxy", "server", "app"}
        trace = await wait_for(
            pilot,
            lambda: [
                t for t in traces(app) if t.finished and {s.hop for s in t.spans.values()} >= hops
            ],
            "the request through every hop",
        )
        assert trace[0].by_hop("app")[0].attrs["process.pid"] == pid

    drive(session, scenario)
    session.close()
    assert session.exit_status == 0  # stopped by us, as after Ctrl+C


def test_run_target_that_cannot_load_fails_before_any_ui(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["run", "--ui", "--port", "0", "--app-dir", str(tmp_path), "missing:app"]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == "Error: missing:app exited with status 1"
    assert "no module named 'missing'" in result.stderr
