"""The ASGI middleware around real frameworks (Starlette, FastAPI, Django) and under a
real uvicorn: the wrapped app must answer exactly as the bare one, and the trace must say
what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
import websockets.sync.client
from djangotools import django_urls
from fastapi import Depends, FastAPI, Header, HTTPException
from hopscope.tracing import MemorySink, span
from hopscope.tracing.asgi import FIRST_CHUNKS, ASGIMiddleware
from hopscope.tracing.context import SpanContext, current
from hopscope.tracing.model import Span
from hopscope.tracing.records import BODY_LIMIT, legacy
from hopscope.tracing.traceparent import format_traceparent
from pydantic import BaseModel
from servers import uvicorn_thread
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket
from traces import app_span, events, the_trace, user_children
from websockets.exceptions import InvalidStatus

Message = dict[str, Any]
TIMEOUT = 10.0
MB5 = 5 * 1024 * 1024


# -- helpers ----------------------------------------------------------------------------


def http_scope(method: str, path: str, query: bytes = b"", headers: Iterable[Any] = ()) -> Any:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


def exchange(
    app: Any,
    method: str,
    path: str,
    body: Iterable[bytes] = (),
    query: bytes = b"",
    headers: Iterable[Any] = (),
) -> tuple[list[Message], type[BaseException] | None]:
    """Drive ``app`` like a server would; return what it sent and what it raised."""
    chunks = list(body)
    incoming: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []

    async def main() -> type[BaseException] | None:
        complete = asyncio.Event()

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            # No wait_for here: on 3.11 it can swallow a cancellation (Django cancels
            # its disconnect listener once the response is out).
            await complete.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete.set()

        try:
            await asyncio.wait_for(app(http_scope(method, path, query, headers), receive, send), 30)
        except Exception as exc:
            return type(exc)
        return None

    return sent, asyncio.run(main())


def transparent(
    app: Any, method: str, path: str, body: Iterable[bytes] = (), **kwargs: Any
) -> tuple[MemorySink, list[Message]]:
    """Run the bare and the wrapped app on the same request; they must match exactly."""
    body = list(body)
    bare = exchange(app, method, path, body, **kwargs)
    sink = MemorySink()
    wrapped = exchange(ASGIMiddleware(app, sink=sink), method, path, body, **kwargs)
    assert wrapped == bare
    return sink, wrapped[0]


def response_body(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# -- a Starlette app --------------------------------------------------------------------


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"], "q": request.query_params.get("q")})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield f"chunk-{i};".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def json_upload(request: Request) -> Response:
    data = await request.json()
    return JSONResponse({"got": data, "keys": sorted(data)})


async def boom(request: Request) -> Response:
    raise ValueError("boom before the response")


async def stream_boom(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first;"
        yield b"second;"
        raise RuntimeError("boom mid-stream")

    return StreamingResponse(chunks())


async def later() -> None:
    await asyncio.sleep(0.02)


async def background(request: Request) -> Response:
    return PlainTextResponse("queued", background=BackgroundTask(later))


async def user_spans(request: Request) -> Response:
    with span("outer", style="sync"):
        async with span("middle", style="async"):
            with span("inner"):
                pass
    async with span("second"):
        pass
    return PlainTextResponse("spans")


async def thing(request: Request) -> Response:
    return PlainTextResponse(f"thing {request.path_params['tid']}")


sub_app = Starlette(routes=[Route("/things/{tid}", thing)])

starlette_app = Starlette(
    routes=[
        Route("/items/{id}", item),
        Route("/stream", stream),
        Route("/echo", echo, methods=["POST"]),
        Route("/json", json_upload, methods=["POST"]),
        Route("/boom", boom),
        Route("/stream-boom", stream_boom),
        Route("/background", background),
        Route("/spans", user_spans),
        Mount("/sub", app=sub_app),
    ]
)


def test_starlette_json_route_with_a_path_param() -> None:
    sink, sent = transparent(starlette_app, "GET", "/items/42", query=b"q=x%20y")
    assert json.loads(response_body(sent)) == {"id": "42", "q": "x y"}
    s = app_span(the_trace(sink))
    assert s.name == "GET /items/42"
    assert s.attrs["http.route"] == "/items/{id}"
    assert s.attrs["http.response.status_code"] == 200
    assert s.attrs["url.query"] == "q=x%20y"
    assert s.body("response") == response_body(sent)
    assert ("content-type", "application/json") in s.headers("response")
    assert "error" not in s.attrs


def test_starlette_streaming_response_chunks_and_summary() -> None:
    sink, sent = transparent(starlette_app, "GET", "/stream")
    whole = b"".join(f"chunk-{i};".encode() for i in range(10))
    assert response_body(sent) == whole
    s = app_span(the_trace(sink))
    assert events(s, "response.body") == [
        {"size": len(f"chunk-{i};"), "more": True} for i in range(FIRST_CHUNKS)
    ]
    (summary,) = events(s, "response.body.summary")
    assert summary["count"] == 10 and summary["bytes"] == len(whole)
    assert s.attrs["http.response.body.size"] == len(whole)
    assert s.body("response") == whole


def upload_chunks(size: int, chunk: int = 64 * 1024) -> list[bytes]:
    data = bytes(range(256)) * (size // 256)
    return [data[i : i + chunk] for i in range(0, len(data), chunk)]


@pytest.mark.parametrize("limit", [None, 1000])
def test_starlette_large_bodies_both_ways(limit: int | None) -> None:
    chunks = upload_chunks(MB5)
    whole = b"".join(chunks)
    bare = exchange(starlette_app, "POST", "/echo", chunks)
    sink = MemorySink()
    options = {} if limit is None else {"body_limit": limit}
    wrapped = exchange(ASGIMiddleware(starlette_app, sink=sink, **options), "POST", "/echo", chunks)
    assert wrapped == bare and response_body(wrapped[0]) == whole
    s = app_span(the_trace(sink))
    kept = BODY_LIMIT if limit is None else limit
    for direction in ("request", "response"):
        assert s.attrs[f"http.{direction}.body.size"] == MB5
        assert s.attrs[f"http.{direction}.body.truncated"] is True
        assert s.body(direction) == whole[:kept]
    assert len(events(s, "request.body")) == FIRST_CHUNKS
    (summary,) = events(s, "request.body.summary")
    assert summary["count"] == len(chunks) and summary["bytes"] == MB5


def test_starlette_json_upload() -> None:
    payload = json.dumps({"name": "widget", "tags": ["a", "b"]}).encode()
    sink, sent = transparent(starlette_app, "POST", "/json", [payload])
    assert json.loads(response_body(sent))["keys"] == ["name", "tags"]
    s = app_span(the_trace(sink))
    assert s.body("request") == payload and s.attrs["http.request.body.size"] == len(payload)
    assert s.attrs["http.request.body.truncated"] is False
    assert s.attrs["http.route"] == "/json"


def test_starlette_not_found() -> None:
    sink, sent = transparent(starlette_app, "GET", "/nowhere")
    assert sent[0]["status"] == 404
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 404
    assert "http.route" not in s.attrs and "error" not in s.attrs
    assert not events(s, "exception")


def test_starlette_exception_before_the_response() -> None:
    sink, sent = transparent(starlette_app, "GET", "/boom")
    assert sent[0]["status"] == 500
    trace = the_trace(sink)
    s = app_span(trace)
    (exc,) = events(s, "exception")
    assert exc["phase"] == "before_response"
    assert exc["exception.type"] == "builtins.ValueError"
    assert exc["exception.message"] == "boom before the response"
    assert s.attrs["error"] is True and s.attrs["exception.type"] == "ValueError"
    assert s.attrs["http.response.status_code"] == 500 and trace.error
    assert not trace.children(s)


def test_starlette_exception_after_the_response_started() -> None:
    sink, sent = transparent(starlette_app, "GET", "/stream-boom")
    assert sent[0]["status"] == 200
    s = app_span(the_trace(sink))
    (exc,) = events(s, "exception")
    assert exc["phase"] == "after_response_start"
    assert exc["exception.type"] == "builtins.RuntimeError"
    assert s.attrs["error"] is True and s.attrs["http.response.status_code"] == 200
    assert s.body("response") == b"first;second;"


@pytest.mark.parametrize(("path", "error"), [("/boom", ValueError), ("/stream-boom", RuntimeError)])
def test_httpx_sees_the_same_exception_from_wrapped_and_bare(
    path: str, error: type[Exception]
) -> None:
    async def get(app: Any, raise_app_exceptions: bool) -> httpx.Response:
        transport = httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    for app in (starlette_app, ASGIMiddleware(starlette_app, sink=MemorySink())):
        with pytest.raises(error):
            asyncio.run(get(app, True))
    bare = asyncio.run(get(starlette_app, False))
    wrapped = asyncio.run(get(ASGIMiddleware(starlette_app, sink=MemorySink()), False))
    assert (wrapped.status_code, wrapped.headers.raw, wrapped.content) == (
        bare.status_code,
        bare.headers.raw,
        bare.content,
    )


def test_starlette_background_task_is_a_child_span() -> None:
    sink, sent = transparent(starlette_app, "GET", "/background")
    assert response_body(sent) == b"queued"
    trace = the_trace(sink)
    s = app_span(trace)
    (bg,) = trace.children(s)
    assert (bg.name, bg.hop) == ("background", "app")
    assert bg.start == s.end and bg.end is not None and bg.end > bg.start
    assert "error" not in bg.attrs and "error" not in s.attrs


def test_user_spans_nest_under_the_app_span() -> None:
    sink, sent = transparent(starlette_app, "GET", "/spans")
    assert response_body(sent) == b"spans"
    trace = the_trace(sink)
    s = app_span(trace)
    outer, second = user_children(trace, s)
    (middle,) = trace.children(outer)
    (inner,) = trace.children(middle)
    assert [x.name for x in (outer, middle, inner, second)] == [
        "outer",
        "middle",
        "inner",
        "second",
    ]
    assert outer.attrs["style"] == "sync" and middle.attrs["style"] == "async"
    for user in (outer, middle, inner, second):
        assert user.finished and user.attrs["span.kind"] == "user"
        assert s.start is not None and s.end is not None and user.start is not None
        assert s.start <= user.start and user.end is not None and user.end <= s.end
    assert not trace.children(inner) and not trace.children(second)


def test_mounted_sub_app_route_includes_the_mount_prefix() -> None:
    sink, sent = transparent(starlette_app, "GET", "/sub/things/9")
    assert response_body(sent) == b"thing 9"
    s = app_span(the_trace(sink))
    assert s.attrs["http.route"] == "/sub/things/{tid}"
    assert s.attrs["url.path"] == "/sub/things/9"


def test_not_found_inside_a_mount_names_only_the_mount() -> None:
    sink, sent = transparent(starlette_app, "GET", "/sub/missing")
    assert sent[0]["status"] == 404
    assert app_span(the_trace(sink)).attrs["http.route"] == "/sub"


# -- FastAPI ----------------------------------------------------------------------------


class NewItem(BaseModel):
    name: str
    price: float


def require_token(x_token: Annotated[str | None, Header()] = None) -> str:
    if x_token != "secret":
        raise HTTPException(status_code=403, detail="bad token")
    return x_token


fastapi_app = FastAPI()


@fastapi_app.get("/users/{user_id}")
def get_user(user_id: int, token: Annotated[str, Depends(require_token)]) -> dict[str, Any]:
    # A sync endpoint runs in a worker thread: the request's context must follow it.
    with span("lookup", user=user_id):
        return {"id": user_id, "token": token}


@fastapi_app.post("/items")
async def create_item(new: NewItem) -> dict[str, Any]:
    return {"name": new.name, "double": new.price * 2}


def test_fastapi_route_dependency_and_sync_endpoint() -> None:
    headers = [(b"x-token", b"secret")]
    sink, sent = transparent(fastapi_app, "GET", "/users/5", headers=headers)
    assert json.loads(response_body(sent)) == {"id": 5, "token": "secret"}
    trace = the_trace(sink)
    s = app_span(trace)
    assert s.attrs["http.route"] == "/users/{user_id}"
    assert s.attrs["http.response.status_code"] == 200
    (lookup,) = user_children(trace, s)
    assert lookup.name == "lookup" and lookup.attrs["user"] == 5
    assert lookup.attrs["thread.id"] != s.attrs["thread.id"]


def test_fastapi_http_exception_is_a_response_not_an_error() -> None:
    sink, sent = transparent(fastapi_app, "GET", "/users/5")
    assert sent[0]["status"] == 403
    assert json.loads(response_body(sent)) == {"detail": "bad token"}
    trace = the_trace(sink)
    s = app_span(trace)
    assert s.attrs["http.response.status_code"] == 403
    assert s.attrs["http.route"] == "/users/{user_id}"
    assert "error" not in s.attrs and not trace.error and not user_children(trace, s)


def test_fastapi_json_body() -> None:
    payload = b'{"name": "lamp", "price": 2.5}'
    headers = [(b"content-type", b"application/json")]
    sink, sent = transparent(fastapi_app, "POST", "/items", [payload], headers=headers)
    assert json.loads(response_body(sent)) == {"name": "lamp", "double": 5.0}
    s = app_span(the_trace(sink))
    assert s.attrs["http.route"] == "/items"
    assert s.body("request") == payload
    assert json.loads(s.body("response")) == {"name": "lamp", "double": 5.0}


def test_fastapi_validation_error_is_a_422() -> None:
    headers = [(b"content-type", b"application/json")]
    sink, sent = transparent(fastapi_app, "POST", "/items", [b'{"name": 1}'], headers=headers)
    assert sent[0]["status"] == 422
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 422 and "error" not in s.attrs


# -- Django -----------------------------------------------------------------------------


def django_hello(request: Any, name: str) -> Any:
    from django.http import HttpResponse

    with span("greeting"):
        return HttpResponse(f"hello {name}", content_type="text/plain")


async def django_echo(request: Any) -> Any:
    from django.http import JsonResponse

    return JsonResponse({"method": request.method, "size": len(request.body)})


@contextlib.contextmanager
def django_asgi(module: str, routes: list[tuple[str, Any]]) -> Iterator[Any]:
    """Django's ASGI application serving ``routes`` (route, view) from a URL module of
    its own (``module``), settings configured once per process as Django allows."""
    from django.core.asgi import get_asgi_application
    from django.urls import path

    with django_urls(module, [path(route, view) for route, view in routes], DEBUG=False):
        yield get_asgi_application()


@pytest.fixture(scope="module")
def django_app() -> Iterator[Any]:
    routes = [("hello/<str:name>", django_hello), ("echo", django_echo)]
    with django_asgi("hopscope_test_django_urls", routes) as app:
        yield app


def test_django_sync_view(django_app: Any) -> None:
    sink, sent = transparent(django_app, "GET", "/hello/ada")
    assert sent[0]["status"] == 200 and response_body(sent) == b"hello ada"
    trace = the_trace(sink)
    s = app_span(trace)
    assert s.attrs["url.path"] == "/hello/ada" and s.attrs["http.response.status_code"] == 200
    assert s.body("response") == b"hello ada" and not trace.error
    (greeting,) = user_children(trace, s)
    assert greeting.name == "greeting" and greeting.attrs["span.kind"] == "user"


def test_django_async_view_with_a_body(django_app: Any) -> None:
    sink, sent = transparent(django_app, "POST", "/echo", [b"abc", b"def"])
    assert json.loads(response_body(sent)) == {"method": "POST", "size": 6}
    s = app_span(the_trace(sink))
    assert s.attrs["http.request.body.size"] == 6 and s.body("request") == b"abcdef"
    assert s.attrs["http.response.status_code"] == 200 and "disconnected" not in s.attrs


def test_django_not_found(django_app: Any) -> None:
    sink, sent = transparent(django_app, "GET", "/missing")
    s = app_span(the_trace(sink))
    assert sent[0]["status"] == 404 and s.attrs["http.response.status_code"] == 404
    assert s.attrs["url.path"] == "/missing" and "error" not in s.attrs


# -- a real uvicorn ---------------------------------------------------------------------


@contextmanager
def serve(app: Any, http: str = "httptools", lifespan: str = "off") -> Iterator[int]:
    """Run uvicorn on an ephemeral 127.0.0.1 port in a thread; yield the port."""
    with uvicorn_thread(
        app, http=http, lifespan=lifespan, log_level="error", timeout_graceful_shutdown=2
    ) as served:
        yield served.port


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def ended(sink: MemorySink, count: int = 1) -> bool:
    """True once ``count`` request spans have ended (the server runs them in its thread)."""
    records = legacy(sink.records())
    starts = {r[3] for r in records if r[0] == "s" and "interface" in (r[8] or ())}
    return sum(1 for r in records if r[0] == "e" and r[3] in starts) >= count


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(request)
        data = []
        while chunk := conn.recv(65536):
            data.append(chunk)
    return re.sub(rb"(?im)^date: [^\r]*\r\n", b"", b"".join(data))


HTTP_IMPLS = ["httptools", "h11"]

RAW_REQUESTS = [
    b"GET /items/7?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /stream-boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 300000\r\n\r\n"
    + b"z" * 300_000,
    b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_uvicorn_answers_byte_for_byte_like_the_bare_app(http: str) -> None:
    sink = MemorySink()
    with serve(starlette_app, http) as bare_port:
        bare = [raw_exchange(bare_port, r) for r in RAW_REQUESTS]
    with serve(ASGIMiddleware(starlette_app, sink=sink), http) as port:
        wrapped = [raw_exchange(port, r) for r in RAW_REQUESTS]
        wait_for(lambda: ended(sink, len(RAW_REQUESTS)), "all spans")
    assert wrapped == bare
    assert bare[0].startswith(b"HTTP/1.1 200 OK\r\n") and bare[0].endswith(b'"q":"1"}')
    assert b"transfer-encoding: chunked" in bare[1].lower()
    assert bare[6].endswith(b"hello world")
    by_path: dict[tuple[str, str], Span] = {}
    for trace in sink.traces():
        s = app_span(trace)
        by_path[s.attrs["http.request.method"], s.attrs["url.path"]] = s
    assert by_path["GET", "/items/7"].attrs["http.route"] == "/items/{id}"
    assert by_path["GET", "/items/7"].attrs["server.software"] == f"uvicorn/{uvicorn.__version__}"
    assert by_path["GET", "/items/7"].attrs["client.address"] == "127.0.0.1"
    assert by_path["GET", "/nowhere"].attrs["http.response.status_code"] == 404
    assert by_path["GET", "/boom"].attrs["error"] is True
    assert by_path["GET", "/stream-boom"].attrs["error"] is True
    (summary,) = events(by_path["GET", "/stream"], "response.body.summary")
    assert summary["count"] == 10
    sizes = sorted(
        app_span(t).attrs["http.request.body.size"]
        for t in sink.traces()
        if app_span(t).attrs["url.path"] == "/echo"
    )
    assert sizes == [11, 300_000]


endless_stopped = threading.Event()


async def endless(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        try:
            for _ in range(100_000):  # bounded, but far longer than the test waits
                yield b"x" * 1024
                await asyncio.sleep(0.002)
        finally:
            endless_stopped.set()

    return StreamingResponse(chunks())


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_uvicorn_client_disconnect_mid_download(http: str) -> None:
    endless_stopped.clear()
    sink = MemorySink()
    app = Starlette(routes=[Route("/endless", endless)])
    with serve(ASGIMiddleware(app, sink=sink), http) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        conn.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 1024:
            chunk = conn.recv(65536)
            assert chunk, "server closed early"
            received += chunk
        conn.close()
        assert endless_stopped.wait(TIMEOUT), "the app kept streaming to nobody"
        wait_for(lambda: ended(sink), "the span end")
    trace = the_trace(sink)
    s = app_span(trace)
    assert events(s, "disconnect") == [{"phase": "during_response"}]
    assert s.attrs["disconnected"] is True
    assert s.attrs["http.response.status_code"] == 200
    assert s.attrs["http.response.body.size"] >= 1024
    assert not trace.children(s)  # stopping after the disconnect is not background work


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_uvicorn_keep_alive_does_not_leak_the_request_context(http: str) -> None:
    sink = MemorySink()
    seen: list[tuple[str, SpanContext | None]] = []

    async def ctx(request: Request) -> Response:
        seen.append(("handler", current.get()))
        return PlainTextResponse(request.path_params["n"])

    wrapped = ASGIMiddleware(Starlette(routes=[Route("/ctx/{n}", ctx)]), sink=sink)

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(("before", current.get()))
        await wrapped(scope, receive, send)
        if scope["type"] == "http":
            seen.append(("after", current.get()))

    tp = format_traceparent(0xABC, 0xDEF)
    with serve(outer, http) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/ctx/1").text == "1"
        assert client.get("/ctx/2", headers={"traceparent": tp}).text == "2"
        wait_for(lambda: ended(sink, 2), "both spans")
    spans = sorted((app_span(t) for t in sink.traces()), key=lambda x: x.start or 0)
    first, second = spans
    assert first.attrs["client.port"] == second.attrs["client.port"]  # one connection
    assert [kind for kind, _ in seen] == ["before", "handler", "after"] * 2
    assert seen[0][1] is None and seen[3][1] is None  # nothing left over from request 1
    assert seen[2][1] is None and seen[5][1] is None  # reset when the middleware returned
    for (_, ctx_), s in ((seen[1], first), (seen[4], second)):
        assert ctx_ is not None
        assert (f"{ctx_.trace_id:032x}", f"{ctx_.span_id:016x}") == (s.trace_id, s.span_id)
    assert second.trace_id == f"{0xABC:032x}" and second.parent_id == f"{0xDEF:016x}"
    assert first.trace_id != second.trace_id


def test_uvicorn_fifty_concurrent_requests_do_not_mix() -> None:
    sink = MemorySink()

    async def handler(request: Request) -> Response:
        body = await request.body()
        async with span("handle", n=request.path_params["n"]):
            await asyncio.sleep(0.001 * (int(request.path_params["n"]) % 4))
        return Response(request.path_params["n"].encode() + b":" + body)

    app = Starlette(routes=[Route("/n/{n}", handler, methods=["POST"])])

    async def main(port: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as c:
            return await asyncio.gather(
                *(c.post(f"/n/{i}", content=f"body{i}".encode() * (i + 1)) for i in range(50))
            )

    with serve(ASGIMiddleware(app, sink=sink), "httptools") as port:
        responses = asyncio.run(main(port))
        wait_for(lambda: ended(sink, 50), "fifty spans")
    for i, response in enumerate(responses):
        assert response.content == f"{i}:".encode() + f"body{i}".encode() * (i + 1)
    traces = sink.traces()
    assert len(traces) == 50
    for trace in traces:
        s = app_span(trace)
        n = s.attrs["url.path"].rsplit("/", 1)[1]
        body = f"body{n}".encode() * (int(n) + 1)
        assert s.body("request") == body
        assert s.body("response") == f"{n}:".encode() + body
        (child,) = user_children(trace, s)
        assert child.name == "handle" and child.attrs["n"] == n


# -- WebSocket through uvicorn ----------------------------------------------------------


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await websocket.send_text(message["text"])
        else:
            await websocket.send_bytes(message["bytes"])


async def ws_deny(websocket: WebSocket) -> None:
    await websocket.close(code=1008)


ws_app = Starlette(routes=[WebSocketRoute("/ws", ws_echo), WebSocketRoute("/deny", ws_deny)])


def test_websocket_echo_through_uvicorn() -> None:
    sink = MemorySink()
    with serve(ASGIMiddleware(ws_app, sink=sink)) as port:
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            ws.send("hello")
            assert ws.recv(TIMEOUT) == "hello"
            ws.send(b"\x00\x01\x02")
            assert ws.recv(TIMEOUT) == b"\x00\x01\x02"
            ws.send("again")
            assert ws.recv(TIMEOUT) == "again"
        wait_for(lambda: ended(sink), "the WebSocket span")
    s = app_span(the_trace(sink))
    a = s.attrs
    assert s.name == "WS /ws" and a["http.route"] == "/ws"
    assert a["websocket.accepted"] is True
    assert (a["websocket.messages_in"], a["websocket.messages_out"]) == (3, 3)
    assert (a["websocket.bytes_in"], a["websocket.bytes_out"]) == (13, 13)
    assert a["websocket.close_code"] == 1000
    assert "http.response.status_code" not in a and "error" not in a
    previews = events(s, "websocket.message")
    assert previews[:2] == [
        {"direction": "in", "size": 5, "text": "hello"},
        {"direction": "out", "size": 5, "text": "hello"},
    ]
    assert previews[2] == {"direction": "in", "size": 3, "bytes": "\x00\x01\x02"}
    assert len(events(s, "websocket.accept")) == 1


def test_websocket_denied_handshake_through_uvicorn() -> None:
    sink = MemorySink()
    with serve(ASGIMiddleware(ws_app, sink=sink)) as port:
        with pytest.raises(InvalidStatus) as info:
            websockets.sync.client.connect(f"ws://127.0.0.1:{port}/deny", open_timeout=TIMEOUT)
        assert info.value.response.status_code == 403
        wait_for(lambda: ended(sink), "the WebSocket span")
    a = app_span(the_trace(sink)).attrs
    assert a["http.response.status_code"] == 403
    assert a["websocket.accepted"] is False and a["websocket.close_code"] == 1008
    assert a["http.route"] == "/deny"


# -- lifespan -------------------------------------------------------------------------


def test_lifespan_passes_through_uvicorn() -> None:
    sink = MemorySink()
    phases: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        phases.append("startup")
        yield
        phases.append("shutdown")

    async def ping(request: Request) -> Response:
        return PlainTextResponse("pong")

    app = Starlette(routes=[Route("/ping", ping)], lifespan=lifespan)
    with serve(ASGIMiddleware(app, sink=sink), lifespan="on") as port:
        assert phases == ["startup"]
        assert httpx.get(f"http://127.0.0.1:{port}/ping").text == "pong"
        wait_for(lambda: ended(sink), "the request span")
    assert phases == ["startup", "shutdown"]
    assert [app_span(t).name for t in sink.traces()] == ["GET /ping"]
