"""A view that raises, under frameworks that catch the exception, log it and answer 500.

Why: Flask, Django and Quart turn a view's exception into their 500 page themselves, so
it never reaches the middleware: the request showed a 500 with the traceback in its Logs
tab, but no error, no exception event and an empty Error tab, for the most common thing
a developer opens hopscope to look at.  The first exception the app logs at ERROR while
it answers is now the request's error when the answer is a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from flask import Flask
from hopscope.tracing import MemorySink, Trace, wrap
from test_frameworks_asgi import django_asgi


def _one(sink: MemorySink) -> Trace:
    (trace,) = sink.traces()
    return trace


def _exception(trace: Trace) -> dict[str, Any]:
    (event,) = [e for s in trace.spans.values() for e in s.events if e.name == "exception"]
    return event.attrs


def _wsgi_get(app: Any, path: str) -> httpx.Response:
    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://testserver") as client:
        return client.get(path)


def _asgi_get(app: Any, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.get(path)

    return asyncio.run(get())


def flask_app() -> Flask:
    app = Flask("errors_s11")

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("flask view failed")

    @app.get("/recovered")
    def recovered() -> str:
        try:
            raise KeyError("cache miss")
        except KeyError:
            logging.getLogger("errors_s11").exception("cache unavailable, computed instead")
        return "fine"

    @app.get("/unavailable")
    def unavailable() -> tuple[str, int]:
        try:
            raise ConnectionError("database down")
        except ConnectionError:
            logging.getLogger("errors_s11").exception("database down")
        return "try later", 503

    @app.get("/warned")
    def warned() -> tuple[str, int]:
        try:
            raise ValueError("odd")
        except ValueError:
            logging.getLogger("errors_s11").warning("odd input", exc_info=True)
        return "no", 500

    return app


def test_flask_view_exception_is_the_requests_error() -> None:
    app = flask_app()
    bare = _wsgi_get(app, "/boom")
    sink = MemorySink()
    got = _wsgi_get(wrap(app, sink=sink), "/boom")
    assert (got.status_code, got.content) == (bare.status_code, bare.content) == (500, bare.content)
    trace = _one(sink)
    assert trace.error and trace.status == 500
    assert trace.root is not None and trace.root.attrs["exception.type"] == "RuntimeError"
    exc = _exception(trace)
    assert exc["exception.type"] == "builtins.RuntimeError"
    assert exc["exception.message"] == "flask view failed"
    assert "in boom" in exc["exception.stacktrace"]
    # The log record Flask wrote is still there, as before.
    assert any(e.name == "log" for e in trace.root.events)


@pytest.mark.parametrize(
    ("path", "error"),
    [("/recovered", False), ("/unavailable", True), ("/warned", False)],
    ids=["logged-then-200", "logged-then-503", "warning-then-500"],
)
def test_only_a_5xx_after_an_error_log_is_an_error(path: str, error: bool) -> None:
    sink = MemorySink()
    _wsgi_get(wrap(flask_app(), sink=sink), path)
    trace = _one(sink)
    assert trace.error is error
    exceptions = [e for s in trace.spans.values() for e in s.events if e.name == "exception"]
    assert len(exceptions) == (1 if error else 0)
    if error:
        assert exceptions[0].attrs["exception.type"] == "builtins.ConnectionError"


def _django_boom(request: Any) -> Any:
    raise LookupError("django view failed")


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_django_view_exception_is_the_requests_error(interface: str) -> None:
    from django.core.wsgi import get_wsgi_application

    with django_asgi("hopscope_errors_s11_urls", [("boom", _django_boom)]) as asgi_app:
        logging.getLogger("django.request").disabled = False
        app = get_wsgi_application() if interface == "wsgi" else asgi_app
        get = _wsgi_get if interface == "wsgi" else _asgi_get
        sink = MemorySink()
        bare = get(app, "/boom")
        got = get(wrap(app, sink=sink), "/boom")
    assert (got.status_code, got.content) == (bare.status_code, bare.content)
    assert got.status_code == 500
    trace = _one(sink)
    assert trace.error and trace.root is not None
    assert trace.root.attrs["exception.type"] == "LookupError"
    assert _exception(trace)["exception.message"] == "django view failed"


def test_quart_view_exception_is_the_requests_error() -> None:
    from quart import Quart

    app = Quart("errors_s11_quart")

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("quart view failed")

    sink = MemorySink()
    got = _asgi_get(wrap(app, sink=sink), "/boom")
    assert got.status_code == 500
    trace = _one(sink)
    assert trace.error
    assert _exception(trace)["exception.message"] == "quart view failed"
