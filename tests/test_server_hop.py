"""The server hop: uvicorn protocol subclasses, queue time, Server-Timing, multi-worker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import MemorySink, load, wrap
from hopscope.tracing.queuetime import parse_request_start
from hopscope.tracing.servers.uvicorn_protocols import H11Protocol, HttpToolsProtocol
from servers import uvicorn_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

NOW = 1_764_000_000_000_000_000  # a fixed "now" in epoch ns


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"t=1764000000.123", 1_764_000_000_123_000_000),  # nginx ${msec}: seconds
        ("t=1764000000123", 1_764_000_000_123_000_000),  # Heroku: milliseconds
        ("t=1764000000123456", 1_764_000_000_123_456_000),  # Apache %t, hopscope: us
        ("1764000000123456789", 1_764_000_000_123_456_789),  # nanoseconds, no t=
        ("t=1764000000.5", 1_764_000_000_500_000_000),
    ],
)
def test_request_start_units_are_guessed_by_magnitude(value: Any, expected: int) -> None:
    assert parse_request_start(value, NOW + 10**9) == expected


@pytest.mark.parametrize("value", ["t=abc", "", "t=-5", "t=0", f"t={(NOW + 10**10) / 1e9}"])
def test_bad_or_future_request_start_is_ignored(value: str) -> None:
    assert parse_request_start(value, NOW) is None


def test_request_start_older_than_an_hour_is_ignored() -> None:
    assert parse_request_start(f"t={(NOW - 2 * 3600 * 10**9) // 1000}", NOW) is None


async def _item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["id"]})


def _app(sink: MemorySink) -> Any:
    return wrap(Starlette(routes=[Route("/items/{id}", _item)]), sink=sink)


@contextlib.contextmanager
def _serve(app: Any, protocol: type) -> Iterator[str]:
    with uvicorn_thread(app, http=protocol) as served:
        yield served.url


@pytest.mark.parametrize("protocol", [HttpToolsProtocol, H11Protocol])
def test_server_span_wraps_the_app_span(protocol: type, hop_sink: MemorySink) -> None:
    with _serve(_app(hop_sink), protocol) as base, httpx.Client(base_url=base) as client:
        start = time.time() - 0.004
        first = client.get("/items/1", headers={"x-request-start": f"t={start:.3f}"})
        second = client.get("/items/2")  # same kept-alive connection
    assert first.json() == {"id": "1"} and second.json() == {"id": "2"}
    assert "server-timing" not in first.headers  # hopscope changes no response unless asked
    traces = hop_sink.traces()
    assert len(traces) == 2
    for trace in traces:
        server = trace.root
        assert server is not None and server.hop == "server" and server.finished
        (app,) = [s for s in trace.by_hop("app") if "interface" in s.attrs]
        assert app.parent_id == server.span_id
        assert server.start is not None and app.start is not None and app.end is not None
        assert server.start <= app.start and app.end <= (server.end or 0)
        assert [e.name for e in server.events] == ["request.head", "response.head"]
    queued, plain = traces
    (queue,) = [s for s in queued.spans.values() if s.name == "queue"]
    assert queue.end == queued.root.start  # type: ignore[union-attr]
    assert (queue.duration_ns or 0) >= 3_000_000
    assert not [s for s in plain.spans.values() if s.name == "queue"]
    assert queued.root.attrs["connection.request_number"] == 1  # type: ignore[union-attr]
    assert plain.root.attrs["connection.request_number"] == 2  # type: ignore[union-attr]


def test_incoming_traceparent_is_joined_by_server_and_app(hop_sink: MemorySink) -> None:
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with _serve(_app(hop_sink), HttpToolsProtocol) as base:
        httpx.get(f"{base}/items/9", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    (trace,) = hop_sink.traces()
    assert trace.trace_id == trace_id
    assert trace.root is not None and trace.root.parent_id == parent


def test_server_timing_only_when_asked(
    hop_sink: MemorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOPSCOPE_SERVER_TIMING", "1")
    with _serve(_app(hop_sink), H11Protocol) as base:
        start = time.time() - 0.002
        response = httpx.get(f"{base}/items/3", headers={"x-request-start": f"t={start:.6f}"})
    timing = response.headers["server-timing"]
    assert timing.startswith("queue;dur=") and "server;dur=" in timing
    assert response.json() == {"id": "3"}


def test_client_gone_before_response_ends_the_server_span(hop_sink: MemorySink) -> None:
    import asyncio

    gate = threading.Event()

    async def slow(request: Request) -> JSONResponse:
        gate.set()
        await asyncio.sleep(0.5)
        return JSONResponse({})

    app = wrap(Starlette(routes=[Route("/slow", slow)]), sink=hop_sink)
    with _serve(app, HttpToolsProtocol) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            assert gate.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            traces = hop_sink.traces()
            if traces and traces[0].root is not None and traces[0].root.finished:
                break
            time.sleep(0.02)
    (trace,) = hop_sink.traces()
    assert trace.root is not None and trace.root.attrs.get("disconnected") is True


def test_multiple_uvicorn_workers_each_record_with_their_pid(tmp_path: Path) -> None:
    """``--http module:Class`` with two spawned workers and a file sink from the environment."""
    (tmp_path / "hop_demo_app.py").write_text(
        textwrap.dedent(
            """
            import os
            from hopscope.tracing import wrap

            async def app(scope, receive, send):
                if scope["type"] != "http":
                    return
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

            app = wrap(app)
            """
        )
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    trace_file = tmp_path / "trace.jsonl"
    env = {**os.environ, "HOPSCOPE_SINK": f"file:{trace_file}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "hop_demo_app:app",
            "--port",
            str(port),
            "--workers",
            "2",
            "--log-level",
            "warning",
            "--http",
            "hopscope.tracing.servers.uvicorn_protocols:HttpToolsProtocol",
        ],
        cwd=tmp_path,
        env=env,
    )
    pids: set[str] = set()
    try:
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            try:
                # A new connection each time, so both workers get some.
                pids.add(httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text)
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert len(pids) == 2
    traces = load(trace_file)
    seen = {str(span.attrs.get("process.pid")) for t in traces for span in t.spans.values()}
    assert pids <= seen
    for trace in traces:
        assert {s.hop for s in trace.spans.values()} == {"server", "app"}


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_hooks_record_the_server_span_around_the_wsgi_app(
    tmp_path: Path, worker: str
) -> None:
    (tmp_path / "hop_wsgi_app.py").write_text(
        textwrap.dedent(
            """
            from hopscope.tracing import wrap

            def app(environ, start_response):
                start_response("200 OK", [("content-type", "text/plain")])
                return [b"hello"]

            app = wrap(app)
            """
        )
    )
    # The user's own gunicorn.conf.py: its settings and hooks must still apply.
    (tmp_path / "gunicorn.conf.py").write_text(
        textwrap.dedent(
            """
            import os
            workers = 2
            def pre_request(worker, req):
                with open("user-hook.log", "a") as f:
                    f.write(f"{os.getpid()}\\n")
            """
        )
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    trace_file = tmp_path / "trace.jsonl"
    env = {**os.environ, "HOPSCOPE_SINK": f"file:{trace_file}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:hopscope.tracing.servers.gunicorn_conf",
            "-b",
            f"127.0.0.1:{port}",
            "-k",
            worker,
            "hop_wsgi_app:app",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        answered = 0
        while answered < 6 and time.monotonic() < deadline:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=2).text == "hello"
                answered += 1
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert answered == 6
    traces = load(trace_file)
    assert len(traces) == 6
    for trace in traces:
        server = trace.root
        assert server is not None and server.hop == "server" and server.finished
        expected = {"sync": "SyncWorker", "gthread": "ThreadWorker"}[worker]
        assert server.attrs["server.worker.class"] == expected
        assert server.attrs["http.response.status_code"] == 200
        (app,) = [s for s in trace.by_hop("app") if "interface" in s.attrs]
        assert app.parent_id == server.span_id
    assert len((tmp_path / "user-hook.log").read_text().split()) == 6
    pids = set((tmp_path / "user-hook.log").read_text().split())
    assert len(pids) <= 2  # the user's `workers = 2` held
    recorded = {str(t.root.attrs.get("server.worker.pid")) for t in traces if t.root}
    assert recorded == pids
