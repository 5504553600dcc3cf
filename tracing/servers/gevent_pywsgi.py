"""gevent's WSGI server (``gevent.pywsgi``): the ``server`` hop.

gunicorn's ``-k gevent_pywsgi`` worker serves through gevent's ``WSGIHandler`` and calls
none of gunicorn's request hooks; gevent's own ``WSGIServer`` has no hooks at all.
``hopscope run`` patches ``WSGIHandler.handle_one_response``
(:mod:`hopscope.tracing.inject`), which calls these two around it: it runs once per
request, after the request head is parsed and the environ built, in the greenlet that
then calls the app and writes the response, which is how the app span finds its parent
(:data:`hopscope.tracing.context.server_parent`: each greenlet has its own context).
"""

from __future__ import annotations

import os
import time
from contextvars import Token
from typing import Any

from ..context import server_parent
from ..sinks import default_sink
from .hop import open_server_span

__all__ = ["close_span", "open_span"]

_now = time.time_ns

#: What :func:`open_span` hands :func:`close_span`: trace id, span id, the parent's token.
Opened = tuple[int, int, Token[tuple[int, int] | None]]


def open_span(handler: Any) -> Opened:
    """Start the server span of the request ``handler`` has just read (and its queue
    span, given ``X-Request-Start``)."""
    begin = _now()
    method = handler.command
    path = str(handler.path).partition("?")[0]
    address = getattr(handler, "client_address", None)
    headers = getattr(handler, "headers", None)
    opened = open_server_span(
        default_sink(),
        headers.items() if headers is not None else (),
        f"{method} {path}",
        begin,
        begin,
        {
            "server.handler.class": type(handler).__name__,
            "server.worker.pid": os.getpid(),
            "http.request.method": method,
            "url.path": path,
            "client.address": address[0] if isinstance(address, tuple) and address else None,
        },
    )
    token = server_parent.set((opened.trace_id, opened.span_id))
    return opened.trace_id, opened.span_id, token


def close_span(handler: Any, opened: Opened) -> None:
    """End the server span :func:`open_span` started, once the response was written."""
    trace_id, span_id, token = opened
    try:
        server_parent.reset(token)
    except ValueError:  # set in another context: at least do not leak it to the next request
        server_parent.set(None)
    # gevent keeps the status line as bytes (str for its own error answers), None if the
    # request ended before the app answered.
    status = handler.status
    if isinstance(status, bytes):
        status = status.decode("latin-1")
    code = status.split(None, 1)[0] if isinstance(status, str) and status else ""
    attrs = {"http.response.status_code": int(code)} if code.isdigit() else {}
    default_sink().emit(("e", _now(), trace_id, span_id, attrs))
