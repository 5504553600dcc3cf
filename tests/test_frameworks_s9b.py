"""Session 9, round 2: what hopscope calls work after the response, and Quart WebSocket
errors.

A ``background`` span was made whenever the app returned more than 10 ms (wall clock)
after its last body: on a loaded machine, Django's ASGI handler (which closes the response
in a worker thread) and a plain Starlette response got one though no task ran.  Here the
machine's load is played by a server whose last write, or a close, takes 30 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from hopscope.tracing.asgi import ASGIMiddleware
from hopscope.tracing.model import Span, Trace
from hopscope.tracing.sinks import MemorySink
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from test_frameworks_asgi import django_asgi

SLOW = 0.03  # longer than asgi.BACKGROUND_MIN_NS


def scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


def serve(app: Any, path: str, slow_last_write: bool = False) -> list[dict[str, Any]]:
    """Drive ``app`` as a server would; the last body's write takes SLOW seconds when
    asked (a slow client, or a machine too loaded to run the app on at once)."""
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        done = asyncio.Event()
        incoming = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop()
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                if slow_last_write:
                    await asyncio.sleep(SLOW)
                done.set()

        await asyncio.wait_for(app(scope(path), receive, send), 30)

    asyncio.run(main())
    return sent


def app_span(sink: MemorySink) -> tuple[Trace, Span]:
    (trace,) = sink.traces()
    (span,) = [s for s in trace.spans.values() if s.name != "background"]
    return trace, span


def background_spans(sink: MemorySink) -> list[Span]:
    trace, span = app_span(sink)
    return [c for c in trace.children(span) if c.name == "background"]


# -- Starlette and FastAPI ---------------------------------------------------------------
async def plain(request: Request) -> Response:
    return PlainTextResponse("plain")


async def asleep() -> None:
    await asyncio.sleep(SLOW)


def sleeper() -> None:
    time.sleep(SLOW)


async def queued_async(request: Request) -> Response:
    return PlainTextResponse("queued", background=BackgroundTask(asleep))


async def queued_sync(request: Request) -> Response:
    return PlainTextResponse("queued", background=BackgroundTask(sleeper))


starlette_app = Starlette(
    routes=[
        Route("/plain", plain),
        Route("/moved/", plain),
        Route("/async", queued_async),
        Route("/sync", queued_sync),
    ]
)

fastapi_app = FastAPI()


@fastapi_app.post("/tasks")
async def tasks(background: BackgroundTasks) -> dict[str, bool]:
    background.add_task(sleeper)
    return {"queued": True}


@pytest.mark.parametrize("path", ["/plain", "/moved"])  # /moved: the trailing-slash redirect
def test_a_starlette_response_late_to_return_is_no_background_work(path: str) -> None:
    bare = serve(starlette_app, path, slow_last_write=True)
    sink = MemorySink()
    wrapped = serve(ASGIMiddleware(starlette_app, sink=sink), path, slow_last_write=True)
    assert wrapped == bare and bare[0]["status"] in (200, 307)
    assert background_spans(sink) == []


@pytest.mark.parametrize("path", ["/async", "/sync"])
def test_a_starlette_background_task_is_still_a_background_span(path: str) -> None:
    bare = serve(starlette_app, path)
    sink = MemorySink()
    wrapped = serve(ASGIMiddleware(starlette_app, sink=sink), path)
    assert wrapped == bare
    (background,) = background_spans(sink)
    _, span = app_span(sink)
    assert background.start == span.end and "error" not in background.attrs


def test_fastapi_background_tasks_are_still_a_background_span() -> None:
    sink = MemorySink()

    async def post(app: Any) -> None:
        request = scope("/tasks", "POST")
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        await app(request, receive, send)

    asyncio.run(post(ASGIMiddleware(fastapi_app, sink=sink)))
    assert len(background_spans(sink)) == 1


def test_a_plain_asgi_app_still_has_its_work_after_the_response_timed() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await asyncio.sleep(SLOW)

    sink = MemorySink()
    serve(ASGIMiddleware(app, sink=sink), "/")
    assert len(background_spans(sink)) == 1


def test_a_task_made_outside_any_request_marks_nothing() -> None:
    BackgroundTask(sleeper)  # no request context: nothing to tell, nothing fails
    sink = MemorySink()
    serve(ASGIMiddleware(starlette_app, sink=sink), "/plain", slow_last_write=True)
    assert background_spans(sink) == []


# -- Django ------------------------------------------------------------------------------
def django_view(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(b"django")


@pytest.fixture(scope="module")
def django_app() -> Iterator[Any]:
    with django_asgi("hopscope_test_s9b_urls", [("d", django_view)]) as app:
        yield app


def test_django_closing_its_response_slowly_is_no_background_work(django_app: Any) -> None:
    from django.core.signals import request_finished

    def slow_close(**kwargs: Any) -> None:
        time.sleep(SLOW)  # (Django's close, in its worker thread, on a loaded machine)

    request_finished.connect(slow_close)
    try:
        bare = serve(django_app, "/d")
        sink = MemorySink()
        wrapped = serve(ASGIMiddleware(django_app, sink=sink), "/d")
    finally:
        request_finished.disconnect(slow_close)
    assert wrapped == bare and bare[0]["status"] == 200
    _, span = app_span(sink)
    assert span.attrs["http.response.status_code"] == 200
    assert background_spans(sink) == []


# -- Quart: a WebSocket handler's exception ----------------------------------------------
def quart_ws_app() -> Any:
    from quart import Quart, websocket

    app = Quart("s9b_quart")

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        message = await websocket.receive()
        if message == "boom":
            raise LookupError("handler failed")
        if message == "logged":
            try:
                raise KeyError("recovered")
            except KeyError:
                app.logger.exception("retrying after an error")  # not the framework's
        await websocket.send(f"echo:{message}")

    return app


def websocket_exchange(app: Any, text: str) -> list[dict[str, Any]]:
    """A WebSocket connection that sends ``text`` once; what the app sent."""
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        closed = asyncio.Event()
        incoming: list[dict[str, Any]] = [
            {"type": "websocket.connect"},
            {"type": "websocket.receive", "text": text},
        ]

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await closed.wait()
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] in ("websocket.close", "websocket.send"):
                closed.set()

        ws_scope = {**scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
        await asyncio.wait_for(app(ws_scope, receive, send), 30)

    asyncio.run(main())
    return sent


def ws_span(sink: MemorySink) -> Span:
    (trace,) = sink.traces()
    (span,) = trace.spans.values()
    return span


def test_a_quart_websocket_handler_exception_marks_its_span_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bare = websocket_exchange(quart_ws_app(), "boom")
    sink = MemorySink()
    caplog.clear()
    with caplog.at_level("ERROR"):
        wrapped = websocket_exchange(ASGIMiddleware(quart_ws_app(), sink=sink), "boom")
    assert wrapped == bare and bare[-1] == {"type": "websocket.close", "code": 1000}
    # Quart still logs it, as without hopscope.
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [LookupError]
    span = ws_span(sink)
    assert span.attrs["error"] is True and span.attrs["exception.type"] == "LookupError"
    assert span.attrs["websocket.close_code"] == 1000
    (exception,) = [e for e in span.events if e.name == "exception"]
    assert exception.attrs["exception.type"].endswith("LookupError")
    assert [e.name for e in span.events].count("log") == 1


def test_an_exception_a_quart_websocket_logs_and_recovers_from_is_no_failure() -> None:
    sink = MemorySink()
    sent = websocket_exchange(ASGIMiddleware(quart_ws_app(), sink=sink), "logged")
    assert [m.get("text") for m in sent if m["type"] == "websocket.send"] == ["echo:logged"]
    span = ws_span(sink)
    assert "error" not in span.attrs
    assert not [e for e in span.events if e.name == "exception"]


def test_django_cancelled_while_it_closes_its_response_is_no_background_work(
    django_app: Any,
) -> None:
    """asgiref's test communicator (Django's own ASGI tests) cancels the app once it has
    the response: Django was then closing it, which is no background task."""
    from django.core.signals import request_finished

    def slow_close(**kwargs: Any) -> None:
        time.sleep(SLOW)

    sink = MemorySink()

    async def main() -> None:
        done = asyncio.Event()
        incoming = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop()
            await asyncio.Event().wait()  # (no disconnect: the task is cancelled)
            return {}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        app = ASGIMiddleware(django_app, sink=sink)
        task = asyncio.create_task(app(scope("/d"), receive, send))
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(SLOW / 3)  # (into the close)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    request_finished.connect(slow_close)
    try:
        asyncio.run(main())
    finally:
        request_finished.disconnect(slow_close)
    _, span = app_span(sink)
    assert span.attrs["http.response.status_code"] == 200 and "cancelled" not in span.attrs
    assert background_spans(sink) == []
