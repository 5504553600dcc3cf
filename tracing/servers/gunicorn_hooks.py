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
from typing import Any

from ..context import server_parent
from ..sinks import default_sink
from .hop import open_server_span

__all__ = ["close_span", "open_span"]

_now = time.time_ns


def open_span(worker: Any, req: Any) -> None:
    """Start the server span of ``req`` (and its queue span, given ``X-Request-Start``)."""
    begin = _now()
    opened = open_server_span(
        default_sink(),
        req.headers,
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
    parent = (opened.trace_id, opened.span_id)
    req._hopscope = (opened.trace_id, opened.span_id, server_parent.set(parent))


def close_span(req: Any, resp: Any) -> None:
    """End the server span :func:`open_span` started for ``req`` (if it did)."""
    state = getattr(req, "_hopscope", None)
    if state is None:
        return
    req._hopscope = None
    trace_id, span_id, token = state
    try:
        server_parent.reset(token)
    except ValueError:  # set in another context: at least do not leak it to the next request
        server_parent.set(None)
    status = getattr(resp, "status_code", None)
    default_sink().emit(("e", _now(), trace_id, span_id, {"http.response.status_code": status}))
