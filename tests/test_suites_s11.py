"""What session 11's run of the frameworks' own suites through ``hopscope run --`` found
(``bench/framework_suites.py``).

Werkzeug's test ``Client`` (Flask's is one) closes an unbuffered response only when
the test does (or on a redirect): most of Flask's and Werkzeug's own tests never do, so
those requests' recordings never end and stay with the sink.  Since session 11 a WSGI
recording also notes the first exception the app logs at ERROR (Flask's 500 for a view
that raised): kept as the exception object, its traceback held the view's frames, and
everything they referenced, for as long as the process ran, where bare they are freed
as soon as the test lets go of the response.  The recording now keeps what it needs of
that exception (its event), not the exception.
"""

from __future__ import annotations

import gc
import logging
import weakref

from flask import Flask
from hopscope.tracing import MemorySink, wrap
from werkzeug.test import Client


class _Payload:
    """Something only the view's frame refers to."""


def _app(refs: list[weakref.ref[_Payload]]) -> Flask:
    app = Flask("suites_s11")
    # Flask logs the view's exception (which is what hopscope notes); kept from pytest's
    # log capture, whose handler keeps each record, and the exception with it.
    app.logger.handlers[:] = [logging.NullHandler()]
    app.logger.propagate = False

    @app.get("/boom")
    def boom() -> str:
        payload = _Payload()
        refs.append(weakref.ref(payload))
        raise LookupError("view failed")

    return app


def _errors(sink: MemorySink) -> list[tuple[bool, str | None, list[str]]]:
    return [
        (
            trace.error,
            trace.root.attrs.get("exception.type") if trace.root else None,
            [
                e.attrs["exception.type"]
                for s in trace.spans.values()
                for e in s.events
                if e.name == "exception"
            ],
        )
        for trace in sink.traces()
    ]


def test_an_unclosed_test_response_does_not_keep_the_logged_exceptions_frames() -> None:
    """Bare, the view's frame (and its locals) is freed once the test drops the response
    Flask's test client returned; under hopscope too, though the request's recording
    waits for a ``close()`` that never comes."""
    bare_refs: list[weakref.ref[_Payload]] = []
    response = Client(_app(bare_refs)).get("/boom")
    assert response.status_code == 500
    del response
    gc.collect()
    assert bare_refs[0]() is None  # what bare does: nothing keeps the view's frame

    refs: list[weakref.ref[_Payload]] = []
    sink = MemorySink()
    response = Client(wrap(_app(refs), sink=sink)).get("/boom")
    assert response.status_code == 500
    del response
    gc.collect()
    assert refs[0]() is None, "the recording kept the view's frame alive"


def test_the_logged_exception_is_still_the_requests_error_once_closed() -> None:
    """What the logged exception is kept for: a 500 after it is the request's error, with
    the exception's event (type, message, the view's traceback), when the response ends."""
    refs: list[weakref.ref[_Payload]] = []
    sink = MemorySink()
    response = Client(wrap(_app(refs), sink=sink)).get("/boom")
    gc.collect()
    assert refs[0]() is None  # freed before the response ends, too
    response.close()
    assert _errors(sink) == [(True, "LookupError", ["builtins.LookupError"])]
    (trace,) = sink.traces()
    (event,) = [e for s in trace.spans.values() for e in s.events if e.name == "exception"]
    assert event.attrs["exception.message"] == "view failed"
    assert "in boom" in event.attrs["exception.stacktrace"]
    assert event.attrs["phase"] == "before_response"


def test_a_test_response_dropped_without_close_ends_its_request() -> None:
    """Werkzeug's test ``Client`` (Flask's too) closes a response only when the test does,
    and most tests never do: under ``hopscope run -- pytest`` 409 of Flask's suite's 443
    requests stayed "running" for ever.  A response the client lets go of without
    ``close()`` ends its request there: read to its end, as answered; not read, as a
    client that left.  The app's own close is not called (bare, it is not either)."""
    app = Flask("suites_s11_dropped")

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    sink = MemorySink()
    client = Client(wrap(app, sink=sink))
    read = client.get("/hello")
    assert read.data == b"hello"
    unread = client.get("/hello")
    assert not [t for t in sink.traces() if t.root is not None and t.root.finished]
    del read, unread
    gc.collect()
    traces = sink.traces()
    assert len(traces) == 2 and all(t.root is not None and t.root.finished for t in traces)
    assert sorted("disconnected" in t.root.attrs for t in traces if t.root) == [False, True]
    assert all(t.status == 200 for t in traces)
