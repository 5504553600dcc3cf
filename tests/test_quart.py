"""Quart (Flask's API on ASGI) wrapped in code, under its own server (hypercorn) and
uvicorn: the wrapped app must answer byte for byte as the bare one, and the trace must say
what happened.  Quart runs each request in a task of its own, and keeps its request in
contextvars: the two things a middleware most easily gets wrong around it.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
import websockets.sync.client
from hopscope.tracing import MemorySink, span
from hopscope.tracing.asgi import ASGIMiddleware
from hopscope.tracing.model import Span, Trace
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart, Response, request, websocket

TIMEOUT = 10.0


def quart_app() -> Quart:
    app = Quart("hopscope_quart_test")

    @app.route("/items/<int:item_id>")
    async def item(item_id: int) -> Any:
        return {"id": item_id, "q": request.args.get("q")}

    @app.route("/stream")
    async def stream() -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(6):
                yield f"part {i}\n".encode()

        return Response(chunks(), mimetype="text/plain")

    @app.route("/echo", methods=["POST"])
    async def echo() -> Any:
        body = await request.get_data()
        return Response(body, mimetype="application/octet-stream")

    @app.route("/boom")
    async def boom() -> Any:
        raise RuntimeError("quart view failed")

    @app.route("/spans")
    async def spans() -> Any:
        with span("lookup", table="users"):
            await asyncio.sleep(0)
        async with span("render"):
            pass
        return "done"

    @app.websocket("/ws")
    async def ws() -> None:
        while True:
            message = await websocket.receive()
            if message == "bye":
                await websocket.close(1000)
                return
            await websocket.send(f"echo:{message}")

    return app


# -- servers in a thread, on an ephemeral 127.0.0.1 port --------------------------------


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@contextmanager
def serve_hypercorn(app: Any) -> Iterator[str]:
    """Quart's own server in a thread; yields its base URL (like conftest's serve_asgi)."""
    sock = _listening_socket()
    config = HypercornConfig()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()

    async def main() -> None:
        started.set()
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(TIMEOUT)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    _wait_accepting(base)
    try:
        yield base
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "hypercorn did not stop"
        loop.close()
        sock.detach()  # hypercorn took the descriptor over and closed it


def _wait_accepting(base: str) -> None:
    """The first request answered (hypercorn has no "started" to wait on)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            httpx.get(f"{base}/items/0", timeout=TIMEOUT)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server did not answer"
            time.sleep(0.01)


def raw_exchange(base: str, data: bytes) -> bytes:
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(data)
        received = []
        while chunk := conn.recv(65536):
            received.append(chunk)
    return re.sub(rb"(?im)^date: [^\r]*\r\n", b"", b"".join(received))


RAW_REQUESTS = [
    b"GET /items/7?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 300000\r\n\r\n"
    + b"z" * 300_000,
    b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
]


def app_spans(sink: MemorySink) -> list[tuple[Trace, Span]]:
    found = []
    for trace in sink.traces():
        for span_ in trace.spans.values():
            if span_.hop == "app" and span_.parent_id is None:
                found.append((trace, span_))
    return found


def wait_for_spans(sink: MemorySink, count: int) -> list[tuple[Trace, Span]]:
    """The app spans once ``count`` of them ended (the server's thread ends them)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        spans = [(t, s) for t, s in app_spans(sink) if s.end is not None]
        if len(spans) >= count:
            return spans
        assert time.monotonic() < deadline, f"{len(spans)} of {count} requests ended"
        time.sleep(0.01)


# -- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
def test_quart_answers_byte_for_byte_like_the_bare_app(
    server: str, serve_asgi: Callable[[Any], AbstractContextManager[str]]
) -> None:
    serve = serve_hypercorn if server == "hypercorn" else serve_asgi
    with serve(quart_app()) as base:
        bare = [raw_exchange(base, r) for r in RAW_REQUESTS]
    sink = MemorySink()
    with serve(ASGIMiddleware(quart_app(), sink=sink)) as base:
        if server == "uvicorn":
            _wait_accepting(base)  # the same probe request as hypercorn's, to count alike
        wrapped = [raw_exchange(base, r) for r in RAW_REQUESTS]
    for sent, one, other in zip(RAW_REQUESTS, bare, wrapped, strict=True):
        assert other == one, sent.split(b"\r\n", 1)[0]
    assert b'"id":7' in bare[0] and b"part 5" in bare[1] and bare[4].endswith(b"z" * 300_000)
    assert bare[2].startswith(b"HTTP/1.1 404") and bare[3].startswith(b"HTTP/1.1 500")

    # The trace says what happened: one request span per request (the readiness probe's
    # and the six above), statuses and paths as sent, the upload counted whole.
    by_path: dict[str, list[Span]] = {}
    for _, span_ in wait_for_spans(sink, 1 + len(RAW_REQUESTS)):
        by_path.setdefault(span_.attrs["url.path"], []).append(span_)
    assert by_path["/items/7"][0].attrs["http.response.status_code"] == 200
    assert by_path["/nowhere"][0].attrs["http.response.status_code"] == 404
    assert by_path["/boom"][0].attrs["http.response.status_code"] == 500
    uploads = sorted(s.attrs["http.request.body.size"] for s in by_path["/echo"])
    assert uploads == [11, 300_000]
    streamed = by_path["/stream"][0]
    assert streamed.attrs["http.response.body.size"] == sum(len(f"part {i}\n") for i in range(6))


def test_quart_user_spans_nest_under_the_request_in_its_task() -> None:
    # Quart answers each request in a task it creates: the request's context must reach
    # it, or span() would record nothing.
    sink = MemorySink()
    with serve_hypercorn(ASGIMiddleware(quart_app(), sink=sink)) as base:
        answer = httpx.get(f"{base}/spans", timeout=TIMEOUT)
        assert answer.text == "done"
        spans = wait_for_spans(sink, 2)
    trace, request_span = next((t, s) for t, s in spans if s.attrs["url.path"] == "/spans")
    children = [s for s in trace.spans.values() if s.parent_id == request_span.span_id]
    assert [s.name for s in children] == ["lookup", "render"]
    assert children[0].attrs["table"] == "users"
    assert all(s.end is not None for s in children)


def test_quart_websocket_through_hypercorn_is_unchanged_and_recorded() -> None:
    sink = MemorySink()
    with serve_hypercorn(ASGIMiddleware(quart_app(), sink=sink)) as base:
        with websockets.sync.client.connect(f"ws{base[4:]}/ws") as ws:
            ws.send("one")
            assert ws.recv(timeout=TIMEOUT) == "echo:one"
            ws.send("two")
            assert ws.recv(timeout=TIMEOUT) == "echo:two"
            ws.send("bye")
            with pytest.raises(websockets.exceptions.ConnectionClosedOK):
                ws.recv(timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while True:
            spans = [s for t in sink.traces() for s in t.spans.values()]
            sockets = [s for s in spans if s.attrs.get("url.path") == "/ws"]
            if sockets and sockets[0].end is not None:
                break
            assert time.monotonic() < deadline, "websocket span did not end"
            time.sleep(0.01)
    attrs = sockets[0].attrs
    assert attrs["websocket.accepted"] is True
    assert (attrs["websocket.messages_in"], attrs["websocket.messages_out"]) == (3, 2)
    assert attrs["websocket.close_code"] == 1000
    messages = [e for e in sockets[0].events if e.name == "websocket.message"]
    assert len(messages) == 5
