"""WebSocket gaps closed in session 11: real uvicorn on 127.0.0.1 for each of its WebSocket
implementations, real clients (raw sockets where a client must misbehave).

* an upgrade the WebSocket library refuses before uvicorn calls the app has a server span;
* wsproto's closes that get no answer, and its 1009, keep their close code;
* ``hopscope run TARGET --ws``;
* ``hopscope proxy --keep-host`` sends the client's Host with a WebSocket handshake too.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from hopscope.tracing import MemorySink, Span, Trace, wrap
from hopscope.tracing.servers.uvicorn_protocols import H11Protocol, HttpToolsProtocol
from hopscope.tracing.servers.uvicorn_ws import ws_protocol
from servers import ws_echoes, ws_handshake
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

IMPLEMENTATIONS = ["websockets", "websockets-sansio", "wsproto"]
#: uvicorn's legacy implementation passes websockets a handler it deprecates (uvicorn's own).
pytestmark = pytest.mark.filterwarnings("ignore:remove second argument of ws_handler")
TRACE_ID, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
#: ``--ws-max-size`` for these servers: a message past it is closed with 1009.
MAX_SIZE = 1024
#: uvicorn's wait for the answer to a close (10 s), made short for the test.
CLOSE_TIMEOUT = 0.3


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)


async def close_4003(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.receive_text()
    await websocket.close(code=4003)


def _app(sink: MemorySink) -> Any:
    routes = [WebSocketRoute("/echo", echo), WebSocketRoute("/close", close_4003)]
    return wrap(Starlette(routes=routes), sink=sink)


def _impl(name: str) -> Any:
    if name == "wsproto":
        pytest.importorskip("wsproto")
    with warnings.catch_warnings():  # (uvicorn's legacy implementation is deprecated)
        warnings.simplefilter("ignore")
        ws = ws_protocol(name)
    assert ws.__module__ == "hopscope.tracing.servers.uvicorn_ws"
    return ws


def _short_close_timeout(ws: Any) -> Any:
    """The traced class with uvicorn's close timeout (an attribute its protocols set, no
    setting) cut short: what happens when the client never answers comes sooner."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        ws.__init__(self, *args, **kwargs)
        self.close_timeout = CLOSE_TIMEOUT

    return type(ws.__name__, (ws,), {"__init__": __init__})


@pytest.fixture
def serve(hop_sink: MemorySink) -> Iterator[Callable[..., tuple[str, int]]]:
    """``serve(ws_class, http=...)``: the app under a real uvicorn in a thread; returns
    (host, port).  Stopped at the end."""
    servers: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start(ws: Any, http: Any = HttpToolsProtocol) -> tuple[str, int]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        config = uvicorn.Config(
            _app(hop_sink),
            http=http,
            ws=ws,
            log_level="critical",
            lifespan="off",
            ws_ping_interval=None,
            ws_max_size=MAX_SIZE,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        return sock.getsockname()[:2]

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _server_spans(sink: MemorySink, path: str, count: int = 1) -> list[Span]:
    """The finished server spans named ``WS path`` (waited for, ``count`` of them)."""
    deadline = time.monotonic() + 10
    while True:
        spans = [
            s
            for trace in sink.traces()
            for s in trace.by_hop("server")
            if s.name == f"WS {path}" and s.finished
        ]
        if len(spans) >= count:
            return spans
        assert time.monotonic() < deadline, f"no finished server span for {path}"
        time.sleep(0.02)


def _trace_of(sink: MemorySink, span: Span) -> Trace:
    (trace,) = [t for t in sink.traces() if span.span_id in t.spans]
    return trace


def _exchange(address: tuple[str, int], head: bytes) -> bytes:
    """Send ``head`` on a new connection; everything the server sends until it closes."""
    with socket.create_connection(address, timeout=5) as raw:
        raw.sendall(head)
        data = b""
        while chunk := raw.recv(4096):
            data += chunk
    return data


# -- 1. handshakes the WebSocket library refuses before the app is called ------------------

NO_KEY = (
    b"GET /echo?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\ntraceparent: 00-" + TRACE_ID.encode() + b"-"
    b"" + PARENT.encode() + b"-01\r\n\r\n"
)
BAD_VERSION = (
    b"GET /echo HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("http", [HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def test_refused_handshake_has_a_server_span(
    name: str, http: Any, serve: Callable[..., tuple[str, int]], hop_sink: MemorySink
) -> None:
    """No Sec-WebSocket-Key, then a Sec-WebSocket-Version the library does not speak:
    each is answered by the library itself (the app is never called), and each has a
    server span with that answer, what was wrong, and no app call; the first continues
    the caller's trace."""
    address = serve(_impl(name), http=http)
    answers = [_exchange(address, NO_KEY), _exchange(address, BAD_VERSION)]
    statuses = [int(answer.split(b" ", 2)[1]) for answer in answers]
    assert all(status in (400, 426) for status in statuses), answers
    spans = sorted(_server_spans(hop_sink, "/echo", 2), key=lambda s: s.start or 0)
    assert len(spans) == 2  # one each, no more
    for span, status in zip(spans, statuses, strict=True):
        assert span.attrs["http.response.status_code"] == status
        assert span.attrs["websocket.accepted"] is False
        assert span.attrs["websocket.closed_by"] == "server"
        assert span.attrs["error"] is True
        assert span.attrs["exception.type"]
        assert "websocket.close_code" not in span.attrs
        assert span.attrs["url.path"] == "/echo"
        assert span.attrs["network.protocol.name"] == "websocket"
        assert span.attrs["process.pid"] == os.getpid()
        assert [e.name for e in span.events] == [
            "request.head",
            "response.head",
            "connection.close",
        ]
        assert span.events[1].attrs == {"http.response.status_code": status}
        assert not _trace_of(hop_sink, span).by_hop("app")  # the app never saw it
    assert "Sec-WebSocket-Key" in spans[0].attrs["exception.message"]
    assert "Sec-WebSocket-Version" in spans[1].attrs["exception.message"]
    assert spans[0].trace_id == TRACE_ID and spans[0].parent_id == PARENT


# -- 2. close codes under wsproto (and the others, pinned alike) ----------------------------


def _frame(opcode: int, payload: bytes) -> bytes:
    """A client's frame: masked (with a zero key, so the payload reads as it is)."""
    size = len(payload)
    head = bytes([0x80 | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    return head + b"\0\0\0\0" + payload


def _read_close(raw: socket.socket) -> int:
    """Read until the server's close frame; its code."""
    data = b""
    while True:
        while len(data) >= 2 and len(data) >= 2 + (data[1] & 0x7F):
            opcode, size = data[0] & 0x0F, data[1] & 0x7F
            payload, data = data[2 : 2 + size], data[2 + size :]
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")
        chunk = raw.recv(4096)
        assert chunk, "closed without a close frame"
        data += chunk


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_message_too_big_is_closed_with_1009(
    name: str, serve: Callable[..., tuple[str, int]], hop_sink: MemorySink
) -> None:
    host, port = serve(_impl(name))
    with connect(f"ws://{host}:{port}/echo", open_timeout=5) as ws:
        ws.send("x" * (MAX_SIZE + 1))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert ws.close_code == 1009
    (server,) = _server_spans(hop_sink, "/echo")
    assert server.attrs["websocket.close_code"] == 1009
    assert server.attrs["websocket.closed_by"] == "server"


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_app_close_the_client_leaves_unanswered(
    name: str, serve: Callable[..., tuple[str, int]], hop_sink: MemorySink
) -> None:
    """The app closes with 4003; the client reads the close and hangs up without the
    answering close frame."""
    address = serve(_impl(name))
    with ws_handshake(address, "/close") as raw:
        raw.sendall(_frame(0x1, b"hi"))
        assert _read_close(raw) == 4003
    (server,) = _server_spans(hop_sink, "/close")
    assert server.attrs["websocket.close_code"] == 4003
    assert server.attrs["websocket.closed_by"] == "app"


@pytest.mark.parametrize("name", ["websockets-sansio", "wsproto"])
def test_app_close_never_answered_until_the_timeout(
    name: str, serve: Callable[..., tuple[str, int]], hop_sink: MemorySink
) -> None:
    """The client stays connected and never answers the app's close: uvicorn closes the
    connection after its close timeout, and the app's code is kept."""
    address = serve(_short_close_timeout(_impl(name)))
    with ws_handshake(address, "/close") as raw:
        raw.sendall(_frame(0x1, b"hi"))
        assert _read_close(raw) == 4003
        raw.settimeout(10)
        assert raw.recv(4096) == b""  # uvicorn hung up (no answer came)
    (server,) = _server_spans(hop_sink, "/close")
    assert server.attrs["websocket.close_code"] == 4003
    assert server.attrs["websocket.closed_by"] == "app"


# -- 3. hopscope run TARGET --ws ---------------------------------------------------------

WS_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

async def echo(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)

async def page(request):
    return PlainTextResponse("page")

app = Starlette(routes=[WebSocketRoute("/echo", echo), Route("/page", page)])
"""

WSGI_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wsgi"]
"""


def test_run_target_serves_websockets_with_the_chosen_implementation(
    tmp_path: Any, runs: Callable[..., Any]
) -> None:
    """``hopscope run wsapp:app --ws wsproto``: uvicorn serves the WebSocket with wsproto
    (not its default), hopscope's traced class of it (the server span names it), behind
    hopscope's proxy."""
    from hopscope.tracing import load

    pytest.importorskip("wsproto")
    (tmp_path / "wsapp.py").write_text(WS_APP)
    run = runs(tmp_path, "wsapp:app", "--port", "0", "--ws", "wsproto", "--headless")
    url = run.url().replace("http://", "ws://") + "/echo"
    run.wait_for(lambda: ws_echoes(url), "a WebSocket echo")
    run.wait_for(lambda: " WS /echo" in run.out, "the tail line")
    run.stop()
    servers = [
        s
        for trace in load(run.trace)
        for s in trace.by_hop("server")
        if s.name == "WS /echo" and s.attrs.get("websocket.accepted")
    ]
    assert servers, run.err
    assert {s.attrs["server.protocol"] for s in servers} == {"WSProtocol"}
    assert all(s.attrs["process.pid"] != os.getpid() for s in servers)


def test_run_target_ws_none_serves_no_websockets(tmp_path: Any, runs: Callable[..., Any]) -> None:
    """``--ws none``, as uvicorn's: the upgrade is a plain HTTP request (Starlette: 404),
    HTTP is served as before."""
    import httpx
    from websockets.exceptions import InvalidStatus

    (tmp_path / "wsapp.py").write_text(WS_APP)
    run = runs(tmp_path, "wsapp:app", "--port", "0", "--ws", "none", "--headless", save=False)
    base = run.url()
    run.wait_for(lambda: httpx.get(f"{base}/page", timeout=5).text == "page", "the page")
    with pytest.raises(InvalidStatus) as refused:
        connect(base.replace("http://", "ws://") + "/echo", open_timeout=5)
    assert refused.value.response.status_code == 404
    run.stop()


def test_run_ws_is_refused_where_it_has_no_meaning(tmp_path: Any, runs: Callable[..., Any]) -> None:
    """A WSGI TARGET is served by gunicorn, which has no WebSockets: a library asked for
    is one line and a non-zero exit; ``-- COMMAND`` sets its own (``--ws`` goes to it)."""
    (tmp_path / "wsgiapp.py").write_text(WSGI_APP)
    run = runs(tmp_path, "wsgiapp:app", "--port", "0", "--ws", "wsproto", "--headless", save=False)
    assert run.proc.wait(30) != 0
    assert "--ws wsproto applies to ASGI apps" in run.err
    assert "Traceback" not in run.err
    command = runs(tmp_path, "--ws", "wsproto", "--", "uvicorn", "wsapp:app", save=False)
    assert command.proc.wait(30) == 2
    assert "--ws applies to TARGET" in command.err


# -- 4. hopscope proxy --keep-host: the WebSocket handshake too ----------------------------


async def host_seen(websocket: WebSocket) -> None:
    """Sends the Host header (all of them) the WebSocket's scope has, then closes."""
    hosts = [v.decode("latin-1") for k, v in websocket.scope["headers"] if k == b"host"]
    await websocket.accept()
    await websocket.send_text(",".join(hosts))
    await websocket.close()


@pytest.mark.parametrize("keep_host", [False, True])
def test_proxy_keep_host_sends_the_clients_host_with_the_websocket(keep_host: bool) -> None:
    """The upstream's WebSocket scope has one Host: the client's with ``keep_host``, the
    upstream's own without (as for HTTP)."""
    from test_proxy import HOST, proxy_to
    from test_proxy import serve as serve_upstream

    upstream_app = Starlette(routes=[WebSocketRoute("/host", host_seen)])
    sent = "example.test:8123"
    with (
        serve_upstream(upstream_app, ws="websockets-sansio") as upstream,
        proxy_to(upstream.url, keep_host=keep_host) as proxy,
    ):
        # (By hand: websockets' client would add a Host of its own to one given.)
        with socket.create_connection((HOST, proxy.port), timeout=5) as raw:
            raw.sendall(
                f"GET /host HTTP/1.1\r\nHost: {sent}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            data = b""
            while len(data.partition(b"\r\n\r\n")[2]) < 2 + len(sent) and (chunk := raw.recv(4096)):
                data += chunk
    head, _, frames = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert frames[0] == 0x81, frames  # a text message: the Host the upstream saw
    seen = frames[2 : 2 + frames[1]].decode()
    assert seen == (sent if keep_host else upstream.url.split("//")[1])
