"""Session 9 review: bugs found in the session's changes, each with the test that shows it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from hopscope.app import run


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog is Linux's")
def test_a_slow_watchdog_start_never_stops_a_running_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watchdog's start waited 10 s for its intermediate process; past that (a very
    loaded machine) the pipe's write end was closed, which the watchdog, started all the
    same, took for hopscope's death: it stopped the server while hopscope ran on."""
    monkeypatch.setattr(run, "STOP_GRACE", 0.2)
    real_wait = subprocess.Popen.wait

    def slow(self: subprocess.Popen[Any], timeout: float | None = None) -> int:
        if "-I" in self.args and timeout is not None:  # the watchdog's intermediate
            real_wait(self)  # (it ends at once; the caller gave up all the same)
            raise subprocess.TimeoutExpired(self.args, timeout)
        return real_wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", slow)
    proc = run._spawn([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ))
    monkeypatch.undo()
    try:
        deadline = time.monotonic() + 3.0  # (the watchdog would act after 0.2 s)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the watchdog stopped a server hopscope still runs"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        run._stop_strays(proc.pid)
    assert proc.pid not in run._watchdogs


def test_a_large_h2c_body_does_not_make_the_request_behind_it_too_long() -> None:
    """An h2c Upgrade request's body is read behind a made head fed on the counting path
    with ``_begin`` set, so :meth:`HttpListener._received_counted` took the whole read
    (head, body) for a head continued: with a body past MAX_HEAD and the head of the
    request pipelined behind it still incomplete, that request was refused 431.  A plain
    POST with the same body and the same split is answered (the last assert)."""
    from test_edges_s9 import H2C_POST, echo
    from test_proxy import HOST, proxy_to, serve
    from test_proxy_listener import read_responses

    body = b"a" * 70_000
    plain = b"POST /h2c HTTP/1.1\r\nHost: x\r\n"
    statuses = []
    for head in (H2C_POST, plain):
        request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        with serve(echo) as upstream, proxy_to(upstream.url) as proxy:
            with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
                sock.sendall(request + b"GET /next HTTP/1.1\r\nHo")
                time.sleep(0.3)  # (the rest of the head in a read of its own)
                sock.sendall(b"st: x\r\n\r\n")
                responses = read_responses(sock, 2)
        statuses.append([response.split(b" ", 2)[1] for response in responses])
    assert statuses == [[b"200", b"200"], [b"200", b"200"]]


class _Unprintable(Exception):
    """An app's exception whose ``str()`` fails (a bug of the app's, or a lazy message)."""

    def __str__(self) -> str:
        raise RuntimeError("no str() for this one")


async def _get(app: Any) -> None:
    """Call the ASGI ``app`` with one ``GET /`` (no body; what it sends is dropped)."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
             "headers": [], "query_string": b"", "http_version": "1.1",
             "scheme": "http", "root_path": "", "client": None, "server": None}  # fmt: skip
    await app(scope, receive, send)


def test_an_exception_whose_str_fails_reaches_the_server_as_the_app_raised_it() -> None:
    """exception_event called ``str(exc)`` unguarded: the middlewares (and a user span)
    then raised the RuntimeError of that ``__str__`` in place of the app's exception,
    and so did the app's own log call for Quart's WebSocket errors (emitted from inside
    the log record factory: see _WebSocketRecorder.emit)."""
    from hopscope.tracing import span
    from hopscope.tracing.asgi import ASGIMiddleware
    from hopscope.tracing.context import SpanContext, current
    from hopscope.tracing.sinks import MemorySink
    from hopscope.tracing.wsgi import WSGIMiddleware

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        raise _Unprintable()

    with pytest.raises(_Unprintable):
        asyncio.run(_get(ASGIMiddleware(asgi_app, sink=MemorySink())))

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        raise _Unprintable()

    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "x", "SERVER_PORT": "80",
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
    }  # fmt: skip
    with pytest.raises(_Unprintable):
        WSGIMiddleware(wsgi_app, sink=MemorySink())(environ, lambda *args: None)

    sink = MemorySink()
    token = current.set(SpanContext(sink, 1, 1))
    try:
        with pytest.raises(_Unprintable), span("work"):
            raise _Unprintable()
    finally:
        current.reset(token)
    (event,) = [e for e in sink.events() if e.get("name") == "exception"]
    assert event["attrs"]["exception.message"] == "<exception str() failed>"


def test_a_fastapi_yield_dependency_closed_after_the_response_is_a_background_span() -> None:
    """FastAPI closes a dependency with ``yield`` (``get_db()``: ``yield db`` then
    ``db.close()``) after the response went out.  Session 9 made a late return of a
    FastAPI app a background span only when the request made a BackgroundTask: that
    closing work, 200 ms here, vanished from the trace (it was a ``background`` span)."""
    from fastapi import Depends, FastAPI
    from hopscope.tracing.asgi import ASGIMiddleware
    from hopscope.tracing.sinks import MemorySink

    app = FastAPI()

    async def session() -> Any:
        yield 1
        await asyncio.sleep(0.2)  # (closing it: after the response)

    @app.get("/")
    async def root(db: Any = Depends(session)) -> dict[str, int]:  # noqa: B008
        return {"db": db}

    sink = MemorySink()
    middleware = ASGIMiddleware(app, sink=sink)

    asyncio.run(_get(middleware))
    sink.flush()
    names = {event.get("name") for event in sink.events()}
    assert "background" in names
