"""The WSGI middleware: real apps and servers, byte-identical responses, truthful traces.

The gunicorn test imports this module inside the server (``test_wsgi:served_app()``),
so nothing here may have side effects at import time.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import marshal
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.handlers import SimpleHandler
from wsgiref.util import FileWrapper, setup_testing_defaults
from wsgiref.validate import WSGIWarning, validator

import flask
import httpx
import pytest
from djangotools import django_urls
from hopscope.tracing import FileSink, MemorySink, Span, Trace, load, span, wrap
from hopscope.tracing.context import current
from hopscope.tracing.records import BODY_LIMIT, legacy, process_info, to_events
from hopscope.tracing.tracefile import read_events
from hopscope.tracing.wsgi import EVENT_CHUNKS, WSGIMiddleware
from traces import EmitOnlySink, events, the_trace

# A missing close() shows up only as an "unraisable" exception in the validator's
# __del__; make it fail the test that caused it.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
LARGE = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB, every offset distinct mod 256
STREAM_CHUNKS = 10
THIS_FILE = str(Path(__file__).resolve())


# -- apps ---------------------------------------------------------------------------
def flask_app() -> flask.Flask:
    app = flask.Flask("hopscope_wsgi_test")

    @app.get("/hello")
    def hello() -> str:
        return "hello world"

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/stream")
    def stream() -> flask.Response:
        def chunks() -> Iterator[str]:
            for i in range(STREAM_CHUNKS):
                yield f"chunk {i}\n"

        return flask.Response(chunks(), mimetype="text/plain")

    @app.get("/large")
    def large() -> flask.Response:
        return flask.Response(LARGE, mimetype="application/octet-stream")

    @app.post("/upload")
    def upload() -> dict[str, Any]:
        items = flask.request.get_json()
        return {"count": len(items), "last": items[-1]}

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    @app.get("/traced")
    def traced() -> str:
        with span("lookup", table="users"):
            pass
        return "traced"

    @app.get("/stream-traced")
    def stream_traced() -> flask.Response:
        @flask.stream_with_context
        def chunks() -> Iterator[str]:
            yield "a"
            with span("inside-stream"):
                pass
            yield "b"

        return flask.Response(chunks(), mimetype="text/plain")

    @app.get("/file")
    def file() -> flask.Response:
        return flask.send_file(THIS_FILE, mimetype="text/plain")

    return app


def served_app() -> Callable[..., Any]:
    """What gunicorn serves: the bare Flask app, or the same app wrapped when the request
    says ``X-Wrapped`` (the sink comes from ``HOPSCOPE_SINK``, created lazily)."""
    app = flask_app()
    wrapped = wrap(app)

    def dispatch(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        chosen = wrapped if environ.get("HTTP_X_WRAPPED") else app
        return chosen(environ, start_response)  # type: ignore[no-any-return]

    return dispatch


# -- helpers ------------------------------------------------------------------------
@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


def client(app: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver")


def both(app: Any, wrapped: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Send the same request to the bare and the wrapped app; they must answer alike."""
    with client(app) as bare_client:
        bare = bare_client.request(method, url, **kwargs)
    with client(wrapped) as wrapped_client:
        got = wrapped_client.request(method, url, **kwargs)
    assert got.status_code == bare.status_code
    assert got.headers.raw == bare.headers.raw
    assert got.content == bare.content
    assert current.get() is None  # nothing leaks out of the request
    return got


def app_span(trace: Trace) -> Span:
    spans = [s for s in trace.spans.values() if s.attrs.get("interface") == "wsgi"]
    assert len(spans) == 1
    return spans[0]


def marshalable(sink: MemorySink) -> None:
    for record in sink.records():
        marshal.dumps(record)


# -- Flask through httpx.WSGITransport ----------------------------------------------
def test_plain_request_is_recorded(sink: MemorySink) -> None:
    app = flask_app()
    response = both(
        app,
        WSGIMiddleware(app, sink=sink),
        "GET",
        "/hello?x=1&y=2",
        headers=[("X-First", "1"), ("X-Second", "2")],
    )
    assert response.text == "hello world"
    marshalable(sink)
    trace = the_trace(sink)
    s = app_span(trace)
    assert s.name == "GET /hello"
    assert s.hop == "app" and s.finished and s.parent_id is None
    assert s.attrs["http.request.method"] == "GET"
    assert s.attrs["url.path"] == "/hello"
    assert s.attrs["url.query"] == "x=1&y=2"
    assert s.attrs["url.scheme"] == "http"
    assert s.attrs["network.protocol.version"] == "1.1"
    assert s.attrs["server.address"] == "testserver"
    assert s.attrs["server.port"] == 80
    assert s.attrs["client.address"] == "127.0.0.1"
    names = [name for name, _ in s.headers("request")]
    assert names.index("x-first") < names.index("x-second")
    assert ("host", "testserver") in s.headers("request")
    assert s.attrs["http.response.status_code"] == 200
    assert ("Content-Length", "11") in s.headers("response")
    assert s.body("response") == b"hello world"
    assert s.attrs["http.response.body.size"] == 11
    assert s.attrs["http.response.body.truncated"] is False
    assert s.attrs["http.request.body.size"] == 0
    start = s.event("response.start")
    assert start is not None and start.attrs["status"] == 200
    # A known Content-Length says at once that nothing more follows.
    assert events(s, "response.body") == [{"size": 11, "more": False}]
    assert "error" not in s.attrs and "disconnected" not in s.attrs


def test_route_template_from_flask(sink: MemorySink) -> None:
    app = flask_app()
    both(app, WSGIMiddleware(app, sink=sink), "GET", "/items/7")
    s = app_span(the_trace(sink))
    assert s.attrs["http.route"] == "/items/<int:item_id>"
    assert s.name == "GET /items/7"


def test_streaming_response_chunks_and_summary(sink: MemorySink) -> None:
    app = flask_app()
    response = both(app, WSGIMiddleware(app, sink=sink), "GET", "/stream")
    expected = "".join(f"chunk {i}\n" for i in range(STREAM_CHUNKS))
    assert response.text == expected
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.body.size"] == len(expected)
    assert s.body("response") == expected.encode()
    chunks = events(s, "response.body")
    assert chunks == [{"size": len(f"chunk {i}\n"), "more": True} for i in range(4)]
    summary = s.event("response.body.summary")
    assert summary is not None
    assert summary.attrs["count"] == STREAM_CHUNKS
    assert summary.attrs["bytes"] == len(expected)
    assert summary.attrs["first_ts"] <= summary.attrs["last_ts"]


def test_large_response_is_counted_and_capture_truncated(sink: MemorySink) -> None:
    app = flask_app()
    response = both(app, WSGIMiddleware(app, sink=sink), "GET", "/large")
    assert len(response.content) == len(LARGE)
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.body.size"] == len(LARGE)
    assert s.attrs["http.response.body.truncated"] is True
    assert s.body("response") == LARGE[:BODY_LIMIT]
    # The record keeps no more than the limit, whatever the chunk size.
    end = next(r for r in legacy(sink.records()) if r[0] == "e")
    kept = end[4]["http.response.body"]  # one chunk, or a list of them
    assert len(kept if isinstance(kept, bytes) else b"".join(kept)) == BODY_LIMIT


def test_body_limit_is_configurable(sink: MemorySink) -> None:
    app = flask_app()
    both(app, WSGIMiddleware(app, sink=sink, body_limit=5), "GET", "/hello")
    s = app_span(the_trace(sink))
    assert s.body("response") == b"hello"
    assert s.attrs["http.response.body.truncated"] is True
    assert s.attrs["http.response.body.size"] == 11


@pytest.mark.parametrize("count", [3, 20_000])
def test_json_upload(sink: MemorySink, count: int) -> None:
    app = flask_app()
    payload = [{"n": i, "name": f"item-{i}"} for i in range(count)]
    body = json.dumps(payload).encode()
    response = both(
        app,
        WSGIMiddleware(app, sink=sink),
        "POST",
        "/upload",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.json() == {"count": count, "last": payload[-1]}
    s = app_span(the_trace(sink))
    assert ("content-type", "application/json") in s.headers("request")
    assert ("content-length", str(len(body))) in s.headers("request")
    assert s.attrs["http.request.body.size"] == len(body)
    truncated = len(body) > BODY_LIMIT
    assert s.attrs["http.request.body.truncated"] is truncated
    assert s.body("request") == body[:BODY_LIMIT]
    reads = events(s, "request.body")
    summary = s.event("request.body.summary")
    if truncated:
        # Werkzeug reads 64 KiB at a time; Content-Length tells each read more follows.
        assert reads == [{"size": 65536, "more": True}] * 4
        assert summary is not None
        assert summary.attrs["bytes"] == len(body)
        assert summary.attrs["count"] == -(-len(body) // 65536)
    else:
        assert reads == [{"size": len(body), "more": False}]
        assert summary is None


def test_not_found(sink: MemorySink) -> None:
    app = flask_app()
    response = both(app, WSGIMiddleware(app, sink=sink), "GET", "/missing")
    assert response.status_code == 404
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 404
    assert "http.route" not in s.attrs
    assert "error" not in s.attrs


def test_handled_exception_is_a_500(sink: MemorySink) -> None:
    app = flask_app()
    app.logger.disabled = True
    response = both(app, WSGIMiddleware(app, sink=sink), "GET", "/boom")
    assert response.status_code == 500
    s = app_span(the_trace(sink))
    assert s.attrs["http.response.status_code"] == 500
    assert s.attrs["http.route"] == "/boom"


def test_propagated_exception_is_recorded_and_reraised(sink: MemorySink) -> None:
    app = flask_app()
    app.config["PROPAGATE_EXCEPTIONS"] = True
    with client(WSGIMiddleware(app, sink=sink)) as wrapped_client:
        with pytest.raises(RuntimeError, match=r"^boom$"):
            wrapped_client.get("/boom")
    assert current.get() is None
    s = app_span(the_trace(sink))
    assert s.finished
    assert s.attrs["error"] is True
    assert s.attrs["exception.type"] == "RuntimeError"
    assert "http.response.status_code" not in s.attrs
    exc = s.event("exception")
    assert exc is not None
    assert exc.attrs["exception.type"] == "builtins.RuntimeError"
    assert exc.attrs["phase"] == "before_response"
    assert 'raise RuntimeError("boom")' in exc.attrs["exception.stacktrace"]


def test_user_spans_land_under_the_app_span(sink: MemorySink) -> None:
    app = flask_app()
    both(app, WSGIMiddleware(app, sink=sink), "GET", "/traced")
    trace = the_trace(sink)
    s = app_span(trace)
    (child,) = trace.children(s)
    assert child.name == "lookup"
    assert child.attrs["table"] == "users"
    assert child.finished
    assert trace.root is s


def test_user_spans_inside_a_streamed_body(sink: MemorySink) -> None:
    app = flask_app()
    response = both(app, WSGIMiddleware(app, sink=sink), "GET", "/stream-traced")
    assert response.text == "ab"
    trace = the_trace(sink)
    s = app_span(trace)
    assert [c.name for c in trace.children(s)] == ["inside-stream"]


def test_traceparent_is_honoured(sink: MemorySink) -> None:
    app = flask_app()
    both(
        app, WSGIMiddleware(app, sink=sink), "GET", "/traced", headers={"traceparent": TRACEPARENT}
    )
    trace = the_trace(sink)
    assert trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    s = app_span(trace)
    assert s.parent_id == "00f067aa0ba902b7"
    assert all(child.trace_id == trace.trace_id for child in trace.children(s))


def test_malformed_traceparent_starts_a_new_trace(sink: MemorySink) -> None:
    app = flask_app()
    wrapped = WSGIMiddleware(app, sink=sink)
    both(app, wrapped, "GET", "/hello", headers={"traceparent": "00-zz-yy-01"})
    trace = the_trace(sink)
    assert trace.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert app_span(trace).parent_id is None


def test_wrap_picks_wsgi_and_is_idempotent(sink: MemorySink) -> None:
    app = flask_app()
    wrapped = wrap(app, sink=sink)
    assert isinstance(wrapped, WSGIMiddleware)
    assert wrapped.app is app and wrapped.sink is sink and wrapped.body_limit == BODY_LIMIT
    assert wrap(wrapped) is wrapped
    assert WSGIMiddleware.__hopscope_wrapped__ is True


def test_default_sink_is_looked_up_at_the_first_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hopscope.tracing import sinks

    monkeypatch.setattr(sinks, "_default", None)
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("HOPSCOPE_SINK", "memory:")
    wrapped = wrap(flask_app())
    monkeypatch.setenv("HOPSCOPE_SINK", f"file:{path}")  # wrapping chose nothing yet
    assert sinks._default is None
    with client(wrapped) as c:
        assert c.get("/hello").text == "hello world"
    default = sinks._default
    assert isinstance(default, sinks.FileSink)
    default.close()
    (trace,) = load(path)
    assert trace.status == 200


def test_non_ascii_path_is_decoded(sink: MemorySink) -> None:
    app = flask_app()
    # PEP 3333: PATH_INFO holds the URL's bytes as latin-1.
    serve(WSGIMiddleware(app, sink=sink), path="/caf\xc3\xa9")
    # httpx's WSGITransport passes the decoded path instead.
    both(app, WSGIMiddleware(app, sink=sink), "GET", "/caf%C3%A9")
    assert len(sink.traces()) == 2
    for trace in sink.traces():
        s = app_span(trace)
        assert s.attrs["url.path"] == "/café"
        assert s.name == "GET /café"
        assert s.attrs["http.response.status_code"] == 404


def test_nested_middlewares_make_one_trace(sink: MemorySink) -> None:
    app = flask_app()
    inner = WSGIMiddleware(app, sink=sink)
    both(
        app,
        WSGIMiddleware(inner, sink=sink),
        "GET",
        "/traced",
        headers={"traceparent": TRACEPARENT},
    )
    (trace,) = sink.traces()
    outer_span = trace.root
    assert outer_span is not None and outer_span.parent_id == "00f067aa0ba902b7"
    (inner_span,) = trace.children(outer_span)
    assert inner_span.attrs["interface"] == "wsgi"
    assert [c.name for c in trace.children(inner_span)] == ["lookup"]


def test_a_bad_sink_setting_leaves_the_app_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hopscope.tracing import sinks

    monkeypatch.setattr(sinks, "_default", None)
    monkeypatch.setenv("HOPSCOPE_SINK", "nonsense")
    app = flask_app()
    wrapped = wrap(app)
    for _ in range(2):
        assert both(app, wrapped, "GET", "/hello").text == "hello world"
    err = capsys.readouterr().err
    assert err.count("hopscope: tracing disabled") == 1
    assert len(err.strip().splitlines()) == 1


# -- Django through httpx.WSGITransport ---------------------------------------------
@pytest.fixture(scope="module")
def django_app() -> Iterator[Any]:
    # Django's settings are process-wide and another test module may have configured
    # them first: see djangotools.django_urls.
    from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
    from django.urls import path

    def hello(request: HttpRequest) -> HttpResponse:
        return HttpResponse("hello from django", content_type="text/plain")

    def echo(request: HttpRequest) -> HttpResponse:
        return HttpResponse(request.body[::-1], content_type="application/octet-stream")

    def stream(request: HttpRequest) -> StreamingHttpResponse:
        return StreamingHttpResponse(f"line {i}\n" for i in range(6))

    def item(request: HttpRequest, item_id: int) -> JsonResponse:
        return JsonResponse({"id": item_id})

    urlpatterns = [
        path("hello/", hello),
        path("echo/", echo),
        path("stream/", stream),
        path("items/<int:item_id>/", item),
    ]
    with django_urls("hopscope_test_django_wsgi_urls", urlpatterns, DEBUG=False):
        from django.core.wsgi import get_wsgi_application

        yield get_wsgi_application()


def test_django_app(django_app: Any, sink: MemorySink) -> None:
    wrapped = WSGIMiddleware(django_app, sink=sink)
    assert both(django_app, wrapped, "GET", "/hello/").text == "hello from django"
    body = os.urandom(100_000)
    echoed = both(django_app, wrapped, "POST", "/echo/", content=body)
    assert echoed.content == body[::-1]
    streamed = both(django_app, wrapped, "GET", "/stream/")
    assert streamed.text == "".join(f"line {i}\n" for i in range(6))
    assert both(django_app, wrapped, "GET", "/items/3/").json() == {"id": 3}
    assert both(django_app, wrapped, "GET", "/nowhere/").status_code == 404
    marshalable(sink)

    spans = {app_span(t).name: app_span(t) for t in sink.traces()}
    assert sorted(spans) == sorted(
        ["GET /hello/", "POST /echo/", "GET /stream/", "GET /items/3/", "GET /nowhere/"]
    )
    assert spans["GET /hello/"].body("response") == b"hello from django"
    upload = spans["POST /echo/"]
    assert upload.attrs["http.request.body.size"] == len(body)
    assert upload.attrs["http.request.body.truncated"] is True
    assert upload.body("request") == body[:BODY_LIMIT]
    assert upload.attrs["http.response.body.size"] == len(body)
    stream = spans["GET /stream/"]
    assert stream.event("response.body.summary") is not None
    assert stream.attrs["http.response.body.size"] == len(streamed.content)
    assert spans["GET /nowhere/"].attrs["http.response.status_code"] == 404
    assert all(s.finished and "error" not in s.attrs for s in spans.values())


# -- PEP 3333 with wsgiref: validator on both sides ---------------------------------
class Handler(SimpleHandler):
    """wsgiref's reference server side, minus the process environment, failing loudly."""

    os_environ: dict[str, str] = {}  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exc_infos: list[Any] = []

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.exc_infos.append(exc_info)
        return super().start_response(status, headers, exc_info)

    def handle_error(self) -> None:
        raise


def serve(app: Any, method: str = "GET", body: bytes = b"", path: str = "/") -> bytes:
    """Run one request through wsgiref; the raw response bytes without the Date line."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
    }
    if body:
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["CONTENT_TYPE"] = "application/octet-stream"
    setup_testing_defaults(environ)
    out = io.BytesIO()
    Handler(io.BytesIO(body), out, io.StringIO(), environ, multithread=False).run(app)
    return re.sub(rb"\r\nDate: [^\r]*", b"", out.getvalue())


class Closing:
    """A response iterable that counts its close() calls."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed += 1


def normal_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    size = int(environ.get("CONTENT_LENGTH") or 0)
    data = environ["wsgi.input"].read(size)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"read ", str(len(data)).encode()]


def lines_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    lines = list(environ["wsgi.input"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d lines" % len(lines)]


def lazy_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    # A generator: start_response runs only when the server starts iterating.
    start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(6):
        yield b"part %d;" % i


def write_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    write(b"then ")
    return [b"returned"]


closing_body: list[Closing] = []


def streaming_app(environ: dict[str, Any], start_response: Any) -> Closing:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    body = Closing([b"abc", b"", b"def", b"ghi"])
    closing_body.append(body)
    return body


@pytest.mark.parametrize(
    ("app", "method", "body", "expected"),
    [
        (normal_app, "POST", b"x" * 1000, b"read 1000"),
        (lines_app, "POST", b"one\ntwo\nthree\n", b"3 lines"),
        (lazy_app, "GET", b"", b"".join(b"part %d;" % i for i in range(6))),
        (write_app, "GET", b"", b"written then returned"),
        (streaming_app, "GET", b"", b"abcdefghi"),
    ],
)
def test_validator_on_both_sides(
    sink: MemorySink, app: Any, method: str, body: bytes, expected: bytes
) -> None:
    closing_body.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", WSGIWarning)
        bare = serve(validator(app), method, body)
        closing_body.clear()
        wrapped = serve(validator(WSGIMiddleware(validator(app), sink=sink)), method, body)
    assert bare == wrapped
    assert wrapped.endswith(b"\r\n\r\n" + expected)
    if closing_body:
        assert closing_body[0].closed == 1
    s = app_span(the_trace(sink))
    assert s.finished and "disconnected" not in s.attrs and "error" not in s.attrs
    assert s.attrs["http.response.status_code"] == 200
    assert s.attrs["http.response.body.size"] == len(expected)
    assert s.body("response") == expected
    assert s.attrs["http.request.body.size"] == len(body)
    assert s.body("request") == body
    chunks = events(s, "response.body")
    assert chunks[-1]["more"] is (len(chunks) == 4 and s.event("response.body.summary") is not None)


def test_close_is_called_once_even_when_never_iterated(sink: MemorySink) -> None:
    body = Closing([b"never sent"])

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    result = WSGIMiddleware(app, sink=sink)(environ, lambda *args: None)
    assert not app_span(the_trace(sink)).finished  # still running until close()
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert body.closed == 1
    s = app_span(the_trace(sink))
    assert s.finished
    assert s.attrs["disconnected"] is True
    assert events(s, "disconnect") == [{"phase": "during_response"}]
    assert s.attrs["http.response.body.size"] == 0


def test_close_is_called_once_after_a_full_response(sink: MemorySink) -> None:
    body = Closing([b"one", b"two"])

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    serve(WSGIMiddleware(app, sink=sink))
    assert body.closed == 1
    with client(WSGIMiddleware(app, sink=sink)) as c:
        assert c.get("/").content == b"onetwo"
    assert body.closed == 2
    assert all(app_span(t).finished for t in sink.traces())


def test_span_ends_only_after_close_returns(sink: MemorySink) -> None:
    seen: list[list[Any]] = []

    class Body(Closing):
        def close(self) -> None:
            seen.append([r[0] for r in legacy(sink.records())])
            super().close()

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body([b"x"])

    serve(WSGIMiddleware(app, sink=sink))
    assert "e" not in seen[0]
    assert legacy(sink.records())[-1][0] == "e"


def test_lists_keep_their_length(sink: MemorySink) -> None:
    # wsgiref sets Content-Length itself for one-item lists: the wrapper must not hide it.
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"sized"]

    bare, wrapped = serve(app), serve(WSGIMiddleware(app, sink=sink))
    assert b"Content-Length: 5" in bare
    assert bare == wrapped


def test_exception_at_call_is_reraised_unchanged(sink: MemorySink) -> None:
    raised: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raised.append(ValueError("bad input"))
        raise raised[0]

    with pytest.raises(ValueError) as info:
        serve(WSGIMiddleware(app, sink=sink))
    assert info.value is raised[0]
    assert current.get() is None
    s = app_span(the_trace(sink))
    assert s.finished and s.attrs["error"] is True
    assert s.attrs["exception.type"] == "ValueError"
    assert events(s, "exception")[0]["phase"] == "before_response"


def test_exception_while_iterating(sink: MemorySink) -> None:
    raised: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        raised.append(KeyError("mid-stream"))
        raise raised[0]

    with pytest.raises(KeyError) as info:
        serve(WSGIMiddleware(app, sink=sink))
    assert info.value is raised[0]
    s = app_span(the_trace(sink))
    assert s.finished and s.attrs["error"] is True
    assert s.attrs["http.response.status_code"] == 200
    assert s.attrs["http.response.body.size"] == len(b"partial")
    assert "disconnected" not in s.attrs
    assert events(s, "exception")[0]["phase"] == "after_response_start"


def test_exception_in_close(sink: MemorySink) -> None:
    class Body(Closing):
        def close(self) -> None:
            super().close()
            raise OSError("cannot close")

    body = Body([b"done"])

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    with pytest.raises(OSError, match="cannot close"):
        serve(WSGIMiddleware(app, sink=sink))
    assert body.closed == 1
    s = app_span(the_trace(sink))
    assert s.finished and s.attrs["exception.type"] == "OSError"
    assert events(s, "exception")[0]["phase"] == "after_response"


def test_exc_info_before_headers_are_sent_replaces_the_status(sink: MemorySink) -> None:
    passed: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise LookupError("changed my mind")
        except LookupError:
            passed.append(sys.exc_info())
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], passed[0])
        return [b"sorry"]

    output = serve(WSGIMiddleware(app, sink=sink))
    assert output.startswith(b"HTTP/1.0 500 Internal Server Error\r\n")
    assert output == serve(app)
    s = app_span(the_trace(sink))
    assert [e["status"] for e in events(s, "response.start")] == [200, 500]
    assert s.attrs["http.response.status_code"] == 500


def test_exc_info_after_headers_are_sent_reraises(sink: MemorySink) -> None:
    raised: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"headers are out"
        try:
            raised.append(KeyError("too late"))
            raise raised[0]
        except KeyError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        yield b"never"

    environ: dict[str, Any] = {"QUERY_STRING": ""}
    setup_testing_defaults(environ)
    handler = Handler(io.BytesIO(), io.BytesIO(), io.StringIO(), environ)
    with pytest.raises(KeyError) as info:
        handler.run(WSGIMiddleware(app, sink=sink))
    assert info.value is raised[0]
    exc_info = handler.exc_infos[1]
    assert exc_info is not None and exc_info[1] is raised[0]  # passed on untouched
    s = app_span(the_trace(sink))
    assert s.attrs["error"] is True and s.attrs["exception.type"] == "KeyError"
    assert s.attrs["http.response.status_code"] == 200
    assert events(s, "exception")[0]["phase"] == "after_response_start"


def test_file_wrapper_is_returned_unwrapped(sink: MemorySink) -> None:
    made: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        made.append(environ["wsgi.file_wrapper"](io.BytesIO(b"file contents"), 4))
        return made[-1]

    environ: dict[str, Any] = {"wsgi.file_wrapper": FileWrapper}
    setup_testing_defaults(environ)
    result = WSGIMiddleware(app, sink=sink)(environ, lambda *args: None)
    assert result is made[0]
    assert isinstance(result, FileWrapper)
    assert not app_span(the_trace(sink)).finished  # the file is still to be sent
    assert b"".join(result) == b"file contents"
    result.close()  # type: ignore[attr-defined]
    assert made[0].filelike.closed
    s = app_span(the_trace(sink))
    assert s.finished
    assert s.attrs["wsgi.file_wrapper"] is True
    assert "disconnected" not in s.attrs
    # And through wsgiref's own server side, byte for byte.
    assert serve(WSGIMiddleware(app, sink=sink)) == serve(app)


def test_file_wrapper_that_refuses_a_new_close_ends_at_return(sink: MemorySink) -> None:
    class Slotted:
        __slots__ = ("filelike",)

        def __init__(self, filelike: Any, blksize: int = 8192) -> None:
            self.filelike = filelike

        def __iter__(self) -> Iterator[bytes]:
            return iter([self.filelike.read()])

        def close(self) -> None:
            self.filelike.close()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"data"))

    environ: dict[str, Any] = {"wsgi.file_wrapper": Slotted}
    setup_testing_defaults(environ)
    result = WSGIMiddleware(app, sink=sink)(environ, lambda *args: None)
    assert type(result) is Slotted
    s = app_span(the_trace(sink))
    assert s.finished and s.attrs["wsgi.file_wrapper"] is True
    result.close()  # type: ignore[attr-defined]


def test_input_proxy_passes_everything_through(sink: MemorySink) -> None:
    data = b"".join(b"line %d\n" % i for i in range(100))
    got: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        got["first"] = stream.readline()
        got["some"] = stream.read(10)
        got["lines"] = stream.readlines(20)
        buffer = bytearray(30)
        got["into"] = bytes(buffer[: stream.readinto(buffer)])
        got["rest"] = stream.read()
        got["eof"] = stream.read()
        got["tell"] = stream.tell()  # anything else reaches the server's stream
        start_response("204 No Content", [])
        return []

    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "wsgi.input": io.BytesIO(data)}
    setup_testing_defaults(environ)
    result = WSGIMiddleware(app, sink=sink)(environ, lambda *args: None)
    list(result)
    result.close()  # type: ignore[attr-defined]
    parts = [got["first"], got["some"], *got["lines"], got["into"], got["rest"]]
    assert b"".join(parts) == data and got["eof"] == b""
    assert got["tell"] == len(data)
    s = app_span(the_trace(sink))
    assert s.attrs["http.request.body.size"] == len(data)
    assert s.body("request") == data
    reads = events(s, "request.body")
    assert len(reads) == 4 and all(r["more"] is True for r in reads)  # no Content-Length
    summary = s.event("request.body.summary")
    assert summary is not None and summary.attrs["bytes"] == len(data)


def test_context_is_set_during_the_call_and_reset_after(sink: MemorySink) -> None:
    inside: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        inside.append(current.get())
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"x"
        inside.append(current.get())

    serve(WSGIMiddleware(app, sink=sink))
    s = app_span(the_trace(sink))
    assert [f"{c.span_id:016x}" for c in inside] == [s.span_id, s.span_id]
    assert current.get() is None


def _ok(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


def test_body_stepped_and_closed_on_other_threads(sink: MemorySink) -> None:
    """Servers that run WSGI apps in a thread pool (a2wsgi, uvicorn's and Starlette's
    WSGIMiddleware) may step the body and close it on threads other than the call's: the
    app's code sees its request on each, and no worker keeps the request afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def chunks() -> Iterator[bytes]:
            for i in range(3):
                seen.append(current.get())
                with span(f"step-{i}"):
                    pass
                yield b"x"

        class Body:
            def __iter__(self) -> Iterator[bytes]:
                return chunks()

            def close(self) -> None:
                seen.append(current.get())
                with span("close"):
                    pass

        return Body()

    wrapped = WSGIMiddleware(app, sink=sink)
    with ThreadPoolExecutor(4) as pool:
        body = pool.submit(wrapped, {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, _ok).result()
        iterator = iter(body)
        got = [pool.submit(next, iterator, None).result() for _ in range(4)]
        pool.submit(body.close).result()
        # Every worker, whichever steps it ran, is back outside any request.
        after = [pool.submit(current.get).result() for _ in range(16)]
    assert got == [b"x", b"x", b"x", None]
    s = app_span(the_trace(sink))
    assert [f"{c.span_id:016x}" for c in seen] == [s.span_id] * 4
    assert [c.name for c in the_trace(sink).children(s)] == [
        "step-0", "step-1", "step-2", "close",
    ]  # fmt: skip
    assert after == [None] * 16
    assert current.get() is None


def test_a_body_never_closed_leaves_no_request_behind(sink: MemorySink) -> None:
    """A server that drops the body without close() (against PEP 3333) must not leave the
    request current: span() after it records nothing, and the next request on the
    thread is a trace of its own, not a child of the abandoned one."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"a"
        yield b"b"

    wrapped = WSGIMiddleware(app, sink=sink)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    for stop_after in (0, 1, 3):  # not stepped, stepped part way, stepped to the end
        body = wrapped(dict(environ), _ok)
        for _, _chunk in zip(range(stop_after), body, strict=False):
            assert current.get() is None  # the server's code, between steps
        del body
        assert current.get() is None
        with span("outside"):
            pass
    assert not [e for e in sink.events() if e.get("name") == "outside"]
    assert serve(wrapped).endswith(b"ab")
    last = sink.traces()[-1]
    assert app_span(last).parent_id is None
    assert len(sink.traces()) == 4


def test_requests_on_one_thread_do_not_share_state(sink: MemorySink) -> None:
    app = flask_app()
    wrapped = WSGIMiddleware(app, sink=sink)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with client(wrapped) as c:
                for _ in range(20):
                    assert c.get("/traced").text == "traced"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    traces = sink.traces()
    assert len(traces) == 80
    for trace in traces:
        s = app_span(trace)
        assert [c.name for c in trace.children(s)] == ["lookup"]
        assert s.finished


# -- real servers -------------------------------------------------------------------
def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        received = []
        while data := conn.recv(1 << 16):
            received.append(data)
    head, _, body = b"".join(received).partition(b"\r\n\r\n")
    return re.sub(rb"\r\nDate: [^\r]*", b"", head) + b"\r\n\r\n" + body


GUNICORN_REQUESTS = {
    "/hello": b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "/stream": b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "/large": b"GET /large HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "/missing": b"GET /missing HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "/boom": b"GET /boom HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "/file": b"GET /file HTTP/1.1\r\nHost: 127.0.0.1\r\n",
}
UPLOAD = json.dumps([{"n": i} for i in range(10_000)]).encode()


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp = tmp_path_factory.mktemp("gunicorn")
    trace_path = tmp / "trace.jsonl"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    env = {**os.environ, "HOPSCOPE_SINK": f"file:{trace_path}"}
    with open(tmp / "gunicorn.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"fd://{listener.fileno()}",
                "--workers",
                "1",
                "--worker-class",
                "sync",
                "--pythonpath",
                str(Path(__file__).parent),
                "test_wsgi:served_app()",
            ],
            pass_fds=[listener.fileno()],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        yield port, trace_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(timeout=20)
        listener.close()


def finished_traces(path: Path, count: int) -> list[Trace]:
    deadline = time.monotonic() + 20
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a line may be half written right now
            traces = [t for t in load(path) if t.finished] if path.exists() else []
        if len(traces) >= count or time.monotonic() > deadline:
            return traces
        time.sleep(0.05)


def test_gunicorn_sync_worker(gunicorn: tuple[int, Path]) -> None:
    port, trace_path = gunicorn
    requests = {
        **GUNICORN_REQUESTS,
        "/upload": b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(UPLOAD),
    }
    for path, head in requests.items():
        body = UPLOAD if path == "/upload" else b""
        bare = raw_request(port, head + b"\r\n" + body)
        wrapped = raw_request(port, head + b"X-Wrapped: 1\r\n\r\n" + body)
        assert wrapped == bare, path
    assert b"Transfer-Encoding: chunked" in raw_request(port, requests["/stream"] + b"\r\n")

    traces = finished_traces(trace_path, len(requests))
    spans = {app_span(t).attrs["url.path"]: app_span(t) for t in traces}
    assert sorted(spans) == sorted(requests)
    for s in spans.values():
        assert s.attrs["server.software"].startswith("gunicorn/")
        assert s.attrs["client.address"] == "127.0.0.1"
        assert isinstance(s.attrs["client.port"], int)
        assert s.attrs["server.port"] == port
        assert ("x-wrapped", "1") in s.headers("request")
    statuses = {path: s.attrs["http.response.status_code"] for path, s in spans.items()}
    assert statuses == {
        "/hello": 200,
        "/stream": 200,
        "/large": 200,
        "/missing": 404,
        "/boom": 500,
        "/file": 200,
        "/upload": 200,
    }
    assert spans["/large"].attrs["http.response.body.size"] == len(LARGE)
    assert spans["/large"].attrs["http.response.body.truncated"] is True
    assert spans["/stream"].event("response.body.summary") is not None
    upload = spans["/upload"]
    assert upload.attrs["http.request.body.size"] == len(UPLOAD)
    assert upload.attrs["http.request.body.truncated"] is True
    assert upload.body("request") == UPLOAD[:BODY_LIMIT]
    assert spans["/file"].attrs["wsgi.file_wrapper"] is True  # gunicorn used sendfile
    assert spans["/hello"].attrs["http.route"] == "/hello"


def test_werkzeug_server(sink: MemorySink) -> None:
    from werkzeug.serving import make_server

    app = flask_app()
    server = make_server("127.0.0.1", 0, WSGIMiddleware(app, sink=sink), threaded=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with httpx.Client(base_url=base, timeout=30) as c:
            upload = c.post("/upload", content=UPLOAD, headers={"Content-Type": "application/json"})
            assert upload.json() == {"count": 10_000, "last": {"n": 9_999}}
            assert c.get("/stream", headers={"traceparent": TRACEPARENT}).status_code == 200
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
    spans = {app_span(t).name: (t, app_span(t)) for t in sink.traces()}
    _, posted = spans["POST /upload"]
    assert posted.attrs["server.software"].startswith("Werkzeug/")
    assert posted.attrs["http.request.body.size"] == len(UPLOAD)
    assert posted.body("request") == UPLOAD[:BODY_LIMIT]
    assert ("content-type", "application/json") in posted.headers("request")
    trace, streamed = spans["GET /stream"]
    assert trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert streamed.finished
    # Werkzeug always sets CONTENT_TYPE, empty when absent: that is not a header.
    assert "content-type" not in [name for name, _ in streamed.headers("request")]


# -- one record per request ---------------------------------------------------------
#
# A MemorySink or a batching sink takes each request whole and makes one "r" record of
# it; a sink that only knows emit() gets every record as it happens.  The wire events
# must be the same either way, in the same order.


def comparable(events: list[dict[str, Any]]) -> list[Any]:
    """Events with ids numbered by first appearance and times left out."""
    ids: dict[str, int] = {}
    out = []
    for event in events:
        same = {k: v for k, v in event.items() if k not in ("ts", "trace_id", "span_id")}
        same["attrs"] = {k: v for k, v in event["attrs"].items() if not k.endswith("_ts")}
        same["ids"] = [ids.setdefault(event[k], len(ids)) for k in ("trace_id", "span_id")]
        if event.get("parent_id") is not None:
            same["parent_id"] = ids.setdefault(event["parent_id"], len(ids))
        out.append(same)
    return out


def logged_stream(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    logging.getLogger("legacy").warning("before the response")
    data = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(EVENT_CHUNKS + 2):
        yield data[i : i + 1]
        logging.getLogger("legacy").warning("after chunk %d", i)
    with span("tail"):
        yield b"end"


def test_one_record_per_request_makes_the_same_events_in_the_same_order() -> None:
    flask = flask_app()
    cases = [
        (logged_stream, "POST", "/", b"0123456789"),
        (flask, "GET", "/items/7", b""),
        (flask, "GET", "/stream-traced", b""),
        (flask, "GET", "/boom", b""),
        (flask, "GET", "/file", b""),
    ]
    for app, method, path, body in cases:
        live, eager = MemorySink(), EmitOnlySink()
        for sink in (live, eager):
            with contextlib.suppress(RuntimeError):
                serve(WSGIMiddleware(app, sink=sink, body_limit=4), method, body, path)
        assert {r[0] for r in live.records()} == {"r"}
        info = process_info(os.getpid())
        eager_events = [e for r in eager.got for e in to_events(r, info)]
        assert comparable(live.events()) == comparable(eager_events), path
    kinds = [(e["kind"], e.get("name")) for e in live.events()]
    assert kinds[0] == ("span_start", "GET /file") and kinds[-1] == ("span_end", None)


def test_logs_keep_their_place_among_the_body_events() -> None:
    sink = MemorySink()
    serve(WSGIMiddleware(logged_stream, sink=sink), "POST", b"0123456789")
    names = [e.name for e in app_span(the_trace(sink)).events]
    assert names[:3] == ["log", "request.body", "response.start"]
    # a chunk's event waits for the next chunk (is more coming?): the log comes first
    assert names[3:7] == ["log", "response.body", "log", "response.body"]


def test_a_running_request_shows_at_each_drain(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    sink = FileSink(path, interval=0.01)

    def seen() -> list[tuple[str, str | None]]:
        return [(e["kind"], e.get("name")) for e in read_events(path)]

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "9")])
        yield b"first"
        deadline = time.monotonic() + 10
        while ("event", "response.body") not in seen():
            assert time.monotonic() < deadline, f"not shown while running: {seen()}"
            time.sleep(0.005)
        shown = [("span_start", "GET /"), ("event", "response.start"), ("event", "response.body")]
        assert seen() == shown
        yield b"last"

    serve(WSGIMiddleware(app, sink=sink))
    sink.flush()  # waits for the end of a request a drain saw running
    assert [kind for kind, _ in seen()] == ["span_start", "event", "event", "event", "span_end"]
    sink.close()
    assert app_span(only_trace_of(load(path))).body("response") == b"firstlast"


def only_trace_of(traces: list[Trace]) -> Trace:
    assert len(traces) == 1, traces
    return traces[0]


def test_requests_leave_no_reference_cycles_behind() -> None:
    """Whatever a request allocates is freed by reference counting: cycles would wait
    for the garbage collector, which would walk them (and all they hold) meanwhile."""
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", "2")])
        yield b"ok"

    def garbage(wsgi_app: Any) -> int:
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                environ = {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "2"}
                setup_testing_defaults(environ)
                environ["wsgi.input"] = io.BytesIO(b"in")
                result = wsgi_app(environ, lambda status, headers, exc_info=None: None)
                for _ in result:
                    pass
                result.close()
            sink.clear()
            return gc.collect()
        finally:
            gc.enable()

    assert garbage(WSGIMiddleware(app, sink=sink)) == garbage(app)


def _echo_body(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body or b"-"]


def test_environs_without_some_fields_or_headers_are_recorded() -> None:
    # The fields and header values are picked by a plan made once per kind of environ
    # (its keys): one without REMOTE_PORT (wsgiref's), with one header key or none,
    # must still be recorded whole, with the fields it lacks left out.
    sink = MemorySink()
    app = WSGIMiddleware(_echo_body, sink=sink)
    for headers in ({"HTTP_HOST": "h.example"}, {}, {"HTTP_HOST": "h", "HTTP_X_A": "1"}):
        environ: dict[str, Any] = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/p",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.input": io.BytesIO(b""),
            **headers,
        }
        setup_testing_defaults(environ)
        environ.pop("REMOTE_PORT", None)
        if "HTTP_HOST" not in headers:
            del environ["HTTP_HOST"]  # (setup_testing_defaults adds one)
        for _ in range(2):  # the plan's first use and a later one
            sink.clear()
            result = app(dict(environ), lambda status, pairs, exc_info=None: None)
            assert b"".join(result) == b"-"
            result.close()  # type: ignore[attr-defined]
            s = app_span(the_trace(sink))
            assert s.name == "GET /p"
            assert s.attrs.get("client.port") is None
            assert s.attrs["server.port"] == 80
            want = [(k[5:].replace("_", "-").lower(), v) for k, v in headers.items()]
            assert s.headers("request") == want


def test_a_body_is_counted_whatever_kind_of_environ_came_before() -> None:
    # A GET of HTTP/1 whose environ has no Content-Length or Transfer-Encoding key is
    # known to have no body from its kind of environ alone; others are still looked at.
    sink = MemorySink()
    app = WSGIMiddleware(_echo_body, sink=sink)
    base = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_PROTOCOL": "HTTP/1.1"}
    cases = [
        ({}, b"", 0),
        ({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "3"}, b"abc", 3),
        ({"CONTENT_LENGTH": "2"}, b"de", 2),  # a GET with a body
        ({"HTTP_TRANSFER_ENCODING": "chunked"}, b"fgh", 3),
        ({"SERVER_PROTOCOL": "HTTP/2"}, b"ij", 2),
        ({}, b"", 0),
    ]
    for extra, body, size in cases:
        environ: dict[str, Any] = {**base, **extra, "wsgi.input": io.BytesIO(body)}
        setup_testing_defaults(environ)
        sink.clear()
        result = app(environ, lambda status, pairs, exc_info=None: None)
        assert b"".join(result) == (body or b"-")
        result.close()  # type: ignore[attr-defined]
        s = app_span(the_trace(sink))
        assert s.attrs["http.request.body.size"] == size, extra
