"""The ASGI middleware at the protocol level: a fake server coroutine drives raw ASGI apps.

The framework and real-server tests live in test_frameworks_asgi.py; here every message
is under the test's control, so transparency is checked by object identity and the
recording by exact values.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from hopscope.tracing import FileSink, MemorySink, Sink, load, span, wrap
from hopscope.tracing.asgi import FIRST_CHUNKS, WS_PREVIEW, ASGIMiddleware
from hopscope.tracing.context import SpanContext, current
from hopscope.tracing.records import BODY_LIMIT, Record, legacy, process_info, to_events
from hopscope.tracing.tracefile import read_events
from hopscope.tracing.traceparent import format_traceparent
from hopscope.tracing.wrap import is_asgi
from traces import EmitOnlySink, app_span, events, the_trace, user_children

Message = dict[str, Any]
App = Callable[..., Awaitable[Any]]
TIMEOUT = 5.0

REQUEST_END: Message = {"type": "http.request", "body": b"", "more_body": False}
log = logging.getLogger("hopscope.tests.asgi")


def http_scope(
    path: str = "/",
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    query: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8000),
    }


class FakeServer:
    """The server's side of one ASGI connection: hands out ``incoming`` messages, then
    (once the response is complete) ``http.disconnect``; records every message it is sent.

    ``fail`` makes ``send`` raise that exception for the first message of type ``fail_on``.
    """

    def __init__(
        self,
        incoming: Iterable[Message] = (REQUEST_END,),
        fail: BaseException | None = None,
        fail_on: str = "http.response.body",
    ) -> None:
        self.incoming = list(incoming)
        self.handed_out: list[Message] = []
        self.sent: list[Message] = []
        self.complete = asyncio.Event()
        self.fail = fail
        self.fail_on = fail_on

    async def receive(self) -> Message:
        if self.incoming:
            message = self.incoming.pop(0)
        else:
            # No wait_for here: on 3.11 it can swallow a cancellation of the caller.
            await self.complete.wait()
            message = {"type": "http.disconnect"}
        self.handed_out.append(message)
        return message

    async def send(self, message: Message) -> None:
        if self.fail is not None and message["type"] == self.fail_on:
            fail, self.fail = self.fail, None
            raise fail
        self.sent.append(message)
        kind = message["type"]
        if (kind == "http.response.body" and not message.get("more_body")) or kind in (
            "http.response.pathsend",
            "websocket.close",
        ):
            self.complete.set()

    async def run(self, app: App, scope: dict[str, Any]) -> Any:
        return await asyncio.wait_for(app(scope, self.receive, self.send), TIMEOUT)


def run(app: App, scope: dict[str, Any] | None = None, server: FakeServer | None = None) -> Any:
    server = server or FakeServer()
    return asyncio.run(server.run(app, scope or http_scope()))


def end_records(sink: MemorySink) -> list[tuple[Any, ...]]:
    return [r for r in legacy(sink.records()) if r[0] == "e"]


# -- a plain exchange ------------------------------------------------------------------


def test_request_and_response_are_recorded_and_messages_pass_by_identity() -> None:
    sink = MemorySink()
    app_sent: list[Message] = []
    app_received: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            app_received.append(message)
            if not message.get("more_body"):
                break
        for message in (
            {"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]},
            {"type": "http.response.body", "body": b"hello ", "more_body": True},
            {"type": "http.response.body", "body": b"world"},
        ):
            app_sent.append(message)
            await send(message)

    incoming: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    ]
    headers = [(b"host", b"example"), (b"x-dup", b"1"), (b"x-dup", b"2")]
    server = FakeServer(incoming)
    scope = http_scope("/echo", "POST", headers, query=b"a=1&b=%20")
    run(ASGIMiddleware(app, sink=sink), scope, server)

    assert server.sent == app_sent
    assert all(a is b for a, b in zip(server.sent, app_sent, strict=True))
    assert all(a is b for a, b in zip(server.handed_out, app_received, strict=True))
    assert scope["path"] == "/echo" and "route" not in scope  # the scope is not touched

    s = app_span(the_trace(sink))
    assert s.name == "POST /echo" and s.finished
    assert s.parent_id is None
    a = s.attrs
    assert a["interface"] == "asgi"
    assert a["http.request.method"] == "POST"
    assert a["url.scheme"] == "http"
    assert a["network.protocol.version"] == "1.1"
    assert a["url.path"] == "/echo"
    assert a["url.query"] == "a=1&b=%20"
    assert (a["client.address"], a["client.port"]) == ("127.0.0.1", 50123)
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", 8000)
    assert s.headers("request") == [("host", "example"), ("x-dup", "1"), ("x-dup", "2")]
    assert a["http.response.status_code"] == 201
    assert s.headers("response") == [("x-a", "1")]
    assert a["http.request.body.size"] == 4 and s.body("request") == b"abcd"
    assert a["http.response.body.size"] == 11 and s.body("response") == b"hello world"
    assert a["http.request.body.truncated"] is False
    assert a["http.response.body.truncated"] is False
    assert "error" not in a and "disconnected" not in a and "http.route" not in a
    assert events(s, "response.start") == [{"status": 201, "headers": [["x-a", "1"]]}]
    assert events(s, "request.body") == [{"size": 2, "more": True}, {"size": 2, "more": False}]
    assert events(s, "response.body") == [{"size": 6, "more": True}]
    assert not events(s, "request.body.summary") and not events(s, "disconnect")


def test_return_value_and_scope_type_passthrough() -> None:
    sink = MemorySink()
    token = object()

    async def app(scope: Any, receive: Any, send: Any) -> object:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})
        return token

    assert run(wrap(app, sink=sink)) is token
    assert app_span(the_trace(sink)).attrs["http.response.status_code"] == 204


@pytest.mark.parametrize("kind", ["lifespan", "webtransport"])
def test_other_scope_types_get_the_servers_own_callables(kind: str) -> None:
    sink = MemorySink()
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> str:
        seen.extend([scope, receive, send])
        return "done"

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    scope = {"type": kind, "asgi": {"version": "3.0"}}
    assert asyncio.run(ASGIMiddleware(app, sink=sink)(scope, receive, send)) == "done"
    assert seen[0] is scope and seen[1] is receive and seen[2] is send
    assert sink.records() == []


# -- messages the middleware does not own ------------------------------------------------


def test_pathsend_passes_through_and_ends_the_response() -> None:
    sink = MemorySink()
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]},
        {"type": "http.response.pathsend", "path": "/srv/static/a.txt"},
    ]
    ended_inside: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
        ended_inside.append(bool(end_records(sink)))

    server = FakeServer()
    run(ASGIMiddleware(app, sink=sink), server=server)
    assert len(server.sent) == 2
    assert all(a is b for a, b in zip(server.sent, messages, strict=True))
    assert server.sent[1] == {"type": "http.response.pathsend", "path": "/srv/static/a.txt"}
    assert ended_inside == [True]  # the span ended at pathsend, not when the app returned
    a = app_span(the_trace(sink)).attrs
    assert a["http.response.pathsend"] == "/srv/static/a.txt"
    assert a["http.response.status_code"] == 200
    assert "response.incomplete" not in a and "disconnected" not in a


def test_unknown_message_types_pass_untouched_both_ways() -> None:
    sink = MemorySink()
    marker = object()
    foo: Message = {"type": "http.response.foo", "payload": marker}
    hint: Message = {"type": "http.response.early_hint", "links": ["</a.css>; rel=preload"]}
    weird_in: Message = {"type": "http.weird", "x": marker}
    got: list[Message] = []
    ended_after_foo: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(await receive())
        got.append(await receive())
        await send(hint)
        await send({"type": "http.response.start", "status": 200})
        await send(foo)
        ended_after_foo.append(bool(end_records(sink)))
        await send({"type": "http.response.body", "body": b"ok"})

    server = FakeServer([weird_in, REQUEST_END])
    run(ASGIMiddleware(app, sink=sink), server=server)
    assert got[0] is weird_in and got[0] == {"type": "http.weird", "x": marker}
    assert server.sent[0] is hint and server.sent[2] is foo
    assert foo == {"type": "http.response.foo", "payload": marker}
    assert [m["type"] for m in server.sent] == [
        "http.response.early_hint",
        "http.response.start",
        "http.response.foo",
        "http.response.body",
    ]
    assert ended_after_foo == [False]
    a = app_span(the_trace(sink)).attrs
    assert a["http.response.body.size"] == 2 and "response.incomplete" not in a


def test_zerocopysend_ends_the_response_at_its_last_message() -> None:
    sink = MemorySink()
    ended: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.zerocopysend", "file": 7, "more_body": True})
        ended.append(bool(end_records(sink)))
        await send({"type": "http.response.zerocopysend", "file": 7})
        ended.append(bool(end_records(sink)))

    server = FakeServer()
    run(ASGIMiddleware(app, sink=sink), server=server)
    assert ended == [False, True]
    assert app_span(the_trace(sink)).attrs["http.response.zerocopysend"] is True


def test_trailers_end_the_span_after_the_last_trailers_message() -> None:
    sink = MemorySink()
    ended: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"data", "more_body": False})
        ended.append(bool(end_records(sink)))
        await send(
            {"type": "http.response.trailers", "headers": [(b"x-a", b"1")], "more_trailers": True}
        )
        ended.append(bool(end_records(sink)))
        await send({"type": "http.response.trailers", "headers": [(b"x-b", b"2")]})
        ended.append(bool(end_records(sink)))

    server = FakeServer()
    run(ASGIMiddleware(app, sink=sink), server=server)
    assert ended == [False, False, True]
    s = app_span(the_trace(sink))
    assert [e["http.response.trailers"] for e in events(s, "response.trailers")] == [
        [["x-a", "1"]],
        [["x-b", "2"]],
    ]
    assert s.attrs["http.response.body.size"] == 4
    # the end event comes after both trailers events
    names = [r[4] for r in legacy(sink.records()) if r[0] == "p"]
    assert names[-2:] == ["response.trailers", "response.trailers"]
    assert legacy(sink.records())[-1][0] == "e"


# -- disconnects ----------------------------------------------------------------------


def test_disconnect_after_the_final_body_is_not_a_disconnect() -> None:
    sink = MemorySink()
    after: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"x"})
        after.append(await receive())

    run(ASGIMiddleware(app, sink=sink))
    assert after == [{"type": "http.disconnect"}]
    s = app_span(the_trace(sink))
    assert not events(s, "disconnect") and "disconnected" not in s.attrs


def test_disconnect_during_the_upload_is_recorded() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    incoming = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.disconnect"},
    ]
    run(ASGIMiddleware(app, sink=sink), http_scope("/up", "PUT"), FakeServer(incoming))
    s = app_span(the_trace(sink))
    assert events(s, "disconnect") == [{"phase": "before_response"}]
    assert s.attrs["disconnected"] is True
    assert s.attrs["http.request.body.size"] == 4
    assert "response.incomplete" not in s.attrs and "background" not in {
        c.name for c in the_trace(sink).children(s)
    }


def test_oserror_from_send_is_a_disconnect_and_propagates_unchanged() -> None:
    sink = MemorySink()
    error = ConnectionResetError(104, "reset by peer")
    caught: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        try:
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        except OSError as exc:
            caught.append(exc)
            raise

    server = FakeServer(fail=error)
    with pytest.raises(ConnectionResetError) as info:
        run(ASGIMiddleware(app, sink=sink), server=server)
    assert info.value is error and caught == [error]
    s = app_span(the_trace(sink))
    assert events(s, "disconnect") == [{"phase": "send"}]
    assert s.attrs["disconnected"] is True
    assert s.attrs["http.response.status_code"] == 200
    assert len(end_records(sink)) == 1


# -- failures -------------------------------------------------------------------------


def test_exception_before_the_response_propagates_and_is_recorded() -> None:
    sink = MemorySink()
    error = KeyError("missing")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise error

    with pytest.raises(KeyError) as info:
        run(ASGIMiddleware(app, sink=sink))
    assert info.value is error
    s = app_span(the_trace(sink))
    (exc,) = events(s, "exception")
    assert exc["phase"] == "before_response"
    assert exc["exception.type"] == "builtins.KeyError"
    assert "raise error" in exc["exception.stacktrace"]
    assert s.attrs["error"] is True and s.attrs["exception.type"] == "KeyError"
    assert "http.response.status_code" not in s.attrs


def test_error_page_sent_while_handling_the_exception_keeps_phase_before_response() -> None:
    """Starlette's ServerErrorMiddleware pattern: send a 500, then re-raise."""
    sink = MemorySink()

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    async def error_middleware(scope: Any, receive: Any, send: Any) -> None:
        try:
            await inner(scope, receive, send)
        except Exception:
            await send({"type": "http.response.start", "status": 500})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})
            raise

    with pytest.raises(ValueError):
        run(ASGIMiddleware(error_middleware, sink=sink))
    s = app_span(the_trace(sink))
    assert [e["phase"] for e in events(s, "exception")] == ["before_response"]
    assert s.attrs["http.response.status_code"] == 500
    assert s.attrs["error"] is True and s.attrs["exception.type"] == "ValueError"
    assert not the_trace(sink).children(s)  # not mistaken for background work


def test_handled_exception_response_is_not_an_error() -> None:
    """Starlette's ExceptionMiddleware pattern: an HTTPException becomes a response."""
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            raise LookupError("no such thing")
        except LookupError:
            await send({"type": "http.response.start", "status": 404})
            await send({"type": "http.response.body", "body": b"Not Found"})

    run(ASGIMiddleware(app, sink=sink))
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 404
    assert "error" not in s.attrs and not events(s, "exception")
    assert s.body("response") == b"Not Found"


def test_exception_after_the_response_started() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        run(ASGIMiddleware(app, sink=sink))
    s = app_span(the_trace(sink))
    assert [e["phase"] for e in events(s, "exception")] == ["after_response_start"]
    assert s.attrs["error"] is True and s.attrs["http.response.status_code"] == 200
    assert s.body("response") == b"partial"


def test_exception_after_the_response_is_recorded_with_the_background_work() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})
        await asyncio.sleep(0.01)
        raise OSError("background job failed")

    with pytest.raises(OSError, match="background job failed"):
        run(ASGIMiddleware(app, sink=sink))
    trace = the_trace(sink)
    s = app_span(trace)
    assert [e["phase"] for e in events(s, "exception")] == ["after_response"]
    assert s.attrs["http.response.status_code"] == 200 and "disconnected" not in s.attrs
    (background,) = trace.children(s)
    assert background.name == "background" and background.attrs["error"] is True
    assert background.start == s.end


def test_cancellation_ends_the_span_and_propagates() -> None:
    sink = MemorySink()
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        started.set()
        await asyncio.sleep(TIMEOUT * 2)

    async def main() -> None:
        task = asyncio.create_task(FakeServer().run(ASGIMiddleware(app, sink=sink), http_scope()))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    s = app_span(the_trace(sink))
    assert s.finished and s.attrs["cancelled"] == "CancelledError"
    assert "error" not in s.attrs and not events(s, "exception")


def test_app_returning_without_finishing_the_response() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})

    run(ASGIMiddleware(app, sink=sink))
    a = app_span(the_trace(sink)).attrs
    assert a["response.incomplete"] is True and a["http.response.status_code"] == 200


# -- bodies ---------------------------------------------------------------------------


def test_first_chunks_are_events_and_a_summary_covers_all() -> None:
    sink = MemorySink()
    count = FIRST_CHUNKS + 3

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200})
        for i in range(count):
            await send({"type": "http.response.body", "body": b"r" * (i + 1), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    incoming = [
        {"type": "http.request", "body": b"q" * (i + 1), "more_body": i < count - 1}
        for i in range(count)
    ]
    run(ASGIMiddleware(app, sink=sink), http_scope("/", "POST"), FakeServer(incoming))
    s = app_span(the_trace(sink))
    total = count * (count + 1) // 2
    assert events(s, "request.body") == [{"size": i + 1, "more": True} for i in range(FIRST_CHUNKS)]
    assert events(s, "response.body") == [
        {"size": i + 1, "more": True} for i in range(FIRST_CHUNKS)
    ]
    for direction in ("request", "response"):
        (summary,) = events(s, f"{direction}.body.summary")
        assert summary["count"] == count and summary["bytes"] == total
        assert 0 < summary["first_ts"] <= summary["last_ts"]
        assert s.attrs[f"http.{direction}.body.size"] == total
    assert s.body("request") == b"".join(b"q" * (i + 1) for i in range(count))
    assert s.body("response") == b"".join(b"r" * (i + 1) for i in range(count))


@pytest.mark.parametrize(
    ("limit", "chunks"),
    [
        (BODY_LIMIT, [b"a" * 5_000_000]),
        (BODY_LIMIT, [b"b" * 40_000] * 3),
        (1000, [b"c" * 600] * 3),
        (1000, [b"d" * 5000]),
        pytest.param(
            200_000,
            [b"e" * 150_000, b"f" * 150_000],
        ),
    ],
)
def test_body_capture_stops_at_the_limit_but_sizes_count_everything(
    limit: int, chunks: list[bytes]
) -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        received = []
        while True:
            message = await receive()
            received.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200})
        for chunk in received:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    server = FakeServer(incoming)
    run(ASGIMiddleware(app, sink=sink, body_limit=limit), http_scope("/", "POST"), server)
    whole = b"".join(chunks)
    assert b"".join(m.get("body", b"") for m in server.sent[1:]) == whole
    s = app_span(the_trace(sink))
    for direction in ("request", "response"):
        assert s.attrs[f"http.{direction}.body.size"] == len(whole)
        assert s.body(direction) == whole[:limit]
        assert s.attrs[f"http.{direction}.body.truncated"] is (len(whole) > limit)


def test_body_limit_zero_keeps_no_bytes_but_says_truncated() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"xyz"})

    incoming = [{"type": "http.request", "body": b"abc", "more_body": False}]
    run(ASGIMiddleware(app, sink=sink, body_limit=0), server=FakeServer(incoming))
    s = app_span(the_trace(sink))
    assert s.body("request") == b"" and s.body("response") == b""
    assert s.attrs["http.request.body.truncated"] is True
    assert s.attrs["http.response.body.size"] == 3


@pytest.mark.parametrize("limit", [0, 3, 5, 100])
def test_a_single_body_past_the_limit_is_cut_when_it_is_sent(limit: int) -> None:
    # The usual response (one body, no request body) ends the span on the short way in
    # _send: it must cut the body there too, so a big body is not kept until the drain.
    sink = MemorySink()
    body = b"0123456789"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    server = FakeServer([])
    run(ASGIMiddleware(app, sink=sink, body_limit=limit), server=server)
    assert server.sent[1]["body"] is body  # the app's message went through untouched
    (record,) = sink.records()
    kept = record[9][8]  # the end's response body: what the recording holds
    assert (kept or b"") == body[:limit]
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.body.size"] == len(body)
    assert s.body("response") == body[:limit]
    assert s.attrs["http.response.body.truncated"] is (len(body) > limit)
    assert s.attrs["http.response.status_code"] == 200


def test_receive_and_send_after_the_app_returned_still_reach_the_server() -> None:
    # A task the app left behind may still call them: they pass on to the server as they
    # would unwrapped (the server decides what that means).  And the recording, which
    # lives until the sink's next drain, does not hold the server's channels.
    sink = MemorySink()
    kept: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kept[:] = [receive, send]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    server = FakeServer([])
    run(ASGIMiddleware(app, sink=sink), server=server)
    receive, send = kept
    recording = receive.__self__[0]
    referents = gc.get_referents(recording)
    assert not any(r is server.receive or r is server.send for r in referents)
    asyncio.run(send({"type": "http.response.body", "body": b"late"}))
    assert [m.get("body") for m in server.sent[1:]] == [b"ok", b"late"]


# -- context, trace ids, concurrency ----------------------------------------------------


def test_traceparent_is_continued() -> None:
    sink = MemorySink()
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    headers = [(b"traceparent", format_traceparent(trace_id, parent_id).encode())]
    run(ASGIMiddleware(app, sink=sink), http_scope(headers=headers))
    trace = the_trace(sink)
    assert trace.trace_id == f"{trace_id:032x}"
    s = app_span(trace)
    assert s.parent_id == f"{parent_id:016x}"
    (start,) = [r for r in legacy(sink.records()) if r[0] == "s"]
    assert start[2] == trace_id and start[4] == parent_id


def test_malformed_traceparent_starts_a_new_trace() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    headers = [(b"traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")]
    run(ASGIMiddleware(app, sink=sink), http_scope(headers=headers))
    (start,) = [r for r in legacy(sink.records()) if r[0] == "s"]
    assert start[2] != 0 and start[4] == 0


def test_current_context_is_the_request_and_is_reset_between_requests() -> None:
    sink = MemorySink()
    inside: list[SpanContext | None] = []
    outside: list[SpanContext | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        inside.append(current.get())
        with span("work"):
            inside.append(current.get())
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    wrapped = ASGIMiddleware(app, sink=sink)

    async def connection() -> None:
        # Two requests run one after the other in the same task and context, as a
        # server may do on a kept-alive connection.
        for path in ("/one", "/two"):
            outside.append(current.get())
            await FakeServer().run(wrapped, http_scope(path))
        outside.append(current.get())

    asyncio.run(connection())
    assert outside == [None, None, None]
    starts = {r[3]: r for r in legacy(sink.records()) if r[0] == "s"}
    first, _, second, _ = inside
    assert first is not None and second is not None
    assert starts[first.span_id][6] == "GET /one" and starts[second.span_id][6] == "GET /two"
    assert first.trace_id != second.trace_id
    for ctx, work in zip(inside[::2], inside[1::2], strict=True):
        assert ctx is not None and work is not None
        assert starts[work.span_id][4] == ctx.span_id and work.trace_id == ctx.trace_id


def test_fifty_concurrent_requests_do_not_mix() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message["body"]
            await asyncio.sleep(0)
            if not message["more_body"]:
                break
        async with span("handler", path=scope["path"]):
            await asyncio.sleep(0.001 * (len(body) % 3))
            with span("inner"):
                await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": scope["path"].encode() + b":" + body})

    wrapped = ASGIMiddleware(app, sink=sink)

    async def one(i: int) -> list[Message]:
        body = f"body-{i}-".encode() * (i + 1)
        incoming = [
            {"type": "http.request", "body": body[:3], "more_body": True},
            {"type": "http.request", "body": body[3:], "more_body": False},
        ]
        server = FakeServer(incoming)
        await server.run(wrapped, http_scope(f"/item/{i}", "POST"))
        return server.sent

    async def main() -> list[list[Message]]:
        return await asyncio.gather(*(one(i) for i in range(50)))

    results = asyncio.run(main())
    traces = sink.traces()
    assert len(traces) == 50
    by_path = {}
    for trace in traces:
        root = app_span(trace)
        names = sorted(x.name for x in trace.spans.values() if x.name != "background")
        assert names == ["POST " + root.attrs["url.path"], "handler", "inner"]
        by_path[root.attrs["url.path"]] = (trace, root)
    for i, sent in enumerate(results):
        path = f"/item/{i}"
        body = f"body-{i}-".encode() * (i + 1)
        assert sent[1]["body"] == path.encode() + b":" + body
        trace, root = by_path[path]
        assert root.body("request") == body
        assert root.body("response") == path.encode() + b":" + body
        (handler,) = user_children(trace, root)
        assert handler.name == "handler" and handler.attrs["path"] == path
        (inner,) = trace.children(handler)
        assert inner.name == "inner" and inner.finished


# -- WebSocket (protocol level) ---------------------------------------------------------


def ws_scope(path: str = "/ws") -> dict[str, Any]:
    scope = http_scope(path)
    scope["type"] = "websocket"
    scope["scheme"] = "ws"
    del scope["method"]
    scope["subprotocols"] = []
    return scope


def test_websocket_denial_response_records_its_status() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.http.response.start", "status": 401, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"no"})

    server = FakeServer([{"type": "websocket.connect"}])
    run(ASGIMiddleware(app, sink=sink), ws_scope(), server)
    assert [m["type"] for m in server.sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    s = app_span(the_trace(sink))
    assert s.name == "WS /ws" and s.attrs["network.protocol.name"] == "websocket"
    assert s.attrs["http.response.status_code"] == 401
    assert s.attrs["websocket.accepted"] is False


def test_websocket_messages_are_counted_and_previewed() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"].upper()})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})

    long = "x" * 1000
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "héllo"},
        {"type": "websocket.receive", "bytes": b"\x01\x02"},
        {"type": "websocket.receive", "text": long},
        *({"type": "websocket.receive", "text": "n"} for _ in range(3)),
        {"type": "websocket.disconnect", "code": 1001, "reason": "going away"},
    ]
    server = FakeServer(incoming)
    run(ASGIMiddleware(app, sink=sink), ws_scope(), server)
    assert [m.get("text", m.get("bytes")) for m in server.sent[1:4]] == [
        "HÉLLO",
        b"\x02\x01",
        long.upper(),
    ]
    s = app_span(the_trace(sink))
    a = s.attrs
    assert a["websocket.accepted"] is True
    assert (a["websocket.messages_in"], a["websocket.messages_out"]) == (6, 6)
    assert a["websocket.bytes_in"] == len("héllo".encode()) + 2 + 1000 + 3
    assert a["websocket.bytes_out"] == a["websocket.bytes_in"]
    assert (a["websocket.close_code"], a["websocket.close_reason"]) == (1001, "going away")
    msgs = events(s, "websocket.message")
    assert msgs[:4] == [
        {"direction": "in", "size": 6, "text": "héllo"},
        {"direction": "out", "size": 6, "text": "HÉLLO"},
        {"direction": "in", "size": 2, "bytes": "\x01\x02"},
        {"direction": "out", "size": 2, "bytes": "\x02\x01"},
    ]
    assert msgs[4] == {"direction": "in", "size": 1000, "text": "x" * WS_PREVIEW}
    # the first FIRST_CHUNKS messages each way are events; the rest are only counted
    assert [m["direction"] for m in msgs].count("in") == FIRST_CHUNKS
    assert [m["direction"] for m in msgs].count("out") == FIRST_CHUNKS
    assert events(s, "websocket.disconnect") == [{"code": 1001}]


# -- wrap() ---------------------------------------------------------------------------


async def asgi_function(scope: Any, receive: Any, send: Any) -> None:
    pass


class AsgiClass:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


def wsgi_function(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b""]


def test_is_asgi_recognises_asgi_apps() -> None:
    from starlette.applications import Starlette
    from starlette.endpoints import HTTPEndpoint

    assert is_asgi(asgi_function)
    assert is_asgi(AsgiClass())
    assert is_asgi(HTTPEndpoint)
    assert is_asgi(functools.partial(asgi_function))
    assert is_asgi(functools.partial(functools.partial(AsgiClass())))
    assert is_asgi(Starlette())
    assert is_asgi(ASGIMiddleware(asgi_function, sink=MemorySink()))


def test_is_asgi_rejects_wsgi_apps() -> None:
    from flask import Flask

    assert not is_asgi(wsgi_function)
    assert not is_asgi(Flask(__name__))
    assert not is_asgi(functools.partial(wsgi_function))
    assert not is_asgi(AsgiClass)  # calling the class makes an instance, not a coroutine


def test_wrap_picks_the_middleware_once() -> None:
    sink = MemorySink()
    wrapped = wrap(asgi_function, sink=sink, body_limit=10)
    assert isinstance(wrapped, ASGIMiddleware)
    assert wrapped.app is asgi_function and wrapped.sink is sink and wrapped.body_limit == 10
    assert wrap(wrapped) is wrapped


def test_wrap_gives_wsgi_apps_the_wsgi_middleware() -> None:
    try:
        from hopscope.tracing.wsgi import WSGIMiddleware
    except ImportError:
        pytest.skip("tracing/wsgi.py not written yet")
    assert isinstance(wrap(wsgi_function, sink=MemorySink()), WSGIMiddleware)


def test_is_asgi_accepts_a_function_marked_as_a_coroutine_function() -> None:
    from asgiref.sync import markcoroutinefunction

    def sync_but_marked(scope: Any, receive: Any, send: Any) -> Any:
        return asgi_function(scope, receive, send)

    assert is_asgi(markcoroutinefunction(sync_but_marked))


def test_is_asgi_does_not_warn() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert is_asgi(AsgiClass()) and not is_asgi(wsgi_function)


def test_server_hop_ids_take_precedence_over_traceparent() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    scope = http_scope(headers=[(b"traceparent", format_traceparent(0x1, 0x2).encode())])
    scope["hopscope"] = {"trace_id": 0xAA, "parent_id": 0xBB, "queue_ns": None}
    run(ASGIMiddleware(app, sink=sink), scope)
    (start,) = [r for r in legacy(sink.records()) if r[0] == "s"]
    assert (start[2], start[4]) == (0xAA, 0xBB)


def test_websocket_app_exception_is_recorded_and_propagates() -> None:
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        raise ValueError("ws handler failed")

    with pytest.raises(ValueError, match="ws handler failed"):
        run(ASGIMiddleware(app, sink=sink), ws_scope(), FakeServer([{"type": "websocket.connect"}]))
    s = app_span(the_trace(sink))
    (exc,) = events(s, "exception")
    assert exc["exception.type"] == "builtins.ValueError"
    assert s.attrs["error"] is True and s.attrs["websocket.accepted"] is True
    assert "http.response.status_code" not in s.attrs


# -- one record per request ------------------------------------------------------------
#
# A MemorySink or a batching sink takes each HTTP request whole (a sinks.Recording) and
# makes one "r" record of it; a sink that only knows emit() gets every record as it
# happens.  The wire events must be the same either way, in the same order.


def comparable(events: list[dict[str, Any]]) -> list[Any]:
    """Events with ids numbered by first appearance and times left out."""
    ids: dict[str, int] = {}

    def number(value: str | None) -> int | None:
        return None if value is None else ids.setdefault(value, len(ids))

    out = []
    for event in events:
        same = {k: v for k, v in event.items() if k not in ("ts", "trace_id", "span_id")}
        attrs = {k: v for k, v in event["attrs"].items() if not k.endswith("_ts")}
        same["attrs"] = attrs
        same["ids"] = (number(event["trace_id"]), number(event["span_id"]))
        if "parent_id" in event:
            same["parent_id"] = number(event["parent_id"])
        out.append(same)
    return out


def both_ways(app: App, server: Callable[[], FakeServer], **options: Any) -> list[Any]:
    """The app's events through a MemorySink (one "r" record) and through an emit-only
    sink (one record per event): checked equal, then returned."""
    live, eager = MemorySink(), EmitOnlySink()
    for sink in (live, eager):
        with contextlib.suppress(Exception):
            run(ASGIMiddleware(app, sink=sink, **options), server=server())
    assert {r[0] for r in live.records()} <= {"r", "p"}  # "p": emitted after the end
    assert "r" not in {r[0] for r in eager.got}
    info = process_info(os.getpid())
    live_events = comparable(live.events())
    eager_events = comparable([e for r in eager.got for e in to_events(r, info)])
    assert live_events == eager_events
    return live_events


async def _streaming_app(scope: Any, receive: Any, send: Any) -> None:
    log.warning("before the response")
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    with span("work", table="users"):
        log.warning("inside a user span")
    await send({"type": "http.response.start", "status": 201, "headers": [(b"a", b"1")]})
    for i in range(FIRST_CHUNKS + 2):
        await send({"type": "http.response.body", "body": body[i : i + 1], "more_body": True})
        log.warning("after chunk %d", i)
    await send({"type": "http.response.body", "body": b"end"})


def _chunks(count: int) -> list[Message]:
    return [
        {"type": "http.request", "body": bytes([65 + i]) * 3, "more_body": i < count - 1}
        for i in range(count)
    ]


def test_one_record_per_request_makes_the_same_events_in_the_same_order() -> None:
    events_ = both_ways(_streaming_app, lambda: FakeServer(_chunks(FIRST_CHUNKS + 3)))
    names = [(e["kind"], e.get("name")) for e in events_]
    assert names[:2] == [("span_start", "GET /"), ("event", "log")]
    assert names.count(("event", "request.body")) == FIRST_CHUNKS
    assert names.count(("event", "response.body")) == FIRST_CHUNKS
    assert ("event", "request.body.summary") in names
    assert ("event", "response.body.summary") in names
    assert names[-1] == ("span_end", None)
    # logs stay where they happened among the middleware's own events
    at = names.index(("event", "response.start"))
    body, log_ = ("event", "response.body"), ("event", "log")
    assert names[at + 1 : at + 5] == [body, log_, body, log_]


def test_one_record_per_request_matches_for_errors_and_edge_cases() -> None:
    async def fails_after_start(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        raise RuntimeError("midway")

    async def fails_after_end(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})
        raise RuntimeError("afterwards")

    async def trailers(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"abcdefghijkl"})
        await send({"type": "http.response.trailers", "headers": [(b"x-t", b"1")]})

    async def incomplete(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204})

    for app in (fails_after_start, fails_after_end, trailers, incomplete):
        events_ = both_ways(app, FakeServer, body_limit=5)
        assert events_[-1]["kind"] in ("span_end", "span_start")  # background spans last
    disconnected = both_ways(
        _streaming_app, lambda: FakeServer(_chunks(2), fail=OSError("gone")), body_limit=4
    )
    app_ids = disconnected[0]["ids"]
    (end,) = [e for e in disconnected if e["kind"] == "span_end" and e["ids"] == app_ids]
    assert end["attrs"]["disconnected"] is True
    assert end["attrs"]["http.request.body"] == "QUFBQg=="  # b"AAAB": cut at the limit


def test_a_running_request_shows_at_each_drain(tmp_path: Path) -> None:
    """A batching sink sends the start and the events so far of a request still running
    at a drain, and the rest (with no second start) once it is over."""
    path = tmp_path / "live.jsonl"
    sink = FileSink(path, interval=0.01)

    def seen() -> list[tuple[str, str | None]]:
        return [(e["kind"], e.get("name")) for e in read_events(path)]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        deadline = time.monotonic() + TIMEOUT
        while ("event", "response.body") not in seen():
            assert time.monotonic() < deadline, f"not shown while running: {seen()}"
            await asyncio.sleep(0.005)
        shown = [("span_start", "GET /"), ("event", "response.start"), ("event", "response.body")]
        assert seen() == shown
        await send({"type": "http.response.body", "body": b"last"})

    run(ASGIMiddleware(app, sink=sink))
    sink.flush()  # waits for the end of a request a drain saw running
    assert seen() == [
        ("span_start", "GET /"),
        ("event", "response.start"),
        ("event", "response.body"),
        ("span_end", None),
    ]
    sink.close()
    (trace,) = load(path)
    assert app_span(trace).body("response") == b"firstlast"


def test_records_made_after_the_request_go_to_the_sink_directly() -> None:
    sink = MemorySink()
    later: list[asyncio.Task[None]] = []

    async def log_later() -> None:
        await asyncio.sleep(0.01)
        log.warning("after the request")  # the task copied the request's context

    async def app(scope: Any, receive: Any, send: Any) -> None:
        later.append(asyncio.create_task(log_later()))
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        await FakeServer().run(ASGIMiddleware(app, sink=sink), http_scope())
        await later[0]

    asyncio.run(main())
    assert [r[0] for r in sink.records()] == ["r", "p"]
    (message,) = [e.attrs["message"] for e in app_span(the_trace(sink)).events if e.name == "log"]
    assert message == "after the request"


def test_a_full_sink_drops_record_by_record() -> None:
    sink = MemorySink(max_records=0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    run(ASGIMiddleware(app, sink=sink))
    assert sink.dropped == 3  # span start, response.start, span end


def test_requests_leave_no_reference_cycles_behind() -> None:
    """Whatever a request allocates is freed by reference counting: cycles would wait
    for the garbage collector, which would walk them (and all they hold) meanwhile."""
    sink = MemorySink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"in"}

    async def send(message: Message) -> None:
        pass

    def garbage(asgi_app: App) -> int:
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                coroutine = asgi_app(http_scope(method="POST"), receive, send)
                with contextlib.suppress(StopIteration):
                    coroutine.send(None)
            sink.clear()
            return gc.collect()
        finally:
            gc.enable()

    assert garbage(ASGIMiddleware(app, sink=sink)) == garbage(app) == 0


# -- the lean request path: what it reads of headers and messages -------------------------


def test_the_first_traceparent_among_other_headers_is_the_one_continued() -> None:
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    valid = format_traceparent(trace_id, parent_id).encode()
    other = format_traceparent(trace_id + 1, parent_id + 1).encode()
    malformed = b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    def start_ids(headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        sink = MemorySink()
        run(ASGIMiddleware(app, sink=sink), http_scope(headers=headers))
        (start,) = [r for r in legacy(sink.records()) if r[0] == "s"]
        return start[2], start[4]

    host = (b"host", b"example.test")
    assert start_ids([host, (b"traceparent", valid), (b"traceparent", other)]) == (
        trace_id,
        parent_id,
    )
    # The first one decides: malformed, it starts a new trace even when a later one is fine.
    new_trace, parent = start_ids([host, (b"traceparent", malformed), (b"traceparent", valid)])
    assert new_trace not in (0, trace_id) and parent == 0
    new_trace, parent = start_ids([host, (b"x-traceparent", valid)])
    assert new_trace not in (0, trace_id) and parent == 0


def test_optional_message_keys_are_read_with_their_asgi_defaults() -> None:
    """Messages that leave out optional keys (or give truthy non-bools) are recorded as
    if the defaults were written, and reach the server as they were sent."""
    sink = MemorySink()
    sent: list[Message] = [
        {"type": "http.response.start", "status": 201, "trailers": False},  # no headers
        {"type": "http.response.body", "body": b"ab", "more_body": 1},
        {"type": "http.response.body", "more_body": True},  # no body
        {"type": "http.response.body", "body": b"c"},  # no more_body: the last one
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in sent:
            await send(message)

    server = FakeServer()
    run(ASGIMiddleware(app, sink=sink), server=server)
    assert all(a is b for a, b in zip(server.sent, sent, strict=True))
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 201
    assert "http.response.headers" not in s.attrs
    assert s.attrs["http.response.body.size"] == 3 and s.body("response") == b"abc"
    assert events(s, "response.start") == [{"status": 201}]  # no headers: none recorded
    assert events(s, "response.body") == [{"size": 2, "more": True}]
    assert "response.incomplete" not in s.attrs and len(end_records(sink)) == 1


def test_a_message_without_a_type_goes_to_the_server_unrecorded() -> None:
    sink = MemorySink()
    odd: Message = {"status": 200}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with contextlib.suppress(KeyError):  # FakeServer reads message["type"]
            await send(odd)
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    run(ASGIMiddleware(app, sink=sink))
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 204
    assert events(s, "response.start") == [{"status": 204}]


# -- a request taken while it runs -------------------------------------------------------


class _TakingSink(Sink):
    """Takes its recordings whenever :meth:`take_now` is called, as a drain would."""

    def __init__(self) -> None:
        self.recordings: list[Any] = []
        self.records: list[Record] = []

    def start_live(self, recording: Any) -> bool:
        self.recordings.append(recording)
        return True

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def take_now(self) -> None:
        self.recordings = [r for r in self.recordings if not r.take(self.records)]


@pytest.mark.parametrize("log_first", [False, True])
@pytest.mark.parametrize("takes", [(), (0,), (1,), (2,), (0, 1, 2, 3)])
def test_a_response_start_taken_at_any_point_is_sent_once_and_in_order(
    takes: tuple[int, ...], log_first: bool
) -> None:
    """The response start is kept out of empty items (the end fields hold it): drains
    before, during and after the response send it once, before what followed it."""
    sink = _TakingSink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if 0 in takes:
            sink.take_now()
        if log_first:
            log.warning("before the response")
        await send({"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]})
        if 1 in takes:
            sink.take_now()
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        if 2 in takes:
            sink.take_now()
        await send({"type": "http.response.body", "body": b"y"})
        if 3 in takes:
            sink.take_now()

    run(ASGIMiddleware(app, sink=sink))
    sink.take_now()
    assert not sink.recordings
    info = process_info(os.getpid())
    wire = [event for record in sink.records for event in to_events(record, info)]
    names = [e.get("name") for e in wire if e["kind"] == "event"]
    expected = ["response.start", "response.body"]
    if log_first:
        expected.insert(0, "log")
    assert names == expected
    (start,) = [e for e in wire if e.get("name") == "response.start"]
    assert start["attrs"] == {"status": 201, "headers": [["a", "b"]]}
    assert wire[0]["kind"] == "span_start"
    assert [e["kind"] for e in wire if e["kind"] != "event"] == ["span_start", "span_end"]
    (end,) = [e for e in wire if e["kind"] == "span_end"]
    assert end["attrs"]["http.response.status_code"] == 201
    assert end["attrs"]["http.response.body.size"] == 2
    timestamps = [e["ts"] for e in wire if e["kind"] == "event"]
    assert timestamps == sorted(timestamps)
