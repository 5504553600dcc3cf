"""The demo: its app and traffic in process, and ``hopscope demo`` as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.app.demo.traffic import Traffic, steps
from hopscope.app.demo.webapp import create_app
from hopscope.app.demo.wsgi_mount import MAX_BODY
from hopscope.tracing import MemorySink, Trace, load

HOPSCOPE = [sys.executable, "-m", "hopscope.app"]
LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (\S+) (\S+) (?:\[\S+\] )?(\d{3}) ")

Serve = Callable[[Any], AbstractContextManager[str]]


def _wait_for(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _by_path(traces: list[Trace]) -> dict[str, Trace]:
    return {t.path or "": t for t in traces}


def _settled(traces: list[Trace]) -> bool:
    spans = [s for t in traces for s in t.spans.values()]
    return (
        len(traces) == len(steps())
        and all(s.finished for s in spans)
        and any(s.name == "background" for s in spans)
    )


@pytest.fixture
def demo_run(serve_asgi: Serve) -> Iterator[tuple[Traffic, MemorySink]]:
    sink = MemorySink()
    with serve_asgi(create_app(sink=sink)) as base:
        traffic = Traffic(base, delay=0)
        traffic.run(len(steps()))
        # A WebSocket's span ends when the app returns, after the client saw the close,
        # and background work is recorded after the response: wait for both.
        assert _wait_for(lambda: _settled(sink.traces())), "not every request was recorded"
        yield traffic, sink


def test_traffic_covers_every_kind_of_request(demo_run: tuple[Traffic, MemorySink]) -> None:
    traffic, sink = demo_run
    assert traffic.sent == len(steps()) == 10
    assert {200, 201, 404, 500, 101} <= set(traffic.statuses)
    traces = _by_path(sink.traces())
    assert len(traces) == 10
    assert traces["/api/nothing-here"].status == 404
    assert traces["/api/boom"].status == 500
    boom = traces["/api/boom"].root
    assert boom is not None and boom.event("exception") is not None
    assert "RuntimeError" in boom.event("exception").attrs["exception.stacktrace"]  # type: ignore[union-attr]


def test_demo_app_records_spans_bodies_and_the_wsgi_hop(
    demo_run: tuple[Traffic, MemorySink],
) -> None:
    traces = _by_path(demo_run[1].traces())
    slow = traces["/api/slow"]
    assert [s.name for s in slow.spans.values()].count("db.query") == 2
    download = traces["/api/download"].root
    assert download is not None
    assert download.attrs["http.response.body.size"] > 64 * 1024
    assert download.attrs["http.response.body.truncated"] is True
    upload = traces["/api/upload"]
    assert upload.status == 201 and upload.root is not None
    assert upload.root.body("request").startswith(b"[")
    background = traces["/api/background"]
    assert {s.name for s in background.spans.values()} >= {"background", "email.send"}
    ws = next(t for t in demo_run[1].traces() if t.root and t.root.name == "WS /ws/echo")
    assert ws.root is not None and ws.root.attrs["websocket.messages_in"] == 3
    # The mounted WSGI app's own span joins the ASGI request's trace, one level down.
    legacy = traces["/legacy/hello"]
    asgi = legacy.root
    assert asgi is not None and asgi.attrs["interface"] == "asgi"
    (wsgi,) = legacy.children(asgi)
    assert wsgi.attrs["interface"] == "wsgi" and wsgi.attrs["url.path"] == "/legacy/hello"
    assert [s.name for s in legacy.children(wsgi)] == ["legacy.lookup"]


def test_wsgi_bridge_refuses_big_bodies(serve_asgi: Serve) -> None:
    with serve_asgi(create_app(sink=MemorySink())) as base:
        response = httpx.post(f"{base}/legacy/hello", content=b"x" * (MAX_BODY + 1), timeout=10)
    assert response.status_code == 413


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_command_runs_n_requests_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    result = subprocess.run(
        [*HOPSCOPE, "demo", "--requests", "20", "--delay", "0", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    matches = [LINE.match(line) for line in result.stdout.splitlines()]
    lines = [m for m in matches if m]
    assert len(lines) >= 20, result.stdout
    statuses = {m.group(3) for m in lines}
    assert {"200", "404", "500"} <= statuses
    app_port = re.search(r"app on http://127\.0\.0\.1:(\d+)", result.stderr)
    collector_port = re.search(r"collector on tcp://127\.0\.0\.1:(\d+)", result.stderr)
    assert app_port and collector_port
    assert _port_closed(int(app_port.group(1)))
    assert _port_closed(int(collector_port.group(1)))
    assert len(load(out)) >= 20


def test_demo_stops_everything_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*HOPSCOPE, "demo", "--delay", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):  # a few requests went all the way round
            assert LINE.match(proc.stdout.readline())
        children = _children(proc.pid)
        assert children, "the demo app should run in a child process"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any(_alive(pid) for pid in children)


def test_demo_port_in_use_is_one_line_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*HOPSCOPE, "demo", "--port", str(port), "--requests", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "already in use" in line
