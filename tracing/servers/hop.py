"""Opening a ``server`` span: what every server hook shares.

A server hook sees the request head before the app does.  It continues the caller's
trace (``traceparent``), records the wait since a web server in front first saw the
request (``X-Request-Start``) as a ``queue`` span, and opens the server span the app span
will hang under.  Header names arrive lower-case from uvicorn and upper-case from
gunicorn, hence the case-insensitive match.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

from ..queuetime import parse_request_start
from ..records import new_span_id, new_trace_id
from ..sinks import Sink
from ..traceparent import parse_traceparent

__all__ = ["ServerSpan", "open_server_span"]


class ServerSpan(NamedTuple):
    trace_id: int
    span_id: int
    queue_ns: int | None


def _lower(name: bytes | str) -> bytes:
    return (name.encode("latin-1") if isinstance(name, str) else name).lower()


def open_server_span(
    sink: Sink,
    headers: Iterable[tuple[Any, Any]],
    name: str,
    begin: int,
    now: int,
    attrs: dict[str, Any],
) -> ServerSpan:
    """Emit the queue span (if any) and the server span's start; ``begin`` is when the
    server picked the request up, ``now`` when the head was parsed."""
    parsed = None
    request_start = None
    for key, value in headers:
        lowered = _lower(key)
        if lowered == b"traceparent":
            parsed = parse_traceparent(value)
        elif lowered == b"x-request-start":
            request_start = parse_request_start(value, now)
    trace_id, parent_id = parsed if parsed is not None else (new_trace_id(), 0)
    span_id = new_span_id()
    ident = threading.get_ident()
    queue_ns = None
    if request_start is not None and request_start < begin:
        queue_ns = begin - request_start
        sink.emit(
            (
                "c",
                request_start,
                begin,
                trace_id,
                new_span_id(),
                parent_id,
                "server",
                "queue",
                ident,
                {"span.kind": "queue"},
            )
        )
    sink.emit(("s", begin, trace_id, span_id, parent_id, "server", name, ident, attrs))
    return ServerSpan(trace_id, span_id, queue_ns)
