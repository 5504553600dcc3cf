"""Text lines never carry captured text raw to the terminal.

Why: a path, route, span name or exception type comes from the network or from an app.
Printed raw by ``hopscope tail`` (or ``--headless``), an ESC in a request's path would
recolour or clear the user's terminal, and a bidi override (U+202E) would reorder the
line around it.  The UI shows such characters as symbols and escapes; the lines must too,
and hopscope's own colouring (``--color``) must still reach the terminal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
from hopscope.app.tail import format_line
from hopscope.tracing import FileSink, wrap
from hopscope.tracing.model import assemble
from hopscope.tracing.records import new_span_id, new_trace_id, to_events
from test_run import _free_port

HOSTILE = "/a\x1b[2J\x9bred\u202ex\u200b"
SHOWN = "/a\u241b[2J\\x9bred\\u202ex\\u200b"


def _raw(line: str) -> list[str]:
    """The characters of ``line`` a terminal would act on or hide."""
    return [char for char in line if not char.isprintable()]


def _trace(path: str, name: str) -> object:
    trace_id, span_id, user_id = new_trace_id(), new_span_id(), new_span_id()
    t = time.time_ns()
    records = [
        ("s", t, trace_id, span_id, 0, "app", f"GET {path}", 1,
         {"http.request.method": "GET", "url.path": path, "http.route": path + "{x}"}),
        ("s", t + 10, trace_id, user_id, span_id, "app", name, 1, {"span.kind": "user"}),
        ("e", t + 20, trace_id, user_id, {}),
        ("p", t + 30, trace_id, span_id, "exception", {"exception.type": "app.\u202eBoom"}),
        ("e", t + 40, trace_id, span_id, {"http.response.status_code": 500}),
    ]  # fmt: skip
    (trace,) = assemble([e for r in records for e in to_events(r)])
    return trace


def test_a_line_shows_control_and_invisible_characters_as_the_ui_does() -> None:
    line = format_line(_trace(HOSTILE, "db\x1b]0;title\x07"))  # type: ignore[arg-type]
    assert _raw(line) == []
    assert f" {SHOWN} " in line
    assert "db\u241b]0;title\u2407=" in line
    assert "error=\\u202eBoom" in line


def test_colour_is_still_hopscopes_own() -> None:
    line = format_line(_trace(HOSTILE, "db"), color=True)  # type: ignore[arg-type]
    assert click.style("500", fg="red", bold=True) in line  # the status keeps its colour
    assert _raw(click.unstyle(line)) == []
    assert f" {SHOWN} " in line
    # Plain text in colour mode: one ESC sequence, the status's, and nothing else changed.
    plain = format_line(_trace("/ok", "db"), color=True)  # type: ignore[arg-type]
    assert _raw(click.unstyle(plain)) == []
    assert " /ok " in plain


def test_hopscope_tail_of_a_file(tmp_path: Path, serve_asgi: object) -> None:
    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    path = tmp_path / "t.jsonl"
    sink = FileSink(path)
    with serve_asgi(wrap(app, sink=sink)) as base:  # type: ignore[operator]
        httpx.get(f"{base}/a%1B%5B2J%E2%80%AEx")
    sink.close()
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "tail", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert _raw(line) == []
    assert " /a\u241b[2J\\u202ex 200 " in line


def test_hopscope_proxy_headless_lines(tmp_path: Path) -> None:
    upstream, port = _free_port(), _free_port()
    (tmp_path / "hello.py").write_text(
        "async def app(scope, receive, send):\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
    )
    bin_dir = os.path.dirname(sys.executable)
    server = subprocess.Popen(
        [os.path.join(bin_dir, "uvicorn"), "hello:app", "--port", str(upstream),
         "--log-level", "warning", "--lifespan", "off"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proxy = subprocess.Popen(
        [sys.executable, "-m", "hopscope.app", "proxy", "--upstream",
         f"http://127.0.0.1:{upstream}", "--listen", f"127.0.0.1:{port}",
         "--collector", "127.0.0.1:0", "--headless"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"GET /a%1B%5B2J%E2%80%AEx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            while sock.recv(65536):
                pass
        time.sleep(0.5)  # the line is held a moment for late spans
    finally:
        proxy.terminate()
        out, _ = proxy.communicate(timeout=30)
        server.terminate()
        server.wait(30)
    (line,) = [line for line in out.splitlines() if " /a" in line]
    assert _raw(line) == []
    assert " /a\u241b[2J\\u202ex 200 " in line
