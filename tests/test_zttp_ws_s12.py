"""WebSockets under ``--http zttp``: the upgrade hands over from hopscope's zttp protocol to
hopscope's ``--ws`` class, whose ``server`` span is then the same as under httptools.

Each test serves a real uvicorn on 127.0.0.1 with ``http=ZttpProtocol`` (and
``AutoZttpProtocol``, what ``--http zttp --http2`` serves, for an HTTP/1.1 upgrade),
talks to it with websockets' client, and compares the span with httptools' for the same
exchange.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zttp")  # optional in uvicorn: pip install zttp

from hopscope.tracing import MemorySink, Span, Trace, load, wrap
from hopscope.tracing.servers import uvicorn_protocols
from servers import uvicorn_thread, ws_echoes
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from test_ws_s11 import _impl
from test_ws_server_s10 import PARENT, TRACE_ID, _finished, deny, echo
from test_ws_server_s10 import _server as _ws_spans
from traces import finished
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

#: The WebSocket implementations hopscope traces that need no deprecated code path.
IMPLEMENTATIONS = ["websockets-sansio", "wsproto"]
HTTPTOOLS = uvicorn_protocols.HttpToolsProtocol
ZTTP: type = uvicorn_protocols.ZttpProtocol
AUTO_ZTTP: type = uvicorn_protocols.AutoZttpProtocol
#: Server-span attributes that differ between two runs of one exchange.
_VARYING = {"connection.accepted_ts", "process.pid", "thread.id"}


def _app(sink: MemorySink) -> Any:
    routes = [WebSocketRoute("/echo", echo), WebSocketRoute("/deny", deny)]
    return wrap(Starlette(routes=routes), sink=sink)


def _serve(sink: MemorySink, http: type, ws: Any) -> Any:
    return uvicorn_thread(
        _app(sink), scheme="ws", http=http, ws=ws, log_level="critical", ws_ping_interval=None
    )


def _server(trace: Trace, ws: Any) -> tuple[Span, Span]:
    """(server span, app span) of a WebSocket's trace, nested in one trace (as under
    httptools), the server span the ``--ws`` class's (not the HTTP protocol's)."""
    server, app = _ws_spans(trace)
    assert server.attrs["server.protocol"] == ws.__name__
    return server, app


def _shape(server: Span) -> tuple[Any, ...]:
    attrs = {k: v for k, v in server.attrs.items() if k not in _VARYING}
    return server.name, attrs, [(e.name, e.attrs) for e in server.events]


def _each(
    new_sink: Callable[[], MemorySink],
    ws: Any,
    exchange: Callable[[str], Any],
    path: str,
    http: tuple[type, ...] = (ZTTP, AUTO_ZTTP),
) -> list[tuple[Span, Span]]:
    """``exchange(ws_base_url)`` under each of ``http`` and then httptools: the (server,
    app) spans under each of ``http``, each checked to read as httptools' did."""
    spans: dict[type, tuple[Span, Span]] = {}
    for protocol in (*http, HTTPTOOLS):
        sink = new_sink()
        with _serve(sink, protocol, ws) as served:
            exchange(served.url)
            spans[protocol] = _server(_finished(sink, path), ws)
    for protocol in http:
        assert _shape(spans[protocol][0]) == _shape(spans[HTTPTOOLS][0]), protocol
        # (the zttp protocol's connection, handed over: this request was its first)
        assert spans[protocol][0].attrs["connection.request_number"] == 1
        assert spans[protocol][0].attrs["connection.accepted_ts"] > 0
    return [spans[protocol] for protocol in http]


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_an_echo_under_zttp_has_the_websocket_server_span(
    name: str, new_sink: Callable[[], MemorySink]
) -> None:
    ws = _impl(name)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}

    def exchange(base: str) -> None:
        with connect(f"{base}/echo", additional_headers=headers, open_timeout=5) as client:
            client.send("hello")
            assert client.recv(timeout=5) == "hello"

    for server, app in _each(new_sink, ws, exchange, "/echo"):
        assert server.trace_id == TRACE_ID and server.parent_id == PARENT
        assert server.name == "WS /echo" and server.attrs["url.path"] == "/echo"
        assert [e.name for e in server.events] == [
            "request.head",
            "app.call",
            "response.head",
            "connection.close",
        ]
        assert server.events[2].attrs == {"http.response.status_code": 101}
        assert server.attrs["http.response.status_code"] == 101
        assert server.attrs["websocket.accepted"] is True
        assert server.attrs["websocket.close_code"] == 1000  # the client's close
        assert server.attrs["websocket.closed_by"] == "client"
        assert "disconnected" not in server.attrs
        assert app.name == "WS /echo"


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_an_app_close_under_zttp_keeps_its_code(
    name: str, new_sink: Callable[[], MemorySink]
) -> None:
    ws = _impl(name)

    def exchange(base: str) -> None:
        with connect(f"{base}/echo", open_timeout=5) as client:
            client.send("bye")
            with pytest.raises(ConnectionClosed):
                client.recv(timeout=5)
        assert client.close_code == 4001

    for server, _app_span in _each(new_sink, ws, exchange, "/echo", http=(ZTTP,)):
        assert server.attrs["websocket.close_code"] == 4001
        assert server.attrs["websocket.closed_by"] == "app"


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_a_handshake_the_app_denies_under_zttp_has_its_403_server_span(
    name: str, new_sink: Callable[[], MemorySink]
) -> None:
    ws = _impl(name)

    def exchange(base: str) -> None:
        with pytest.raises(InvalidStatus) as raised:
            connect(f"{base}/deny", open_timeout=5)
        assert raised.value.response.status_code == 403

    for server, app in _each(new_sink, ws, exchange, "/deny"):
        assert server.name == "WS /deny"
        assert server.attrs["http.response.status_code"] == 403
        assert server.attrs["websocket.accepted"] is False
        assert "websocket.close_code" not in server.attrs
        assert [e.attrs for e in server.events if e.name == "response.head"] == [
            {"http.response.status_code": 403}
        ]
        assert app.attrs["websocket.accepted"] is False


NO_KEY = (
    b"GET /echo?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_a_handshake_the_library_refuses_under_zttp_has_its_server_span(
    name: str, new_sink: Callable[[], MemorySink]
) -> None:
    """No Sec-WebSocket-Key: the library answers before uvicorn calls the app, and the
    span takes the path from the zttp protocol that parsed the request."""
    sink = new_sink()
    ws = _impl(name)
    with _serve(sink, ZTTP, ws) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as raw:
            raw.sendall(NO_KEY)
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 426), answer
        (trace,) = finished(sink, 1)
    (server,) = trace.by_hop("server")
    assert not trace.by_hop("app")  # the app never saw it
    assert server.name == "WS /echo" and server.attrs["url.path"] == "/echo"
    assert server.attrs["server.protocol"] == ws.__name__
    assert server.attrs["http.response.status_code"] == status
    assert server.attrs["websocket.accepted"] is False
    assert server.attrs["error"] is True
    assert "Sec-WebSocket-Key" in server.attrs["exception.message"]
    assert server.attrs["connection.request_number"] == 1
    assert [e.name for e in server.events] == ["request.head", "response.head", "connection.close"]


def test_http_then_an_upgrade_on_one_zttp_connection_is_its_second_request(
    new_sink: Callable[[], MemorySink],
) -> None:
    """A keep-alive connection's HTTP request, then an upgrade on that connection: the
    WebSocket's span carries on zttp's count of the connection's requests."""

    sink = new_sink()
    ws = _impl("websockets-sansio")
    with _serve(sink, ZTTP, ws) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as raw:
            raw.sendall(b"GET /nothing HTTP/1.1\r\nHost: h\r\n\r\n")
            data = b""
            while b"Not Found" not in data and (chunk := raw.recv(4096)):
                data += chunk
            assert data.startswith(b"HTTP/1.1 404 "), data
            raw.sendall(
                b"GET /deny HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        server, _app_span = _server(_finished(sink, "/deny"), ws)
    (http_trace,) = [
        t for t in sink.traces() if t.root is not None and t.root.name == "GET /nothing"
    ]
    http_server = http_trace.root
    assert http_server is not None and http_server.attrs["server.protocol"] == "ZttpProtocol"
    assert server.attrs["connection.request_number"] == 2
    assert server.attrs["connection.accepted_ts"] == http_server.attrs["connection.accepted_ts"]


# -- wired in: hopscope run -- uvicorn --http zttp ---------------------------------------

WS_APP = """
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

async def echo(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)

app = Starlette(routes=[WebSocketRoute("/echo", echo)])
"""


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_hopscope_run_uvicorn_http_zttp_records_the_websocket_server_hop(
    name: str, tmp_path: Path, runs: Callable[..., Any]
) -> None:
    """``hopscope run -- uvicorn --http zttp --ws NAME``: the WebSocket's server span is
    the traced ``--ws`` class's, with the app span under it, in the worker's pid."""
    ws = _impl(name)
    from test_run import _free_port

    (tmp_path / "wsapp.py").write_text(WS_APP)
    port = _free_port()
    command = ["uvicorn", "wsapp:app", "--http", "zttp", "--ws", name, "--port", str(port)]
    run = runs(tmp_path, "--headless", "--", *command)
    try:
        run.wait_for(lambda: ws_echoes(f"ws://127.0.0.1:{port}/echo"), "a WebSocket echo")
        run.wait_for(lambda: re.search(r" WS /echo .*server=", run.out), "the tail line")
    finally:
        run.stop()
    traces = [t for t in load(run.trace) if t.by_hop("server") and t.by_hop("app")]
    assert traces, run.err
    for trace in traces:
        (server,) = [s for s in trace.by_hop("server") if s.name != "queue"]
        (app,) = trace.by_hop("app")
        assert server.name == "WS /echo" and app.parent_id == server.span_id
        assert server.attrs["server.protocol"] == ws.__name__
        assert server.attrs["http.response.status_code"] == 101
        assert server.attrs["websocket.closed_by"] == "client"
        assert server.attrs["process.pid"] == app.attrs["process.pid"] != os.getpid()
        # (handed over from hopscope's zttp protocol: it counts the connection's requests)
        assert server.attrs["connection.request_number"] == 1
