"""gunicorn's ``server`` hop, as the two calls its request hooks make.

Kept apart from :mod:`.gunicorn_conf` because importing that module loads the user's
``gunicorn.conf.py`` (it is meant to *be* gunicorn's config), while these functions are
also called from hooks that ``hopscope run`` adds to a config gunicorn already loaded
(:mod:`hopscope.tracing.inject`), where reading the user's config again would be wrong.

:func:`open_span` runs in ``pre_request`` (after the request head is parsed, before the
environ is built), :func:`close_span` in ``post_request`` (after the response was
written).  Both run on the thread that handles the request, which is how the app span
finds its parent (:data:`hopscope.tracing.context.server_parent`).
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from typing import Any

from ..context import server_parent
from ..sinks import default_sink
from .hop import open_server_span

__all__ = ["close_span", "open_span"]

_now = time.time_ns

#: The open span of a request whose class takes no new attributes: pre_request and
#: post_request run in one task (ASGI worker) or on one thread, so one context holds it.
_slotted: ContextVar[tuple[Any, tuple[int, int, Any]] | None] = ContextVar(
    "hopscope_gunicorn_request", default=None
)


def open_span(worker: Any, req: Any) -> None:
    """Start the server span of ``req`` (and its queue span, given ``X-Request-Start``)."""
    begin = _now()
    # gunicorn's ASGI worker keeps the header bytes and makes the str pairs only when
    # something reads ``headers``: read the bytes there, so its own path stays as it is.
    headers = getattr(req, "headers_bytes", None)
    opened = open_server_span(
        default_sink(),
        req.headers if headers is None else headers,
        f"{req.method} {req.path}",
        begin,
        begin,
        {
            "server.worker.class": type(worker).__name__,
            "server.worker.pid": os.getpid(),
            "http.request.method": req.method,
            "url.path": req.path,
        },
    )
    state = (opened.trace_id, opened.span_id, server_parent.set((opened.trace_id, opened.span_id)))
    try:
        req._hopscope = state
    except AttributeError:  # a request class with __slots__ (gunicorn's ASGI worker)
        _slotted.set((req, state))


def close_span(req: Any, resp: Any) -> None:
    """End the server span :func:`open_span` started for ``req`` (if it did)."""
    state = getattr(req, "_hopscope", None)
    if state is not None:
        req._hopscope = None
    else:
        held = _slotted.get()
        if held is None or held[0] is not req:
            return
        _slotted.set(None)
        state = held[1]
    trace_id, span_id, token = state
    try:
        server_parent.reset(token)
    except ValueError:  # set in another context: at least do not leak it to the next request
        server_parent.set(None)
    # gunicorn's ASGI worker passes no response unless its access log is on.
    status = getattr(resp, "status_code", None)
    attrs = {} if status is None else {"http.response.status_code": status}
    default_sink().emit(("e", _now(), trace_id, span_id, attrs))
