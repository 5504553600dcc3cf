"""Frameworks under ``hopscope run`` and ``wrap(app)``, the way users serve them: Quart's
WebSocket routes, FastAPI and Django ASGI under uvicorn and hypercorn, hypercorn over HTTP/2.

Real servers on 127.0.0.1 with free ports, real clients, bounded waits; the bare app's
answers are the reference, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import textwrap
import threading
import time
from base64 import b64decode
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets.sync.client
from hopscope.tracing import MemorySink, wrap
from hopscope.tracing.model import Span
from hopscope.tracing.servers.uvicorn_protocols import H11Protocol, HttpToolsProtocol
from hopscope.tracing.tracefile import load
from servers import uvicorn_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from test_quart import serve_hypercorn
from test_run import Run, _env, _free_port
from traces import finished

TIMEOUT = 10.0
#: A request's line in what ``hopscope run --headless`` says.
LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ", re.M)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(source))


def _answers(url: str) -> Callable[[], bool]:
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    return answers


def _app_spans(trace: Path) -> list[Span]:
    return [span for loaded in load(trace) for span in loaded.spans.values() if span.hop == "app"]


def _by_name(spans: list[Span]) -> dict[str, Span]:
    return {span.name: span for span in spans}


def _raw(port: int, request: bytes) -> bytes:
    """One exchange on its own connection, read to its end; the Date header dropped."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(request)
        received = []
        while chunk := conn.recv(65536):
            received.append(chunk)
    return re.sub(rb"(?im)^date: [^\r]*\r\n", b"", b"".join(received))


def _exchanges(port: int, paths: list[str]) -> dict[str, bytes]:
    answers = {}
    for line in paths:
        method, _, path = line.partition(" ")
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        answers[line] = _raw(port, f"{head}Content-Length: 0\r\n\r\n".encode())
    return answers


@contextlib.contextmanager
def _bare(command: list[str], cwd: Path, url: str) -> Iterator[None]:
    """The same server command without hopscope: the reference answers."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(url)():
            assert proc.poll() is None, "the bare server exited"
            assert time.monotonic() < deadline, "the bare server did not answer"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


# -- 1. Quart's WebSocket routes ----------------------------------------------------------

QUART_WS_APP = """
from quart import Quart, websocket

app = Quart(__name__)


@app.route("/ping")
async def ping():
    return "pong"


@app.websocket("/ws/<name>")
async def ws(name):
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message == "bye":
            await websocket.close(4001, "done")
            return
        if isinstance(message, bytes):
            await websocket.send(message[::-1])
        else:
            await websocket.send(f"{name}:{message}")
"""


def _websocket_talk(url: str) -> None:
    """Both ways, text and binary, then the app closes with its own code."""
    with websockets.sync.client.connect(url, open_timeout=TIMEOUT) as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "alice:hi"
        ws.send(b"\x01\x02\x03")
        assert ws.recv(timeout=TIMEOUT) == b"\x03\x02\x01"
        ws.send("bye")
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
        assert (ws.close_code, ws.close_reason) == (4001, "done")


def _check_websocket_span(spans: list[Span], route: str = "/ws/<name>") -> None:
    (span,) = [span for span in spans if span.name.startswith("WS ")]
    assert span.name == "WS /ws/alice"
    attrs = span.attrs
    assert attrs.get("http.route") == route
    assert attrs["network.protocol.name"] == "websocket"
    assert attrs["websocket.accepted"] is True
    assert (attrs["websocket.messages_in"], attrs["websocket.bytes_in"]) == (3, 8)
    assert (attrs["websocket.messages_out"], attrs["websocket.bytes_out"]) == (2, 11)
    assert (attrs["websocket.close_code"], attrs["websocket.close_reason"]) == (4001, "done")
    messages = [
        (event.attrs["direction"], event.attrs.get("text", event.attrs.get("bytes")))
        for event in span.events
        if event.name == "websocket.message"
    ]
    assert [direction for direction, _ in messages] == ["in", "out", "in", "out", "in"]
    assert messages[0][1] == "hi" and messages[1][1] == "alice:hi"
    names = [event.name for event in span.events]
    assert names.index("websocket.accept") < names.index("websocket.message")
    assert names.index("websocket.close") > max(
        i for i, name in enumerate(names) if name == "websocket.message"
    )
    (close,) = [event for event in span.events if event.name == "websocket.close"]
    assert close.attrs == {"code": 4001, "reason": "done"}


@pytest.mark.parametrize("how", ["hypercorn", "quart run", "target"])
def test_quart_websocket_route_is_recorded_with_the_whole_exchange(
    tmp_path: Path, runs: Callable[..., Run], how: str
) -> None:
    _write(tmp_path, {"qapp.py": QUART_WS_APP})
    port = _free_port()
    env = None
    if how == "hypercorn":
        args = ["--headless", "--", "hypercorn", "-b", f"127.0.0.1:{port}", "qapp:app"]
    elif how == "quart run":
        args = ["--headless", "--", "quart", "run", "-p", str(port)]
        env = _env(QUART_APP="qapp:app")
    else:  # hopscope run TARGET wraps the app itself (uvicorn): the route patches only
        args = ["--headless", "--no-proxy", "--port", str(port), "qapp:app"]
    run = runs(tmp_path, *args, env=env)
    try:
        run.wait_for(_answers(f"http://127.0.0.1:{port}/ping"), "the app to answer")
        _websocket_talk(f"ws://127.0.0.1:{port}/ws/alice")
        run.wait_for(lambda: "WS /ws/alice" in run.out, "the WebSocket's line")
    finally:
        run.stop()
    _check_websocket_span(_app_spans(run.trace))


# -- 2. how a response ended, and the route of what a FastAPI mount serves ----------------


async def _fails_mid_stream(request: Request) -> StreamingResponse:
    async def parts() -> Any:
        yield b"first\n"
        raise RuntimeError("broke mid-stream")

    return StreamingResponse(parts(), media_type="text/plain")


@contextlib.contextmanager
def _uvicorn(app: Any, protocol: type) -> Iterator[int]:
    with uvicorn_thread(app, http=protocol, log_level="critical") as served:
        yield served.port


@pytest.mark.parametrize("protocol", [HttpToolsProtocol, H11Protocol])
def test_a_response_uvicorn_cuts_after_the_app_failed_is_not_a_client_that_left(
    protocol: type, hop_sink: MemorySink
) -> None:
    """uvicorn closes the connection when the app raises after its response started: the
    server span said ``disconnected`` (shown as client-gone), though the client stayed."""
    app = wrap(Starlette(routes=[Route("/fail", _fails_mid_stream)]), sink=hop_sink)
    with _uvicorn(app, protocol) as port:
        answer = _raw(port, b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive: uvicorn cuts
        (trace,) = finished(hop_sink, 2)
    assert answer.endswith(b"\r\n\r\n6\r\nfirst\n\r\n")  # the first chunk, then closed
    server = trace.root
    assert server is not None and server.hop == "server"
    assert "disconnected" not in server.attrs
    assert server.attrs.get("response.incomplete") is True
    (app_span,) = [s for s in trace.spans.values() if s.hop == "app" and s.name != "background"]
    (exception,) = [event for event in app_span.events if event.name == "exception"]
    assert exception.attrs["phase"] == "after_response_start"
    assert "disconnected" not in app_span.attrs


@pytest.mark.parametrize("protocol", [HttpToolsProtocol, H11Protocol])
def test_a_client_that_leaves_mid_stream_is_still_one_that_left(
    protocol: type, hop_sink: MemorySink
) -> None:
    """The other side of the test above: the app is still streaming when the client goes."""
    stopped = threading.Event()

    async def endless(request: Request) -> StreamingResponse:
        async def parts() -> Any:
            try:
                while True:
                    yield b"x" * 4096
                    await asyncio.sleep(0.001)
            finally:
                stopped.set()

        return StreamingResponse(parts(), media_type="text/plain")

    app = wrap(Starlette(routes=[Route("/endless", endless)]), sink=hop_sink)
    with _uvicorn(app, protocol) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
            conn.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536)
        assert stopped.wait(TIMEOUT)
        (trace,) = finished(hop_sink, 2)
    assert trace.root is not None and trace.root.attrs.get("disconnected") is True
    assert "response.incomplete" not in trace.root.attrs


def test_a_disconnect_hypercorn_reports_while_it_writes_the_last_body_is_no_client_gone() -> None:
    """``wrap(app)`` under hypercorn: it puts ``http.disconnect`` in the app's queue inside
    the send of the last body, and a listener of the app (Starlette's StreamingResponse,
    Django) takes it before that send returns."""

    async def stream(request: Request) -> StreamingResponse:
        async def parts() -> Any:
            for i in range(3):
                yield b"part %d\n" % i

        return StreamingResponse(parts(), media_type="text/plain")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/stream", stream)]), sink=sink)
    with serve_hypercorn(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        for connection in ("keep-alive", "close"):  # (on close: the stream ends at once)
            answer = client.get("/stream", headers={"connection": connection})
            assert answer.text == "part 0\npart 1\npart 2\n"
        sink.flush()
    spans = [span for trace in sink.traces() for span in trace.spans.values()]
    streamed = [span for span in spans if span.name == "GET /stream"]
    assert len(streamed) == 2
    for span in streamed:
        assert span.attrs["http.response.body.size"] == 21
        assert "disconnected" not in span.attrs
        assert not [event for event in span.events if event.name == "disconnect"]


def test_what_a_fastapi_mount_serves_is_named_by_the_mount(tmp_path: Path) -> None:
    """FastAPI's router hands a ``mount()``ed app the request without a ``route`` in the
    scope (Starlette's leaves its ``Mount`` there): StaticFiles and a sub-app's 404 had no
    route at all."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    (tmp_path / "a.txt").write_text("static bytes\n")
    sub = FastAPI()

    @sub.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    app = FastAPI()
    app.mount("/static", StaticFiles(directory=tmp_path))
    app.mount("/sub", sub)
    sink = MemorySink()
    with _uvicorn(wrap(app, sink=sink), HttpToolsProtocol) as port:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
            assert client.get("/static/a.txt").text == "static bytes\n"
            assert client.get("/static/none.txt").status_code == 404
            assert client.get("/sub/items/3").json() == {"item": 3}
            assert client.get("/sub/nowhere").status_code == 404
            assert client.get("/nowhere").status_code == 404
        traces = finished(sink, 5)
    routes = {
        span.name: span.attrs.get("http.route")
        for trace in traces
        for span in trace.spans.values()
        # (the request's own app span: on a loaded machine an app can return more than
        # 10 ms after its response, and that makes a background span beside it)
        if span.hop == "app" and span.name != "background"
    }
    assert routes == {
        "GET /static/a.txt": "/static",
        "GET /static/none.txt": "/static",
        "GET /sub/items/3": "/sub/items/{item_id}",
        "GET /sub/nowhere": "/sub",
        "GET /nowhere": None,
    }


# -- 3. FastAPI and Django ASGI under hopscope run -- uvicorn / hypercorn -----------------

FASTAPI_APP = """
import asyncio

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import StreamingResponse
from fastapi.staticfiles import StaticFiles

app = FastAPI()
router = APIRouter(prefix="/api/v1")
sub = FastAPI()


def need_token(token: str = "") -> str:
    if token != "ok":
        raise HTTPException(status_code=403, detail="no token")
    return token


@app.get("/ping")
async def ping():
    return {"ok": True}


@app.get("/guarded/{thing}")
async def guarded(thing: str, token: str = Depends(need_token)):
    return {"thing": thing}


@app.get("/stream")
async def stream():
    async def parts():
        for i in range(6):
            yield f"part {i}\\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(parts(), media_type="text/plain")


@app.get("/stream-fail")
async def stream_fail():
    async def parts():
        yield b"first\\n"
        raise RuntimeError("broke mid-stream")

    return StreamingResponse(parts(), media_type="text/plain")


async def later(n: int) -> None:
    await asyncio.sleep(0.05)


@app.post("/bg/{n}")
async def bg(n: int, tasks: BackgroundTasks):
    tasks.add_task(later, n)
    return {"queued": n}


@router.get("/users/{uid}")
async def user(uid: int):
    return {"uid": uid}


app.include_router(router)


@sub.get("/items/{item_id}")
async def item(item_id: int):
    return {"item": item_id}


app.mount("/sub", sub)
app.mount("/static", StaticFiles(directory="static"))


@app.websocket("/ws/{room}/{user}")
async def ws(websocket: WebSocket, room: str, user: str):
    await websocket.accept()
    while (text := await websocket.receive_text()) != "bye":
        await websocket.send_text(f"{room}/{user}:{text}")
    await websocket.close(4002, "bye")
"""

FASTAPI_REQUESTS = [
    "GET /ping",
    "GET /guarded/x",
    "GET /guarded/x?token=ok",
    "GET /stream",
    "GET /stream-fail",
    "POST /bg/3",
    "GET /api/v1/users/7",
    "GET /sub/items/5",
    "GET /sub/nowhere",
    "GET /static/a.txt",
    "GET /nowhere",
]


def _served_both_ways(
    tmp_path: Path,
    runs: Callable[..., Run],
    command: list[str],
    port: int,
    requests: list[str],
    more: Callable[[], None] = lambda: None,
) -> tuple[dict[str, bytes], dict[str, bytes], list[Span], str]:
    """The answers of the bare server and of the same command under ``hopscope run``, the
    app spans it recorded, and the lines it printed."""
    base = f"http://127.0.0.1:{port}"
    with _bare(command, tmp_path, f"{base}/ping"):
        bare = _exchanges(port, requests)
    run = runs(tmp_path, "--headless", "--", *command)
    try:
        run.wait_for(_answers(f"{base}/ping"), "the app to answer")
        traced = _exchanges(port, requests)
        more()
        run.wait_for(lambda: len(LINE.findall(run.out)) >= len(requests), "the requests' lines")
    finally:
        run.stop()
    return bare, traced, _app_spans(run.trace), run.out


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_fastapi_under_hopscope_run(tmp_path: Path, runs: Callable[..., Run], server: str) -> None:
    """Starlette's StreamingResponse listens for ``http.disconnect`` under hypercorn (ASGI
    spec 2.3), which reports one while it writes the last body: it said client-gone."""
    _write(tmp_path, {"fapp.py": FASTAPI_APP, "static/a.txt": "static bytes\n"})
    port = _free_port()
    if server == "uvicorn":
        command = ["uvicorn", "--port", str(port), "fapp:app"]
    else:
        command = ["hypercorn", "-b", f"127.0.0.1:{port}", "fapp:app"]

    def websocket() -> None:
        url = f"ws://127.0.0.1:{port}/ws/r1/u2"
        with websockets.sync.client.connect(url, open_timeout=TIMEOUT) as ws:
            ws.send("hi")
            assert ws.recv(timeout=TIMEOUT) == "r1/u2:hi"
            ws.send("bye")
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                ws.recv(timeout=TIMEOUT)
            assert ws.close_code == 4002

    bare, traced, spans, out = _served_both_ways(
        tmp_path, runs, command, port, FASTAPI_REQUESTS, websocket
    )
    assert traced == bare
    named = _by_name(spans)
    routes = {name: span.attrs.get("http.route") for name, span in named.items()}
    assert routes == {
        "GET /ping": "/ping",
        "GET /guarded/x": "/guarded/{thing}",  # (both: the names are the same)
        "GET /stream": "/stream",
        "GET /stream-fail": "/stream-fail",
        "POST /bg/3": "/bg/{n}",
        "GET /api/v1/users/7": "/api/v1/users/{uid}",
        "GET /sub/items/5": "/sub/items/{item_id}",
        # FastAPI's router leaves no route in the scope for a mount: its root path names it.
        "GET /sub/nowhere": "/sub",
        "GET /static/a.txt": "/static",
        "GET /nowhere": None,
        "background": None,
        "WS /ws/r1/u2": "/ws/{room}/{user}",
    }
    statuses = sorted(
        (span.name, span.attrs.get("http.response.status_code"))
        for span in spans
        if span.name.startswith("GET /guarded")
    )
    assert statuses == [("GET /guarded/x", 200), ("GET /guarded/x", 403)]
    guarded = [span for span in spans if span.name == "GET /guarded/x"]
    assert not any(span.attrs.get("error") for span in guarded)  # a response, not an error
    failed = named["GET /stream-fail"]
    assert failed.attrs["error"] is True and "disconnected" not in failed.attrs
    (exception,) = [event for event in failed.events if event.name == "exception"]
    assert exception.attrs["phase"] == "after_response_start"
    assert named["background"].parent_id == named["POST /bg/3"].span_id
    stream = named["GET /stream"]
    assert stream.attrs["http.response.body.size"] == 42
    assert not [span.name for span in spans if "disconnected" in span.attrs]
    # (uvicorn closed the failed stream's connection, the client stayed)
    assert not [line for line in out.splitlines() if "client-gone" in line]
    ws = named["WS /ws/r1/u2"]
    assert ws.attrs["websocket.close_code"] == 4002 and ws.attrs["websocket.messages_in"] == 2


DJANGO_ASGI = {
    "mysite/__init__.py": "",
    "mysite/settings.py": """
        SECRET_KEY = "test-only"
        DEBUG = False
        ALLOWED_HOSTS = ["*"]
        ROOT_URLCONF = "mysite.urls"
        INSTALLED_APPS = []
        MIDDLEWARE = []
        DATABASES = {}
        USE_TZ = True
    """,
    "mysite/urls.py": """
        import asyncio

        from django.http import JsonResponse, StreamingHttpResponse
        from django.urls import path


        async def ping(request):
            return JsonResponse({"ok": True})


        async def item(request, item_id):
            await asyncio.sleep(0)
            return JsonResponse({"id": item_id})


        async def stream(request, n):
            async def parts():
                for i in range(n):
                    yield f"part {i}\\n".encode()
                    await asyncio.sleep(0)

            return StreamingHttpResponse(parts(), content_type="text/plain")


        async def stream_fail(request):
            async def parts():
                yield b"first\\n"
                raise RuntimeError("broke mid-stream")

            return StreamingHttpResponse(parts(), content_type="text/plain")


        async def boom(request):
            raise ValueError("view failed")


        urlpatterns = [
            path("ping", ping),
            path("items/<int:item_id>", item),
            path("stream/<int:n>", stream),
            path("stream-fail", stream_fail),
            path("boom", boom),
        ]
    """,
    "mysite/asgi.py": """
        import os

        from django.core.asgi import get_asgi_application

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
        application = get_asgi_application()
    """,
}


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_django_asgi_under_hopscope_run(
    tmp_path: Path, runs: Callable[..., Run], server: str
) -> None:
    """Django listens for ``http.disconnect`` while it sends its response, and hypercorn
    reports one while it writes the last body: every request said client-gone there."""
    _write(tmp_path, DJANGO_ASGI)
    port = _free_port()
    if server == "uvicorn":
        command = ["uvicorn", "--port", str(port), "mysite.asgi:application"]
    else:
        command = ["hypercorn", "-b", f"127.0.0.1:{port}", "mysite.asgi:application"]
    requests = ["GET /ping", "GET /items/4", "GET /stream/6", "GET /stream-fail", "GET /boom",
                "GET /nowhere"]  # fmt: skip
    bare, traced, spans, out = _served_both_ways(tmp_path, runs, command, port, requests)
    assert traced == bare
    # Django closes its response in a worker thread after the last body: on a loaded
    # machine that may pass for a background span (see asgi.BACKGROUND_MIN_NS).
    named = {name: span for name, span in _by_name(spans).items() if name != "background"}
    facts = {
        name: (span.attrs.get("http.route"), span.attrs.get("http.response.status_code"))
        for name, span in named.items()
    }
    assert facts == {
        "GET /ping": ("/ping", 200),
        "GET /items/4": ("/items/<int:item_id>", 200),
        "GET /stream/6": ("/stream/<int:n>", 200),
        "GET /stream-fail": ("/stream-fail", 200),
        "GET /boom": ("/boom", 500),
        "GET /nowhere": (None, 404),
    }
    stream = named["GET /stream/6"]
    assert stream.attrs["http.response.body.size"] == 42
    summary = [event for event in stream.events if event.name == "response.body.summary"]
    assert summary and summary[0].attrs["count"] == 6
    failed = named["GET /stream-fail"]
    assert failed.attrs["error"] is True and "disconnected" not in failed.attrs
    (exception,) = [event for event in failed.events if event.name == "exception"]
    assert exception.attrs["phase"] == "after_response_start"
    # Django answers a failing view itself (500): its log line carries the traceback.
    (log,) = [event for event in named["GET /boom"].events if event.name == "log"
              and event.attrs.get("logger") == "django.request"]  # fmt: skip
    assert "ValueError: view failed" in log.attrs["exception.stacktrace"]
    assert not [span.name for span in spans if "disconnected" in span.attrs]
    assert not [line for line in out.splitlines() if "client-gone" in line]


# -- 4. hypercorn over HTTP/2 (h2c with prior knowledge), two workers ----------------------

H2_APP = """
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route


async def echo(request):
    body = await request.body()
    name = request.path_params["name"].encode()
    return Response(b"got:" + body + b":" + name, media_type="text/plain")


app = Starlette(routes=[Route("/echo/{name}", echo, methods=["GET", "POST"])])
"""


def test_hypercorn_http2_streams_of_one_connection_are_traces_of_their_own(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    _write(tmp_path, {"h2app.py": H2_APP})
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    run = runs(tmp_path, "--headless", "--", "hypercorn", "--workers", "2", "-b",
               f"127.0.0.1:{port}", "h2app:app")  # fmt: skip
    try:
        run.wait_for(_answers(f"{base}/echo/up"), "the app to answer")

        async def streams() -> list[httpx.Response]:
            async with httpx.AsyncClient(http1=False, http2=True, base_url=base) as client:
                return await asyncio.gather(
                    *(client.post(f"/echo/n{i}", content=b"body%d" % i) for i in range(4))
                )

        answers = asyncio.run(streams())
        assert [(r.http_version, r.text) for r in answers] == [
            ("HTTP/2", f"got:body{i}:n{i}") for i in range(4)
        ]
        run.wait_for(lambda: run.out.count("POST /echo/n") == 4, "the streams' lines")
    finally:
        run.stop()
    spans = [span for span in _app_spans(run.trace) if span.name.startswith("POST")]
    assert sorted(span.name for span in spans) == [f"POST /echo/n{i}" for i in range(4)]
    assert len({span.trace_id for span in spans}) == 4  # a trace per stream
    assert len({span.attrs["client.port"] for span in spans}) == 1  # one connection
    for span in spans:
        i = span.name[-1]
        assert span.attrs["network.protocol.version"] == "2"
        assert span.attrs["http.route"] == "/echo/{name}"
        assert b64decode(span.attrs["http.request.body"]) == f"body{i}".encode()
        assert b64decode(span.attrs["http.response.body"]) == f"got:body{i}:n{i}".encode()
