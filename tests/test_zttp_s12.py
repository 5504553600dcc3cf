"""uvicorn's third HTTP implementation, ``--http zttp``: its server hop, as for httptools.

uvicorn 0.54 serves HTTP/1.1 with zttp (``ZttpProtocol``) and, with ``--http2``, HTTP/2
too (``AutoZttpProtocol`` hands each connection to ``ZttpProtocol`` or ``ZttpH2Protocol``).
hopscope's subclasses record the same ``server`` span as its httptools one: each test
serves a real uvicorn on 127.0.0.1, talks to it with httpx (a raw socket or h2 where a
client must misbehave), and compares the span with httptools' for the same exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("zttp")  # optional in uvicorn: pip install zttp

from hopscope.tracing import MemorySink, load, wrap
from hopscope.tracing.model import Trace
from hopscope.tracing.servers import uvicorn_protocols
from servers import uvicorn_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from test_frameworks_s9 import _answers
from test_run import Run, _free_port
from traces import finished

TIMEOUT = 10.0
HTTPTOOLS = uvicorn_protocols.HttpToolsProtocol
ZTTP: type = uvicorn_protocols.ZttpProtocol
AUTO_ZTTP: type = uvicorn_protocols.AutoZttpProtocol

#: Server-span attributes that differ between two runs of one exchange, or name the class.
_VARYING = {"server.protocol", "connection.accepted_ts", "process.pid", "thread.id"}


# -- the app --------------------------------------------------------------------------------


async def _item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["id"]})


async def _stream(request: Request) -> StreamingResponse:
    async def parts() -> Any:
        for i in range(3):
            yield b"part %d\n" % i
            await asyncio.sleep(0)

    return StreamingResponse(parts(), media_type="text/plain")


async def _upload(request: Request) -> JSONResponse:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return JSONResponse({"size": size})


async def _boom(request: Request) -> JSONResponse:
    raise RuntimeError("the app broke")


async def _fails_mid_stream(request: Request) -> StreamingResponse:
    async def parts() -> Any:
        yield b"first\n"
        raise RuntimeError("broke mid-stream")

    return StreamingResponse(parts(), media_type="text/plain")


def _app(sink: MemorySink, **extra: Callable[..., Any]) -> Any:
    routes = [
        Route("/items/{id}", _item),
        Route("/stream", _stream),
        Route("/upload", _upload, methods=["POST"]),
        Route("/boom", _boom),
        Route("/fail", _fails_mid_stream),
        *(Route(f"/{name}", endpoint) for name, endpoint in extra.items()),
    ]
    return wrap(Starlette(routes=routes), sink=sink)


# -- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _serve(app: Any, protocol: type) -> Iterator[str]:
    with uvicorn_thread(app, http=protocol, log_level="critical") as served:
        yield served.url


def _hop(trace: Trace, protocol: str = "ZttpProtocol") -> tuple[Any, Any]:
    """The server span (zttp's) and the app span under it: one trace, app under server.
    (A client that left ends the server span at once; the app's may go on, as it does
    under httptools: the app ends inside only when the server span did not say so.)"""
    server = trace.root
    assert server is not None and server.hop == "server" and server.finished, trace.spans
    assert server.attrs["server.protocol"] == protocol
    (app,) = [s for s in trace.by_hop("app") if "interface" in s.attrs]
    assert app.parent_id == server.span_id and app.trace_id == server.trace_id
    assert server.start is not None and app.start is not None and app.end is not None
    assert server.start <= app.start
    assert app.end <= (server.end or 0) or server.attrs.get("disconnected") is True
    return server, app


def _shape(trace: Trace) -> tuple[Any, ...]:
    """What the server span says, less what differs from run to run: attributes (start's
    and end's), events (names and attributes), and how the app span hangs under it."""
    server = trace.root
    assert server is not None
    attrs = {k: v for k, v in server.attrs.items() if k not in _VARYING}
    events = [(event.name, event.attrs) for event in server.events]
    children = sorted(
        (s.hop, s.name) for s in trace.spans.values() if s.parent_id == server.span_id
    )
    return server.name, attrs, events, children


def _both(
    new_sink: Callable[[], MemorySink],
    exchange: Callable[[str], Any],
    spans: int,
    **extra: Callable[..., Any],
) -> Any:
    """``exchange(base_url)`` under zttp, then under httptools: zttp's traces, each
    checked to read as httptools' did, and what the exchange returned under zttp."""
    shapes: dict[type, list[tuple[Any, ...]]] = {}
    zttp_traces: list[Trace] = []
    result = None
    for protocol in (ZTTP, HTTPTOOLS):
        sink = new_sink()
        with _serve(_app(sink, **extra), protocol) as base:
            answer = exchange(base)
            traces = finished(sink, spans)
        shapes[protocol] = [_shape(trace) for trace in traces]
        if protocol is ZTTP:
            zttp_traces, result = traces, answer
    assert shapes[ZTTP] == shapes[HTTPTOOLS]
    return zttp_traces, result


# -- HTTP/1.1 -------------------------------------------------------------------------------


def test_a_plain_request_has_the_server_span_around_the_app_span(
    new_sink: Callable[[], MemorySink],
) -> None:
    def exchange(base: str) -> Any:
        return httpx.get(f"{base}/items/1", timeout=TIMEOUT).json()

    (trace,), answer = _both(new_sink, exchange, 2)
    assert answer == {"id": "1"}
    server, app = _hop(trace)
    assert server.name == "GET /items/1" and app.attrs["http.response.status_code"] == 200
    assert server.attrs["http.request.method"] == "GET"
    assert server.attrs["url.path"] == "/items/1"
    assert server.attrs["client.address"] == "127.0.0.1"
    assert server.attrs["connection.request_number"] == 1
    assert [(e.name, e.attrs) for e in server.events] == [
        ("request.head", {}),
        ("response.head", {"http.response.status_code": 200}),
    ]
    assert "disconnected" not in server.attrs and "response.incomplete" not in server.attrs


def test_a_streamed_response_ends_the_server_span_after_its_last_part(
    new_sink: Callable[[], MemorySink],
) -> None:
    def exchange(base: str) -> Any:
        with httpx.stream("GET", f"{base}/stream", timeout=TIMEOUT) as response:
            return [bytes(part) for part in response.iter_raw()]

    (trace,), parts = _both(new_sink, exchange, 2)
    assert b"".join(parts) == b"part 0\npart 1\npart 2\n"
    server, app = _hop(trace)
    assert app.attrs["http.response.body.size"] == 21
    assert [e.name for e in server.events] == ["request.head", "response.head"]
    assert "disconnected" not in server.attrs and "response.incomplete" not in server.attrs


def test_a_post_body_is_read_under_the_server_span(new_sink: Callable[[], MemorySink]) -> None:
    body = b"x" * 300_000  # (more than one read, and past uvicorn's high-water mark)

    def exchange(base: str) -> Any:
        return httpx.post(f"{base}/upload", content=body, timeout=TIMEOUT).json()

    (trace,), answer = _both(new_sink, exchange, 2)
    assert answer == {"size": len(body)}
    server, _app_span = _hop(trace)
    assert server.name == "POST /upload" and server.attrs["http.request.method"] == "POST"
    assert [e.name for e in server.events] == ["request.head", "response.head"]


def test_an_app_that_raises_gets_uvicorns_500_inside_the_server_span(
    new_sink: Callable[[], MemorySink],
) -> None:
    def exchange(base: str) -> Any:
        response = httpx.get(f"{base}/boom", timeout=TIMEOUT)
        return response.status_code, response.text

    (trace,), answer = _both(new_sink, exchange, 2)
    assert answer == (500, "Internal Server Error")
    server, app = _hop(trace)
    assert [(e.name, e.attrs) for e in server.events] == [
        ("request.head", {}),
        ("response.head", {"http.response.status_code": 500}),
    ]
    assert "disconnected" not in server.attrs and "response.incomplete" not in server.attrs
    assert [e.name for e in app.events if e.name == "exception"] == ["exception"]


def test_a_response_uvicorn_cuts_after_the_app_failed_is_incomplete_not_client_gone(
    new_sink: Callable[[], MemorySink],
) -> None:
    def exchange(base: str) -> Any:
        with httpx.stream("GET", f"{base}/fail", timeout=TIMEOUT) as response:
            with pytest.raises(httpx.RemoteProtocolError):  # uvicorn closes mid-body
                response.read()

    (trace,), _ = _both(new_sink, exchange, 2)
    server, _app_span = _hop(trace)
    assert server.attrs.get("response.incomplete") is True
    assert "disconnected" not in server.attrs


def test_keep_alive_gives_each_request_its_own_server_span_one_after_the_other(
    new_sink: Callable[[], MemorySink],
) -> None:
    def exchange(base: str) -> Any:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
            first = client.get("/items/1")
            second = client.get("/items/2")
        assert first.extensions["network_stream"] is second.extensions["network_stream"]
        return first.json(), second.json()

    traces, answers = _both(new_sink, exchange, 4)
    assert answers == ({"id": "1"}, {"id": "2"})
    assert len(traces) == 2 and traces[0].trace_id != traces[1].trace_id
    (first, first_app), (second, second_app) = (_hop(trace) for trace in traces)
    assert first.name == "GET /items/1" and second.name == "GET /items/2"
    assert first.attrs["connection.request_number"] == 1
    assert second.attrs["connection.request_number"] == 2
    assert first.attrs["connection.accepted_ts"] == second.attrs["connection.accepted_ts"]
    assert (first.end or 0) <= (second.start or 0)  # apart: the second after the first
    assert first_app.span_id != second_app.span_id


def test_a_client_that_leaves_mid_stream_ends_the_server_span_as_gone(
    new_sink: Callable[[], MemorySink],
) -> None:
    stopped = threading.Event()
    endless = _endless(stopped, 4096)

    def exchange(base: str) -> Any:
        stopped.clear()
        with httpx.stream("GET", f"{base}/endless", timeout=TIMEOUT) as response:
            first = next(response.iter_raw())
        # (leaving the block closes the connection: its response was not read to its end)
        assert stopped.wait(TIMEOUT)
        return first

    (trace,), first = _both(new_sink, exchange, 2, endless=endless)
    assert first
    server, _app_span = _hop(trace)
    assert server.attrs.get("disconnected") is True
    assert "response.incomplete" not in server.attrs


def test_a_client_that_leaves_before_the_response_ends_the_server_span_as_gone(
    new_sink: Callable[[], MemorySink],
) -> None:
    gate = threading.Event()

    async def slow(request: Request) -> PlainTextResponse:
        gate.set()
        await asyncio.sleep(0.5)
        return PlainTextResponse("late")

    def exchange(base: str) -> Any:
        gate.clear()
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
            conn.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            assert gate.wait(TIMEOUT)

    (trace,), _ = _both(new_sink, exchange, 2, slow=slow)
    server, _app_span = _hop(trace)
    assert server.attrs.get("disconnected") is True
    assert [e.name for e in server.events] == ["request.head"]


def test_server_timing_is_added_under_zttp_when_asked(
    new_sink: Callable[[], MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOPSCOPE_SERVER_TIMING", "1")
    sink = new_sink()
    with _serve(_app(sink), ZTTP) as base:
        response = httpx.get(f"{base}/items/3", timeout=TIMEOUT)
        finished(sink, 2)
    assert response.json() == {"id": "3"}
    assert "server;dur=" in response.headers["server-timing"]


# -- HTTP/2 (and HTTP/1.1) through AutoZttpProtocol: uvicorn's --http zttp --http2 -----------


def _h2_client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, http1=False, http2=True, timeout=TIMEOUT)  # h2c


def test_http2_streams_on_one_connection_each_have_their_server_span(
    new_sink: Callable[[], MemorySink],
) -> None:
    sink = new_sink()
    with _serve(_app(sink), AUTO_ZTTP) as base:

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(
                base_url=base, http1=False, http2=True, timeout=TIMEOUT
            ) as client:  # two streams at once on one connection
                return list(await asyncio.gather(client.get("/stream"), client.get("/items/7")))

        streamed, item = asyncio.run(both())
        with _h2_client(base) as client:
            posted = client.post("/upload", content=b"y" * 100_000)
        traces = finished(sink, 6)
    assert streamed.http_version == item.http_version == posted.http_version == "HTTP/2"
    assert streamed.text == "part 0\npart 1\npart 2\n" and item.json() == {"id": "7"}
    assert posted.json() == {"size": 100_000}
    spans = {trace.root.name: _hop(trace, "ZttpH2Protocol") for trace in traces if trace.root}
    assert set(spans) == {"GET /stream", "GET /items/7", "POST /upload"}
    first, second = spans["GET /stream"][0], spans["GET /items/7"][0]
    assert {
        first.attrs["connection.request_number"],
        second.attrs["connection.request_number"],
    } == {
        1,
        2,
    }
    assert first.attrs["connection.accepted_ts"] == second.attrs["connection.accepted_ts"]
    for server, _app_span in spans.values():
        assert [e.name for e in server.events] == ["request.head", "response.head"]
        assert "disconnected" not in server.attrs and "response.incomplete" not in server.attrs


def test_http2_500_and_a_stream_uvicorn_resets_after_the_app_failed(
    new_sink: Callable[[], MemorySink],
) -> None:
    sink = new_sink()
    with _serve(_app(sink), AUTO_ZTTP) as base, _h2_client(base) as client:
        boom = client.get("/boom")
        with client.stream("GET", "/fail") as response:
            with pytest.raises(httpx.RemoteProtocolError):  # uvicorn resets the stream
                response.read()
        traces = finished(sink, 4)
    assert (boom.status_code, boom.text) == (500, "Internal Server Error")
    spans = {trace.root.name: _hop(trace, "ZttpH2Protocol")[0] for trace in traces if trace.root}
    assert [(e.name, e.attrs) for e in spans["GET /boom"].events][-1] == (
        "response.head",
        {"http.response.status_code": 500},
    )
    assert "response.incomplete" not in spans["GET /boom"].attrs
    assert spans["GET /fail"].attrs.get("response.incomplete") is True
    assert "disconnected" not in spans["GET /fail"].attrs


def _endless(stopped: threading.Event, size: int) -> Callable[..., Any]:
    """An endpoint streaming ``size``-byte parts until its client leaves (``stopped``)."""

    async def endless(request: Request) -> StreamingResponse:
        async def parts() -> Any:
            try:
                for _ in range(100_000):  # (bounded: the client leaves after one read)
                    yield b"x" * size
                    await asyncio.sleep(0.001)
            finally:
                stopped.set()

        return StreamingResponse(parts(), media_type="text/plain")

    return endless


def _endless_app(sink: MemorySink, stopped: threading.Event) -> Any:
    return _app(sink, endless=_endless(stopped, 1024))


def test_http2_a_client_that_closes_its_connection_mid_stream_is_gone(
    new_sink: Callable[[], MemorySink],
) -> None:
    sink, stopped = new_sink(), threading.Event()
    with _serve(_endless_app(sink, stopped), AUTO_ZTTP) as base:
        with _h2_client(base) as client, client.stream("GET", "/endless") as response:
            assert next(response.iter_raw())
        assert stopped.wait(TIMEOUT)  # (the client closed its connection)
        (trace,) = finished(sink, 2)
    server, _app_span = _hop(trace, "ZttpH2Protocol")
    assert server.attrs.get("disconnected") is True
    assert "response.incomplete" not in server.attrs


def test_http2_a_client_that_resets_its_stream_is_gone_and_the_connection_serves_on(
    new_sink: Callable[[], MemorySink],
) -> None:
    """RST_STREAM on one stream (what a browser does for a cancelled fetch): that stream's
    server span ends as client-gone, and the next stream on the connection has its own."""
    import h2.config
    import h2.connection
    import h2.events

    sink, stopped = new_sink(), threading.Event()
    with _serve(_endless_app(sink, stopped), AUTO_ZTTP) as base:
        host, port = base.removeprefix("http://").split(":")
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
            h2c.initiate_connection()

            def ask(path: str) -> int:
                stream_id: int = h2c.get_next_available_stream_id()
                request = [(":method", "GET"), (":scheme", "http"), (":path", path)]
                h2c.send_headers(stream_id, [*request, (":authority", host)], end_stream=True)
                conn.sendall(h2c.data_to_send())
                return stream_id

            def until(done: Callable[[list[Any]], bool]) -> None:
                for _ in range(10_000):  # (bounded; each recv waits TIMEOUT at most)
                    events = h2c.receive_data(conn.recv(65536))
                    conn.sendall(h2c.data_to_send())
                    if done(events):
                        return
                pytest.fail("no such frame")

            endless = ask("/endless")
            until(lambda events: any(isinstance(e, h2.events.DataReceived) for e in events))
            h2c.reset_stream(endless)
            conn.sendall(h2c.data_to_send())
            assert stopped.wait(TIMEOUT)
            ask("/items/5")
            until(lambda events: any(isinstance(e, h2.events.StreamEnded) for e in events))
            traces = finished(sink, 4)
    spans = {trace.root.name: _hop(trace, "ZttpH2Protocol")[0] for trace in traces if trace.root}
    assert spans["GET /endless"].attrs.get("disconnected") is True
    assert "response.incomplete" not in spans["GET /endless"].attrs
    assert "disconnected" not in spans["GET /items/5"].attrs
    assert spans["GET /items/5"].attrs["connection.request_number"] == 2


def test_http1_through_the_http2_capable_protocol_is_zttps_http1_span(
    new_sink: Callable[[], MemorySink],
) -> None:
    sink = new_sink()
    with _serve(_app(sink), AUTO_ZTTP) as base:
        answer = httpx.get(f"{base}/items/4", timeout=TIMEOUT)
        (trace,) = finished(sink, 2)
    assert answer.http_version == "HTTP/1.1" and answer.json() == {"id": "4"}
    server, _app_span = _hop(trace, "ZttpProtocol")
    assert [e.name for e in server.events] == ["request.head", "response.head"]


# -- wired in: uvicorn --http zttp under hopscope run ----------------------------------------

ZTTP_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def item(request):
    return JSONResponse({"id": request.path_params["id"], "v": request.scope["http_version"]})


app = Starlette(routes=[Route("/items/{id}", item)])
"""


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_hopscope_run_uvicorn_http_zttp_records_the_server_hop(
    http2: bool, tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """``hopscope run -- uvicorn --http zttp [--http2]``: hopscope's class in uvicorn's place."""
    (tmp_path / "zapp.py").write_text(ZTTP_APP)
    port = _free_port()
    extra = ["--http2"] if http2 else []
    command = ["uvicorn", "--http", "zttp", *extra, "--port", str(port), "zapp:app"]
    run = runs(tmp_path, "--headless", "--", *command)
    base = f"http://127.0.0.1:{port}"
    try:
        run.wait_for(_answers(f"{base}/items/0"), "the app to answer")
        with httpx.Client(base_url=base, http1=not http2, http2=http2, timeout=TIMEOUT) as c:
            answer = c.get("/items/1")
        run.wait_for(lambda: "GET /items/1 " in run.out, "the request's line")
    finally:
        run.stop()
    assert answer.json() == {"id": "1", "v": "2" if http2 else "1.1"}
    (trace,) = [t for t in load(run.trace) if t.root is not None and t.root.name.endswith("/1")]
    _hop(trace, "ZttpH2Protocol" if http2 else "ZttpProtocol")
