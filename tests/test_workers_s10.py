"""The concurrency models people deploy with, tried for real (session 10).

gunicorn's gevent workers, eventlet, hypercorn's trio worker, uvicorn's uvloop and asyncio
loops under each of its WebSocket implementations: hopscope must answer byte for byte as
the bare server does, record every request in the worker that answered it, and get its
records out of a process whose threads a green-thread library has replaced.

gevent, eventlet and trio are optional here (``pytest.importorskip``): a test needing one
that is not installed is skipped.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
from hopscope.tracing import MemorySink, load, wrap
from hopscope.tracing.model import Span
from hopscope.tracing.sinks import WIRE_MAGIC, decode_frame
from servers import interrupt
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from test_run import Run, _alive, _env

TIMEOUT = 10.0

#: What the byte-for-byte comparisons send: plain, streamed, a large POST, 404 and 500.
REQUESTS: list[tuple[str, str, bytes | None]] = [
    ("GET", "/", None),
    ("GET", "/stream", None),
    ("POST", "/post", b"x" * (1 << 20)),
    ("GET", "/nope", None),
    ("GET", "/boom", None),
]


# -- helpers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fetch(port: int, method: str, path: str, body: bytes | None = None) -> tuple[Any, ...]:
    """One request on its own connection: status, headers (but the clock's) and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        data = response.read()
        headers = [(k, v) for k, v in response.getheaders() if k.lower() != "date"]
        return response.status, headers, data
    finally:
        conn.close()


def _wait_answering(port: int, proc: subprocess.Popen[bytes], err: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{err.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing answered on port {port}:\n{err.read_text()}")


class _Bare:
    """The same server command without hopscope, output in files."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.err = cwd / f"bare-err-{time.monotonic_ns()}.txt"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )

    def stop(self) -> None:
        interrupt(self.proc)


def _app_span(spans: list[Span]) -> Span:
    (app,) = [s for s in spans if s.hop == "app" and "interface" in s.attrs]
    return app


# -- eventlet: no select.poll -------------------------------------------------------------

EVENTLET_EXIT = """
import eventlet
eventlet.monkey_patch()
import os, sys, time
from hopscope.tracing.sinks import SocketSink
sink = SocketSink(sys.argv[1], max_pending=64 << 20)
sink.emit(("p", time.time_ns(), 1, 2, "first", None))
eventlet.sleep(0.3)  # the sink's (green) thread connects and sends it
for n in range(5):
    sink.emit(("p", time.time_ns(), 1, 2, f"late{n}", None))
if sys.argv[2] == "big":
    # More than the socket's buffers take while the collector does not read: frames
    # are still pending at exit, and the sink waits for the socket to take them.
    for n in range(150):
        sink.emit(("p", time.time_ns(), 1, 2, f"big{n}", {"data": os.urandom(50_000).hex()}))
    eventlet.sleep(0.3)
    assert sink._pending, "nothing pending: the test would not test the wait"
print("exiting", flush=True)
# exits at once: the last records go at exit (atexit closes the sink)
"""


def _frames(conn: socket.socket) -> list[tuple[Any, ...]]:
    """Every record a sink sent on ``conn`` until it closed."""
    data = b""
    conn.settimeout(TIMEOUT)
    while chunk := conn.recv(1 << 20):
        data += chunk
    assert data.startswith(WIRE_MAGIC)
    records, rest = [], data[len(WIRE_MAGIC) :]
    while rest:
        (size,) = struct.unpack("!I", rest[:4])
        records += decode_frame(rest[4 : 4 + size])[2]
        rest = rest[4 + size :]
    return records


@pytest.mark.parametrize("pending", ["small", "big"])
def test_socket_sink_delivers_at_exit_under_eventlet(tmp_path: Path, pending: str) -> None:
    """eventlet's monkey-patching removes ``select.poll``, which the SocketSink's flush
    waited with: every exit printed a traceback and lost the records still queued, and
    frames the socket had not taken yet (``big``: the collector reads only once the app
    exits) could not be waited for."""
    pytest.importorskip("eventlet")
    script = tmp_path / "app.py"
    script.write_text(EVENTLET_EXIT)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-W", "ignore", str(script), address, pending],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        try:
            server.settimeout(TIMEOUT)
            conn, _ = server.accept()
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"exiting\n"
            with conn:
                records = _frames(conn)
            _, err = proc.communicate(timeout=TIMEOUT * 2)
        finally:
            if proc.poll() is None:  # pragma: no cover - a failure: do not leave it
                proc.kill()
                proc.wait(10)
    stderr = err.decode(errors="replace")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "hopscope" not in stderr, stderr
    names = ["first", *(f"late{n}" for n in range(5))]
    if pending == "big":
        names += [f"big{n}" for n in range(150)]
    assert [r[4] for r in records] == names


# -- gunicorn -k gevent --------------------------------------------------------------------

GEVENT_APP = """
import os

from flask import Flask, Response, request
from gevent import monkey

app = Flask(__name__)
# Blocks the whole worker (a green sleep would let it take the next connection too), so
# the request sent meanwhile is answered by the other worker.
block = monkey.get_original("time", "sleep")


@app.get("/")
def index():
    return "hello"


@app.get("/stream")
def stream():
    return Response((f"chunk {n}\\n" for n in range(5)), mimetype="text/plain")


@app.post("/post")
def post():
    data = request.get_data()
    return {"len": len(data)}


@app.get("/boom")
def boom():
    raise RuntimeError("boom")


@app.get("/pid")
def pid():
    if "slow" in request.args:
        block(0.4)
    return str(os.getpid())
"""


def _two_pids(port: int) -> tuple[list[int], int]:
    """The pids of the two workers that answered a slow request and one sent meanwhile,
    and how many requests that took."""
    answers: dict[str, int] = {}

    def get(name: str, path: str) -> None:
        answers[name] = int(_fetch(port, "GET", path)[2])

    sent = 0
    while sent < 10:
        first = threading.Thread(target=get, args=("slow", "/pid?slow=1"))
        first.start()
        time.sleep(0.15)
        get("other", "/pid?n=2")
        first.join(TIMEOUT)
        sent += 2
        if answers["slow"] != answers["other"]:
            break
    return [answers["slow"], answers["other"]], sent


def test_gunicorn_gevent_workers_answer_as_bare_and_record_both_pids(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("gevent")
    (tmp_path / "app.py").write_text(textwrap.dedent(GEVENT_APP))
    bare_port, port = _free_port(), _free_port()
    gunicorn = ["gunicorn", "-k", "gevent", "-w", "2", "app:app"]
    bare = _Bare([*gunicorn, "-b", f"127.0.0.1:{bare_port}"], tmp_path)
    run = runs(tmp_path, "--headless", "--", *gunicorn, "-b", f"127.0.0.1:{port}")
    try:
        _wait_answering(bare_port, bare.proc, bare.err)
        _wait_answering(port, run.proc, run.err_path)
        for method, path, body in REQUESTS:
            assert _fetch(port, method, path, body) == _fetch(bare_port, method, path, body)
        pids, sent = _two_pids(port)
        assert len(set(pids)) == 2, pids
        count = len(REQUESTS) + sent
        run.wait_for(lambda: run.out.count("\n") >= count, "a tail line per request")
    finally:
        bare.stop()
    assert run.stop() == 0, run.err
    assert "Warning" not in run.err, run.err  # gevent's MonkeyPatchWarning among others
    traces = {(t.method, t.path, t.status) for t in load(run.trace)}
    assert {("GET", "/", 200), ("POST", "/post", 200), ("GET", "/nope", 404)} <= traces
    recorded = []
    for trace in load(run.trace):
        (server,) = trace.by_hop("server")
        app = _app_span(list(trace.spans.values()))
        assert app.parent_id == server.span_id and app.finished and server.finished
        assert server.attrs["server.worker.class"] == "GeventWorker"
        assert server.attrs["process.pid"] == app.attrs["process.pid"]
        if trace.path == "/pid":
            recorded.append(app.attrs["process.pid"])
    assert set(pids) <= set(recorded)
    assert not any(_alive(pid) for pid in pids)


# -- hypercorn -k trio ---------------------------------------------------------------------

TRIO_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute


async def index(request):
    return PlainTextResponse("hello")


async def stream(request):
    async def chunks():
        for n in range(5):
            yield f"chunk {n}\\n"

    return StreamingResponse(chunks(), media_type="text/plain")


async def post(request):
    return JSONResponse({"len": len(await request.body())})


async def boom(request):
    raise RuntimeError("boom")


async def echo(ws):
    await ws.accept()
    async for text in ws.iter_text():
        await ws.send_text("echo:" + text)


app = Starlette(
    routes=[
        Route("/", index),
        Route("/stream", stream),
        Route("/post", post, methods=["POST"]),
        Route("/boom", boom),
        WebSocketRoute("/ws", echo),
    ]
)
"""


def _echo(port: int) -> list[str]:
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws") as ws:
        answers = []
        for text in ("a", "bb"):
            ws.send(text)
            answers.append(str(ws.recv(timeout=TIMEOUT)))
    return answers


def test_hypercorn_trio_worker_answers_as_bare_and_records_http_and_websocket(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("trio")
    (tmp_path / "app.py").write_text(textwrap.dedent(TRIO_APP))
    bare_port, port = _free_port(), _free_port()
    hypercorn = ["hypercorn", "-k", "trio", "app:app"]
    bare = _Bare([*hypercorn, "-b", f"127.0.0.1:{bare_port}"], tmp_path)
    run = runs(tmp_path, "--headless", "--", *hypercorn, "-b", f"127.0.0.1:{port}")
    try:
        _wait_answering(bare_port, bare.proc, bare.err)
        _wait_answering(port, run.proc, run.err_path)
        for method, path, body in REQUESTS:
            assert _fetch(port, method, path, body) == _fetch(bare_port, method, path, body)
        assert _echo(port) == _echo(bare_port) == ["echo:a", "echo:bb"]
        count = len(REQUESTS) + 1
        run.wait_for(lambda: run.out.count("\n") >= count, "a tail line per request")
    finally:
        bare.stop()
    assert run.stop() == 0, run.err
    assert "Warning" not in run.err, run.err
    by_path = {t.path: t for t in load(run.trace)}
    assert {p: by_path[p].status for p in ("/", "/stream", "/post", "/nope")} == {
        "/": 200,
        "/stream": 200,
        "/post": 200,
        "/nope": 404,
    }
    boom = _app_span(list(by_path["/boom"].spans.values()))
    assert (by_path["/boom"].status, boom.attrs["exception.type"]) == (500, "RuntimeError")
    ws = _app_span(list(by_path["/ws"].spans.values()))
    assert ws.attrs["websocket.accepted"] is True and ws.finished
    assert (ws.attrs["websocket.messages_in"], ws.attrs["websocket.messages_out"]) == (2, 2)


# -- uvicorn: loops and WebSocket implementations -----------------------------------------


#: The module of the event loop each WebSocket was served on (uvloop's, or asyncio's).
_LOOPS: list[str] = []


async def _echo_ws(ws: WebSocket) -> None:
    _LOOPS.append(type(asyncio.get_running_loop()).__module__)
    await ws.accept()
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await ws.send_text("echo:" + message["text"])
        else:
            await ws.send_bytes(b"echo:" + message["bytes"])


# uvicorn's legacy ``websockets`` implementation warns that it is deprecated: still tried.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("ws", ["websockets", "websockets-sansio", "wsproto"])
def test_uvicorn_websocket_traces_are_the_same_under_every_loop_and_implementation(
    serve_asgi: Callable[..., AbstractContextManager[str]], loop: str, ws: str
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    if ws == "wsproto":
        pytest.importorskip("wsproto")
    sink = MemorySink()
    _LOOPS.clear()
    app = Starlette(routes=[WebSocketRoute("/ws", _echo_ws)])
    with serve_asgi(wrap(app, sink=sink), loop=loop, ws=ws) as base:
        url = base.replace("http", "ws", 1) + "/ws"
        with websockets.sync.client.connect(url) as client:
            client.send("a")
            assert client.recv(timeout=TIMEOUT) == "echo:a"
            client.send(b"bin")
            assert client.recv(timeout=TIMEOUT) == b"echo:bin"
            client.close(4001, "bye")
        deadline = time.monotonic() + TIMEOUT
        while not any(t.finished for t in sink.traces()) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert _LOOPS and _LOOPS[0].startswith("uvloop" if loop == "uvloop" else "asyncio"), _LOOPS
    (trace,) = sink.traces()
    span = _app_span(list(trace.spans.values()))
    assert span.finished and span.attrs["network.protocol.name"] == "websocket"
    assert {
        key: span.attrs.get(f"websocket.{key}")
        for key in ("accepted", "messages_in", "messages_out", "bytes_in", "bytes_out")
    } == {"accepted": True, "messages_in": 2, "messages_out": 2, "bytes_in": 4, "bytes_out": 14}
    assert (span.attrs["websocket.close_code"], span.attrs["websocket.close_reason"]) == (
        4001,
        "bye",
    )
    messages = [e.attrs for e in span.events if e.name == "websocket.message"]
    assert [(m["direction"], m.get("text"), m.get("bytes")) for m in messages] == [
        ("in", "a", None),
        ("out", "echo:a", None),
        ("in", None, "bin"),
        ("out", None, "echo:bin"),
    ]
