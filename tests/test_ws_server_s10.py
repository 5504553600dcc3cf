"""The server hop of a WebSocket under uvicorn, for each of its WebSocket implementations:
real uvicorn on 127.0.0.1, a Starlette app, a real WebSocket client."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hopscope.tracing import MemorySink, Span, Trace, load, wrap
from hopscope.tracing.servers.uvicorn_protocols import HttpToolsProtocol
from hopscope.tracing.servers.uvicorn_ws import ws_protocol
from servers import uvicorn_thread, ws_echoes, ws_handshake
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

IMPLEMENTATIONS = ["websockets", "websockets-sansio", "wsproto"]
#: uvicorn's legacy implementation passes websockets a handler it deprecates (uvicorn's own).
pytestmark = pytest.mark.filterwarnings("ignore:remove second argument of ws_handler")
TRACE_ID, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        if text == "bye":
            await websocket.close(code=4001)
            return
        await websocket.send_text(text)


async def deny(websocket: WebSocket) -> None:
    await websocket.close()  # before accept: a 403


async def boom(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.receive_text()
    raise RuntimeError("boom")


def _app(sink: MemorySink) -> Any:
    routes = [
        WebSocketRoute("/echo", echo),
        WebSocketRoute("/deny", deny),
        WebSocketRoute("/boom", boom),
    ]
    return wrap(Starlette(routes=routes), sink=sink)


@pytest.fixture(params=IMPLEMENTATIONS)
def served(request: pytest.FixtureRequest, hop_sink: MemorySink) -> Iterator[str]:
    """The app under uvicorn with hopscope's HTTP protocol and ``--ws`` the param, traced;
    yields ``ws://127.0.0.1:PORT``."""
    if request.param == "wsproto":
        pytest.importorskip("wsproto")
    with warnings.catch_warnings():  # (uvicorn's legacy implementation is deprecated)
        warnings.simplefilter("ignore")
        ws = ws_protocol(request.param)
    assert ws.__module__ == "hopscope.tracing.servers.uvicorn_ws"
    with uvicorn_thread(
        _app(hop_sink),
        scheme="ws",
        http=HttpToolsProtocol,
        ws=ws,
        log_level="critical",
        ws_ping_interval=None,
    ) as served:
        yield served.url


def _finished(sink: MemorySink, path: str) -> Trace:
    """The trace whose app span is ``WS path``, once its server span has ended."""
    deadline = time.monotonic() + 10
    while True:
        for trace in sink.traces():
            servers = trace.by_hop("server")
            apps = [s for s in trace.by_hop("app") if s.name == f"WS {path}"]
            if apps and servers and all(s.finished for s in (*servers, *apps)):
                return trace
        assert time.monotonic() < deadline, f"no finished server span for {path}"
        time.sleep(0.02)


def _server(trace: Trace) -> tuple[Span, Span]:
    """(server span, app span) of a WebSocket's trace, checked to nest in one trace."""
    (server,) = [s for s in trace.by_hop("server") if s.name != "queue"]
    (app,) = trace.by_hop("app")
    assert app.parent_id == server.span_id and app.trace_id == server.trace_id
    assert server.start is not None and app.start is not None
    assert server.start <= app.start and (app.end or 0) <= (server.end or 0)
    assert server.attrs["network.protocol.name"] == "websocket"
    assert server.attrs["process.pid"] == os.getpid()
    return server, app


def _events(span: Span) -> list[str]:
    return [event.name for event in span.events]


def test_accepted_websocket_has_the_server_hop(served: str, hop_sink: MemorySink) -> None:
    start = time.time() - 0.003  # a web server in front saw it 3 ms ago
    headers = {
        "traceparent": f"00-{TRACE_ID}-{PARENT}-01",
        "x-request-start": f"t={int(start * 1e6)}",
    }
    with connect(f"{served}/echo", additional_headers=headers, open_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    trace = _finished(hop_sink, "/echo")
    server, _ = _server(trace)
    assert trace.trace_id == TRACE_ID and server.parent_id == PARENT
    assert _events(server) == [
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
    (queue,) = [s for s in trace.by_hop("server") if s.name == "queue"]
    assert queue.end == server.start and (queue.duration_ns or 0) >= 3_000_000


def test_app_closing_with_its_code(served: str, hop_sink: MemorySink) -> None:
    with connect(f"{served}/echo", open_timeout=5) as ws:
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert ws.close_code == 4001
    server, _ = _server(_finished(hop_sink, "/echo"))
    assert server.attrs["websocket.close_code"] == 4001
    assert server.attrs["websocket.closed_by"] == "app"


def test_denied_websocket_is_a_403(served: str, hop_sink: MemorySink) -> None:
    with pytest.raises(InvalidStatus) as raised:
        connect(f"{served}/deny", open_timeout=5)
    assert raised.value.response.status_code == 403
    server, app = _server(_finished(hop_sink, "/deny"))
    assert server.attrs["http.response.status_code"] == 403
    assert server.attrs["websocket.accepted"] is False
    assert "websocket.close_code" not in server.attrs
    assert [e.attrs for e in server.events if e.name == "response.head"] == [
        {"http.response.status_code": 403}
    ]
    assert app.attrs["websocket.accepted"] is False


def test_app_raising_after_accept(served: str, hop_sink: MemorySink) -> None:
    with connect(f"{served}/boom", open_timeout=5) as ws:
        ws.send("x")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert ws.close_code == 1006  # uvicorn drops the connection: no close frame
    server, app = _server(_finished(hop_sink, "/boom"))
    assert app.attrs.get("error") is True
    assert server.attrs["http.response.status_code"] == 101
    assert server.attrs["websocket.close_code"] == 1006
    assert server.attrs["websocket.closed_by"] == "server"


def test_client_gone_without_a_close_frame(served: str, hop_sink: MemorySink) -> None:
    host, port = served.removeprefix("ws://").split(":")
    with ws_handshake((host, int(port)), "/echo", host="x"):
        pass  # gone without a close frame
    server, _ = _server(_finished(hop_sink, "/echo"))
    assert server.attrs["websocket.close_code"] == 1006
    assert server.attrs["websocket.closed_by"] == "client"
    assert server.attrs["disconnected"] is True


def test_classes_it_cannot_hook_are_left_to_uvicorn() -> None:
    """A uvicorn whose class lacks a method a hook needs keeps its own class (the app
    span is still recorded), as do ``--ws none`` and a class of the user's; the names
    ``--ws hopscope.tracing.servers.uvicorn_ws:NAME`` asks for are the traced ones."""
    import asyncio

    from hopscope.tracing.servers.uvicorn_ws import traced_ws_protocol
    from uvicorn.importer import import_from_string

    older = type(
        "WSProtocol",
        (asyncio.Protocol,),
        {"__module__": "uvicorn.protocols.websockets.wsproto_impl", "run_asgi": None},
    )
    assert traced_ws_protocol(older) is older
    assert traced_ws_protocol(None) is None and ws_protocol("none") is None
    mine = type("Mine", (asyncio.Protocol,), {})
    assert traced_ws_protocol(mine) is mine
    named = import_from_string("hopscope.tracing.servers.uvicorn_ws:WebSocketsSansIOProtocol")
    assert (
        named is ws_protocol("websockets-sansio") and named.__name__ == "WebSocketsSansIOProtocol"
    )


# -- hopscope run -- uvicorn ------------------------------------------------------------

WS_APP = """
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

async def echo(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)

app = Starlette(routes=[WebSocketRoute("/echo", echo)])
"""


def test_hopscope_run_uvicorn_records_the_websocket_server_hop(
    tmp_path: Path, runs: Callable[..., Any]
) -> None:
    """``hopscope run -- uvicorn --ws wsproto``, hopscope's proxy in front sending to the
    run's collector: the saved WebSocket trace has all four hops, the server's from the
    implementation the user chose, in the worker's pid."""
    pytest.importorskip("wsproto")
    from hopscope.app.front import Front
    from test_run import _free_port

    (tmp_path / "wsapp.py").write_text(WS_APP)
    port = _free_port()
    run = runs(
        tmp_path, "--headless", "--", "uvicorn", "wsapp:app", "--port", str(port), "--ws", "wsproto"
    )
    collector = run.wait_for(lambda: re.search(r"traces to (\S+?);", run.err), "the collector")
    front_sock = socket.socket()
    front_sock.bind(("127.0.0.1", 0))
    front_sock.listen(16)
    front = Front(front_sock, f"http://127.0.0.1:{port}", collector.group(1))
    try:
        url = f"ws://127.0.0.1:{front_sock.getsockname()[1]}/echo"
        run.wait_for(lambda: ws_echoes(url), "a WebSocket echo through the proxy")
        run.wait_for(lambda: re.search(r" WS /echo .*server=", run.out), "the tail line")
    finally:
        front.stop()
        front_sock.close()
        run.stop(signal.SIGINT)
    traces = [t for t in load(run.trace) if t.by_hop("server") and t.by_hop("client")]
    assert traces, run.err
    trace = traces[0]
    assert {s.hop for s in trace.spans.values()} == {"client", "proxy", "server", "app"}
    (proxy,) = trace.by_hop("proxy")
    server, app = (
        next(s for s in trace.by_hop("server") if s.name != "queue"),
        trace.by_hop("app")[0],
    )
    assert server.parent_id == proxy.span_id and app.parent_id == server.span_id
    assert server.attrs["server.protocol"] == "WSProtocol"  # --ws wsproto, kept
    assert server.attrs["process.pid"] == app.attrs["process.pid"] != os.getpid()
    assert [s for s in trace.by_hop("server") if s.name == "queue"]  # X-Request-Start
