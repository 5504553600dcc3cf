"""``hopscope proxy``: real clients, a real proxy, real upstream servers on 127.0.0.1.

Most tests run the proxy in this process (uvicorn in a thread, records in a MemorySink)
so they can look at its pool; the cross-process tests run the ``hopscope proxy``
command itself, with the upstream sending its spans to the command's collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hopscope.app.proxy import ProxyApp, ProxyHttpProtocol
from hopscope.tracing import MemorySink, SocketSink, load
from hopscope.tracing.asgi import ASGIMiddleware
from hopscope.tracing.model import Span, Trace, assemble
from hopscope.tracing.servers.uvicorn_protocols import HttpToolsProtocol
from hopscope.tracing.sinks import Sink
from servers import uvicorn_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

HOST = "127.0.0.1"
MB = 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB of a known pattern
HOPSCOPE = [sys.executable, "-m", "hopscope.app"]

pytestmark = pytest.mark.timeout(60)


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``predicate`` until it is truthy (returns it) or ``timeout`` passes (fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


# -- the upstream app ----------------------------------------------------------------

gates: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return gates.setdefault(name, threading.Event())


async def wait_gate(name: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until the test opens the gate; polled, the gate is a thread's."""
    event = gate(name)
    deadline = time.monotonic() + timeout
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, headers={"x-received": str(len(body))})


async def count(request: Request) -> Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse(
        {
            "size": size,
            "sha256": digest.hexdigest(),
            "transfer-encoding": request.headers.get("transfer-encoding"),
            "content-length": request.headers.get("content-length"),
        }
    )


produced: dict[str, int] = {}


async def stall_upload(request: Request) -> Response:
    """Read the first chunk, wait for the gate, then read the rest."""
    stream = request.stream()
    size = len(await stream.__anext__())
    await wait_gate(request.query_params["gate"], timeout=20)
    async for chunk in stream:
        size += len(chunk)
    return JSONResponse({"size": size})


async def big(request: Request) -> Response:
    size = int(request.query_params["n"])
    tag = request.query_params.get("tag", "")

    async def blocks() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            chunk = BLOCK[: min(left, len(BLOCK))]
            left -= len(chunk)
            produced[tag] = produced.get(tag, 0) + len(chunk)
            yield chunk

    headers = {"content-length": str(size)} if "cl" in request.query_params else None
    return StreamingResponse(blocks(), headers=headers, media_type="application/octet-stream")


async def headers(request: Request) -> Response:
    response = JSONResponse([[k, v] for k, v in request.headers.items()])
    for name, value in [
        ("connection", "x-up-hop"),
        ("x-up-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("trailer", "x-t"),
        ("x-up-normal", "1"),
    ]:
        response.headers.append(name, value)
    return response


async def sse(request: Request) -> Response:
    name = request.query_params["gate"]

    async def events() -> AsyncIterator[str]:
        yield "data: one\n\n"
        await wait_gate(name)
        yield "data: two\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def slow(request: Request) -> Response:
    await wait_gate(request.query_params["gate"])
    return PlainTextResponse("slow done")


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text("echo:" + await websocket.receive_text())
    except WebSocketDisconnect:
        pass


def upstream_app(sink: Sink) -> Any:
    routes = [
        Route("/", hello, methods=["GET", "HEAD"]),
        Route("/echo", echo, methods=["POST"]),
        Route("/count", count, methods=["POST"]),
        Route("/stall-upload", stall_upload, methods=["POST"]),
        Route("/big", big),
        Route("/headers", headers),
        Route("/sse", sse),
        Route("/slow", slow),
        WebSocketRoute("/ws", ws_echo),
    ]
    return ASGIMiddleware(Starlette(routes=routes), sink=sink)


# -- servers ---------------------------------------------------------------------------


class Running:
    def __init__(self, url: str, server: uvicorn.Server) -> None:
        self.url = url
        self.server = server
        self.port = int(url.rsplit(":", 1)[1])

    @property
    def connections(self) -> int:
        return len(self.server.server_state.connections)


@contextlib.contextmanager
def serve(app: Any, **options: Any) -> Iterator[Running]:
    options = {"log_level": "critical", "timeout_graceful_shutdown": 2, **options}
    with uvicorn_thread(app, **options) as served:
        yield Running(served.url, served.server)


@contextlib.contextmanager
def upstream_server(sink: Sink | None = None) -> Iterator[Running]:
    """The app under uvicorn, recording its server hop and app spans into ``sink``."""
    sink = sink if sink is not None else MemorySink()

    class ServerHop(HttpToolsProtocol):  # type: ignore[misc]
        _hs_sink = sink

    with serve(upstream_app(sink), http=ServerHop) as running:
        yield running


class Proxy:
    def __init__(self, running: Running, app: ProxyApp, sink: MemorySink) -> None:
        self.url = running.url
        self.port = running.port
        self.app = app
        self.sink = sink
        self.running = running

    @property
    def connections(self) -> int:
        """Client connections open at the proxy."""
        return self.running.connections

    def stats(self) -> dict[str, int]:
        return self.app.stats()

    def traces(self, *others: MemorySink) -> list[Trace]:
        events = self.sink.events()
        for other in others:
            events += other.events()
        return assemble(events)

    def span(self, hop: str, path: str, *others: MemorySink) -> tuple[Trace, Span]:
        for trace in reversed(self.traces(*others)):
            for span in trace.spans.values():
                if span.hop == hop and span.attrs.get("url.path") == path:
                    return trace, span
        raise AssertionError(f"no {hop} span for {path}")


@contextlib.contextmanager
def proxy_to(upstream_url: str, keep_alive: float = 5.0, **options: Any) -> Iterator[Proxy]:
    """The proxy app served as ``hopscope proxy`` serves it (``keep_alive``: the idle
    timeout of client connections, uvicorn's default); ``options`` go to the app."""
    sink = MemorySink()
    app = ProxyApp(upstream_url, sink, **options)
    with serve(
        app,
        http=ProxyHttpProtocol,
        ws="websockets-sansio",
        lifespan="on",
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_keep_alive=keep_alive,
    ) as running:
        yield Proxy(running, app, sink)


@pytest.fixture
def up_sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def upstream(up_sink: MemorySink) -> Iterator[Running]:
    with upstream_server(up_sink) as running:
        yield running


@pytest.fixture
def proxy(upstream: Running) -> Iterator[Proxy]:
    with proxy_to(upstream.url) as running:
        yield running


def finished(proxy: Proxy, path: str) -> Span:
    """The client span of the last request to ``path``, once it has ended."""

    def ended() -> Span | None:
        with contextlib.suppress(AssertionError):
            _, span = proxy.span("client", path)
            return span if span.finished else None
        return None

    span: Span = wait_until(ended)
    return span


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: (\d+)", head)
                    if length and len(body) >= int(length[1]):
                        break
    return out


# -- forwarding ------------------------------------------------------------------------


def test_get_post_and_head_are_forwarded_byte_for_byte(proxy: Proxy) -> None:
    payload = os.urandom(200_000)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/").text == "Hello, world!"
        response = client.post("/echo", content=payload)
        assert response.status_code == 200
        assert response.content == payload
        assert response.headers["x-received"] == str(len(payload))
        head = client.head("/")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "13"
        # The connection that carried the HEAD is reused cleanly for the next request.
        assert client.get("/").text == "Hello, world!"
    span = finished(proxy, "/echo")
    assert span.attrs["http.request.body.size"] == len(payload)
    assert span.attrs["http.response.body.size"] == len(payload)
    assert span.body("response") == payload[:65536]


def test_one_trace_from_client_to_app(proxy: Proxy, up_sink: MemorySink) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/echo", content=b"ping").content == b"ping"
    finished(proxy, "/echo")
    trace, client_span = proxy.span("client", "/echo", up_sink)
    hops = {span.hop: span for span in trace.spans.values() if span.name == "POST /echo"}
    assert set(hops) == {"client", "proxy", "server", "app"}
    assert client_span.parent_id is None
    assert hops["proxy"].parent_id == client_span.span_id
    assert hops["server"].parent_id == hops["proxy"].span_id
    assert hops["app"].parent_id == hops["server"].span_id
    names = [event.name for event in hops["proxy"].events]
    assert names[:3] == ["upstream.connect", "request.sent", "response.start"]
    assert [e.name for e in client_span.events][:2] == ["request.head", "request.body"]
    # The server hop saw the proxy's X-Request-Start: a queue span in front of it.
    queue = [s for s in trace.spans.values() if s.attrs.get("span.kind") == "queue"]
    assert queue and queue[0].parent_id == hops["proxy"].span_id


def test_incoming_traceparent_is_joined(proxy: Proxy, up_sink: MemorySink) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        client.get("/", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    span = finished(proxy, "/")
    assert span.trace_id == trace_id and span.parent_id == parent
    app = wait_until(lambda: [s for t in assemble(up_sink.events()) for s in t.by_hop("app")])
    assert app[0].trace_id == trace_id


def test_headers_added_and_hop_by_hop_stripped_both_ways(proxy: Proxy) -> None:
    sent = {
        "connection": "keep-alive, x-client-hop",
        "x-client-hop": "1",
        "keep-alive": "timeout=5",
        "proxy-connection": "keep-alive",
        "te": "deflate",  # (TE: trailers is answered by the proxy's own: test_proxy_trailers)
        "proxy-authorization": "Basic eDp5",
        "trailer": "x-t",
        "x-forwarded-for": "203.0.113.7",
        "x-end-to-end": "kept",
    }
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        response = client.get("/headers", headers=sent)
    seen = dict(response.json())
    for name in ("x-client-hop", "keep-alive", "proxy-connection", "te", "trailer"):
        assert name not in seen, name
    assert "proxy-authorization" not in seen and "connection" not in seen
    assert seen["x-end-to-end"] == "kept"
    upstream_port = proxy.app.upstream.port
    assert seen["host"] == f"{HOST}:{upstream_port}"
    assert seen["x-forwarded-host"] == f"{HOST}:{proxy.port}"
    assert seen["x-forwarded-for"] == f"203.0.113.7, {HOST}"
    assert seen["x-forwarded-proto"] == "http"
    assert re.fullmatch(r"t=\d{16}", seen["x-request-start"])
    span = finished(proxy, "/headers")
    proxy_span = next(s for s in proxy.traces()[-1].spans.values() if s.hop == "proxy")
    assert seen["traceparent"] == f"00-{span.trace_id}-{proxy_span.span_id}-01"
    # and on the way back
    for name in ("x-up-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in response.headers, name
    assert response.headers["x-up-normal"] == "1"
    # The proxy span says what changed on the way, both ways.
    added = dict(proxy_span.attrs["proxy.request.headers.added"])
    assert added["traceparent"] == seen["traceparent"]
    assert added["host"] == seen["host"]
    removed = set(proxy_span.attrs["proxy.request.headers.removed"])
    assert {"x-client-hop", "keep-alive", "te", "proxy-authorization", "connection"} <= removed
    start = proxy_span.event("response.start")
    assert start is not None
    assert {"x-up-hop", "keep-alive", "connection"} <= set(
        start.attrs["proxy.response.headers.removed"]
    )
    assert ["x-up-normal", "1"] in span.attrs["http.response.headers"]


def test_chunked_upload_is_streamed_upstream(proxy: Proxy) -> None:
    # Larger than uvicorn's 64 KiB read buffer, so it cannot arrive as one message.
    parts = [os.urandom(128 * 1024) for _ in range(16)]
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        response = client.post("/count", content=iter(parts))
    result = response.json()
    assert result["size"] == sum(map(len, parts))
    assert result["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert result["transfer-encoding"] == "chunked"
    span = finished(proxy, "/count")
    assert span.attrs["http.request.body.size"] == result["size"]
    events = [e.name for e in span.events]
    assert events.count("request.body") <= 4


def test_slow_upstream_stalls_a_large_upload(proxy: Proxy) -> None:
    opened = gate("upload")
    sent = [0]

    def body() -> Iterator[bytes]:
        while not opened.is_set() and sent[0] < 500 * MB:
            sent[0] += len(BLOCK)
            yield BLOCK

    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(
            httpx.post(proxy.url + "/stall-upload?gate=upload", content=body(), timeout=30)
        )
    )
    worker.start()
    try:
        wait_until(stalled(lambda: sent[0]), timeout=20)
        assert sent[0] < 64 * MB
    finally:
        opened.set()
        worker.join(30)
    assert result and result[0].json()["size"] == sent[0]


def test_server_sent_events_arrive_as_they_are_sent(proxy: Proxy) -> None:
    opened = gate("sse")
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        with client.stream("GET", "/sse?gate=sse") as response:
            lines = response.iter_lines()
            assert next(lines) == "data: one"
            # The upstream is still holding the second event back: the first one came
            # through while the stream was open.
            assert not opened.is_set()
            opened.set()
            rest = [line for line in lines if line]
    assert rest == ["data: two"]


def test_keep_alive_connections_are_reused(proxy: Proxy, upstream: Running) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(50):
            assert client.get("/").status_code == 200
    assert proxy.stats()["created"] <= 2
    assert upstream.connections <= 2
    finished(proxy, "/")
    reused = [
        e.attrs["reused"]
        for t in proxy.traces()
        for s in t.spans.values()
        for e in s.events
        if e.name == "upstream.connect"
    ]
    assert len(reused) == 50 and sum(reused) >= 48


def test_websocket_messages_are_relayed(proxy: Proxy, up_sink: MemorySink) -> None:
    from websockets.sync.client import connect

    url = proxy.url.replace("http://", "ws://") + "/ws"
    with connect(url, open_timeout=5, close_timeout=5) as ws:
        for text in ("hello", "again"):
            ws.send(text)
            assert ws.recv(timeout=5) == f"echo:{text}"
    client_span = finished(proxy, "/ws")
    assert client_span.attrs["websocket.messages_in"] == 2
    assert client_span.attrs["websocket.messages_out"] == 2
    messages = [e.attrs for e in client_span.events if e.name == "websocket.message"]
    assert [m.get("text") for m in messages] == ["hello", "echo:hello", "again", "echo:again"]
    app = wait_until(
        lambda: [
            s
            for t in assemble(up_sink.events())
            for s in t.by_hop("app")
            if s.name == "WS /ws" and s.finished
        ]
    )
    trace, _ = proxy.span("client", "/ws")
    proxy_span = next(s for s in trace.spans.values() if s.hop == "proxy")
    assert app[0].trace_id == client_span.trace_id
    assert app[0].parent_id == proxy_span.span_id


def test_in_flight_request_is_visible_before_it_ends(proxy: Proxy) -> None:
    opened = gate("inflight")
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(
            httpx.get(proxy.url + "/slow?gate=inflight", timeout=15).status_code
        )
    )
    worker.start()
    try:
        started = wait_until(
            lambda: [r for r in proxy.sink.records() if r[0] == "s" and r[5] == "client"]
        )
        span_id = started[0][3]
        assert not any(r[0] == "e" and r[3] == span_id for r in proxy.sink.records())
        assert worker.is_alive() and not result
    finally:
        opened.set()
        worker.join(15)
    assert result == [200]


# -- faults ----------------------------------------------------------------------------


def proxy_error(proxy: Proxy, path: str) -> tuple[Span, Span]:
    client_span = finished(proxy, path)
    trace, _ = proxy.span("client", path)
    proxy_span = next(s for s in trace.spans.values() if s.hop == "proxy")
    return client_span, proxy_span


def test_upstream_down_is_a_502_in_the_trace(free_port: Callable[[], int]) -> None:
    with proxy_to(f"http://{HOST}:{free_port()}") as proxy:
        response = httpx.get(proxy.url + "/anything", timeout=10)
        assert response.status_code == 502
        assert "refused" in response.text
        client_span, proxy_span = proxy_error(proxy, "/anything")
        assert client_span.attrs["http.response.status_code"] == 502
        assert proxy_span.attrs["error"] is True
        assert proxy_span.attrs["error.type"] == "connect_failed"
        exception = proxy_span.event("exception")
        assert exception is not None and "refused" in exception.attrs["exception.message"]
        assert proxy.stats()["open"] == 0


CUT = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 5000


class RawUpstream:
    """A TCP server that answers every request with ``response`` and then closes (by
    default: a response cut in the middle of its body), counting connections."""

    def __init__(self, response: bytes = CUT) -> None:
        self.response = response
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.open = 0
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.open += 1
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    conn.sendall(self.response)
                    time.sleep(0.05)
            self.served += 1
            self.open -= 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_upstream_closing_mid_body_aborts_the_response() -> None:
    raw = RawUpstream()
    try:
        with proxy_to(f"http://{HOST}:{raw.port}") as proxy:
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.get(proxy.url + "/cut", timeout=10).read()
            client_span, proxy_span = proxy_error(proxy, "/cut")
            assert client_span.attrs["response.aborted"] is True
            assert client_span.attrs["http.response.body.size"] == 5000
            assert proxy_span.attrs["error.type"] == "upstream_closed"
            assert (
                "middle of the body"
                in proxy_span.event("exception").attrs[  # type: ignore[union-attr]
                    "exception.message"
                ]
            )
            wait_until(lambda: proxy.stats()["open"] == 0)
        assert raw.served == 1 and raw.open == 0
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("response", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 200, b"until the end"),
        (b"HTTP/1.0 201 Created\r\n\r\nold style", 201, b"old style"),
        (b"SMTP ready\r\n\r\n", 502, b"hopscope proxy: 502 upstream sent an invalid"),
        (b"", 502, b"hopscope proxy: 502 upstream closed the connection before responding"),
    ],
)
def test_responses_framed_by_close_and_broken_ones(
    response: bytes, status: int, body: bytes
) -> None:
    raw = RawUpstream(response)
    try:
        with proxy_to(f"http://{HOST}:{raw.port}") as proxy:
            got = httpx.get(proxy.url + "/raw", timeout=10)
            assert got.status_code == status
            assert got.content.startswith(body)
            _, proxy_span = proxy_error(proxy, "/raw")
            assert bool(proxy_span.attrs.get("error")) == (status == 502)
            wait_until(lambda: proxy.stats()["open"] == 0)
    finally:
        raw.close()


def test_websocket_refused_or_unreachable_upstream(
    proxy: Proxy, free_port: Callable[[], int]
) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as refused:
        connect(proxy.url.replace("http://", "ws://") + "/no-such-socket", open_timeout=5)
    assert refused.value.response.status_code == 403  # what the upstream answered
    with proxy_to(f"http://{HOST}:{free_port()}") as down:
        with pytest.raises(InvalidStatus) as failed:
            connect(down.url.replace("http://", "ws://") + "/ws", open_timeout=5)
        assert failed.value.response.status_code == 502
        _, proxy_span = proxy_error(down, "/ws")
        assert proxy_span.attrs["error"] is True


def stalled(counter: Callable[[], int]) -> Callable[[], bool]:
    """A predicate: true once ``counter`` stayed the same for ten polls in a row."""
    samples: list[int] = []

    def check() -> bool:
        samples.append(counter())
        return len(samples) > 10 and len(set(samples[-10:])) == 1

    return check


def test_slow_client_stalls_the_upstream_and_leaving_closes_it(
    proxy: Proxy, upstream: Running
) -> None:
    with socket.create_connection((HOST, proxy.port), timeout=5) as sock:
        sock.sendall(f"GET /big?n={500 * MB}&tag=slow HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 2 * MB:
            received += len(sock.recv(65536))
        # The client stops reading: the proxy must stop reading upstream too, so the
        # upstream's generator stalls once the socket buffers on the way are full.
        wait_until(stalled(lambda: produced.get("slow", 0)), timeout=20)
        assert produced["slow"] < 64 * MB
    span = finished(proxy, "/big")
    assert span.attrs["disconnected"] is True
    assert span.attrs["http.response.body.size"] < 64 * MB
    wait_until(lambda: proxy.stats()["open"] == 0)
    assert proxy.stats()["idle"] == 0
    wait_until(lambda: upstream.connections == 0)


def test_slow_upstream_is_a_504_after_the_read_timeout(upstream: Running) -> None:
    opened = gate("slow504")
    try:
        with proxy_to(upstream.url, read_timeout=0.3) as proxy:
            response = httpx.get(proxy.url + "/slow?gate=slow504", timeout=10)
            assert response.status_code == 504
            assert "0.3s" in response.text
            _, proxy_span = proxy_error(proxy, "/slow")
            assert proxy_span.attrs["error.type"] == "read_timeout"
            wait_until(lambda: proxy.stats()["open"] == 0)
            opened.set()
            wait_until(lambda: upstream.connections == 0)
    finally:
        opened.set()


def test_not_an_open_proxy(proxy: Proxy) -> None:
    absolute = raw_request(
        proxy.port, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    assert absolute.startswith(b"HTTP/1.1 400 ")
    assert b"absolute-form" in absolute
    connect = raw_request(
        proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    assert connect.split(b" ")[1] in (b"400", b"405")
    assert proxy.stats()["created"] == 0


def test_client_asking_to_close_gets_the_whole_response_first(proxy: Proxy) -> None:
    got = raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    assert body == b"Hello, world!"


# -- the command -----------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--listen", "--collector"])
def test_port_in_use_is_one_line_and_exit_1(option: str) -> None:
    with socket.create_server((HOST, 0)) as taken:
        addresses = {"--listen": f"{HOST}:0", "--collector": f"{HOST}:0"}
        addresses[option] = f"{HOST}:{taken.getsockname()[1]}"
        result = subprocess.run(
            [*HOPSCOPE, "proxy", "--upstream", "http://127.0.0.1:9"]
            + [item for pair in addresses.items() for item in pair],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "address already in use" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def rss_peak_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1])  # type: ignore[index]


@contextlib.contextmanager
def cli_proxy_process(*args: str, graceful: bool = True) -> Iterator[dict[str, Any]]:
    """``hopscope proxy ... ARGS`` in its own process, in front of an upstream that sends
    its spans to the proxy's collector: ``{"proc", "url", "sink"}`` (the upstream's).  On
    the way out, with ``graceful``: the sink flushed, then SIGINT (killed after 15 s);
    else killed."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        collector_port = probe.getsockname()[1]
    sink = SocketSink(f"tcp://{HOST}:{collector_port}")
    with upstream_server(sink) as upstream, socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
        probe.close()
        proc = subprocess.Popen(
            [*HOPSCOPE, "proxy", "--upstream", upstream.url, "--listen", f"{HOST}:{port}",
             "--collector", f"{HOST}:{collector_port}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: _answers(port) or proc.poll() is not None, timeout=20)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            yield {"proc": proc, "url": f"http://{HOST}:{port}", "sink": sink}
        finally:
            if graceful:
                sink.flush()
                proc.send_signal(signal.SIGINT)  # (none once it has ended)
            else:
                proc.kill()
            try:
                proc.wait(15 if graceful else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            sink.close()


@pytest.fixture(scope="module")
def cli_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``hopscope proxy`` in its own process; the upstream sends spans to its collector."""
    output = tmp_path_factory.mktemp("proxy") / "trace.jsonl"
    with cli_proxy_process("-o", str(output)) as running:
        yield {**running, "output": output}


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError):
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    return False


def test_command_puts_client_proxy_server_and_app_in_one_trace(cli_proxy: dict[str, Any]) -> None:
    payload = os.urandom(5000)
    with httpx.Client(base_url=cli_proxy["url"], timeout=10) as client:
        assert client.post("/echo", content=payload).content == payload
        assert client.get("/").text == "Hello, world!"
    cli_proxy["sink"].flush()

    def whole_trace() -> Trace | None:
        for trace in load(cli_proxy["output"]):
            hops = {s.hop for s in trace.spans.values() if s.name == "POST /echo" and s.finished}
            if hops == {"client", "proxy", "server", "app"}:
                return trace
        return None

    trace: Trace = wait_until(whole_trace)
    spans = {s.hop: s for s in trace.spans.values() if s.name == "POST /echo"}
    assert spans["app"].parent_id == spans["server"].span_id
    assert spans["server"].parent_id == spans["proxy"].span_id
    assert spans["proxy"].parent_id == spans["client"].span_id
    assert spans["client"].body("request") == payload
    assert spans["app"].body("response") == payload


def test_command_streams_100_mb_both_ways_in_bounded_memory(cli_proxy: dict[str, Any]) -> None:
    pid = cli_proxy["proc"].pid
    with httpx.Client(base_url=cli_proxy["url"], timeout=30) as client:
        client.get("/")
        before = rss_peak_kib(pid)
        digest = hashlib.sha256()
        size = 0
        with client.stream("GET", f"/big?n={100 * MB}&cl=1") as response:
            assert response.headers["content-length"] == str(100 * MB)
            for chunk in response.iter_raw(MB):
                digest.update(chunk)
                size += len(chunk)
        assert size == 100 * MB
        assert digest.hexdigest() == hashlib.sha256(BLOCK * 100).hexdigest()
        result = client.post("/count", content=(BLOCK for _ in range(100))).json()
        assert result["size"] == 100 * MB
        assert result["sha256"] == digest.hexdigest()
    growth_mib = (rss_peak_kib(pid) - before) / 1024
    assert growth_mib < 50, f"the proxy's peak memory grew by {growth_mib:.0f} MiB"


def test_command_stops_on_ctrl_c_with_a_summary(cli_proxy: dict[str, Any]) -> None:
    proc = cli_proxy["proc"]
    httpx.get(cli_proxy["url"] + "/", timeout=10)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert re.search(r"stopped after \d+ request", err)
    # The tail lines put the app's hops next to the proxy's, in one line per request.
    echo = [line for line in out.splitlines() if " POST /echo 200 " in line]
    assert echo and all(f" {hop}=" in echo[0] for hop in ("client", "proxy", "server", "app"))
    assert json.loads(Path(cli_proxy["output"]).read_text().splitlines()[0])
