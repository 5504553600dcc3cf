"""The HTTP exchange inside a trace, as the detail pane shows it: URL, headers, bodies.

Several hops may describe the same request (a proxy and the app both see its headers):
the outermost hop that recorded an attribute wins (:meth:`Trace.outermost`), because it
saw the request closest to how the client sent it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from hopscope.tracing.model import Trace, header_pairs, header_value

__all__ = ["Body", "body", "headers", "url"]


def headers(trace: Trace, direction: str, kind: str = "headers") -> list[tuple[str, str]]:
    """``direction`` is ``request`` or ``response``; pairs in their order, repeats kept
    (``kind`` ``trailers``: the response's trailer fields)."""
    return header_pairs(trace.attr(f"http.{direction}.{kind}"))


@dataclass(slots=True)
class Body:
    data: bytes
    """The captured first bytes (all of them unless ``truncated``)."""
    size: int | None
    """Total bytes that went over the wire, when known."""
    truncated: bool
    content_type: str
    content_encoding: str
    sent: int | None = None
    """A request body the app did not read: the bytes its ``Content-Length`` says were
    sent (-1: sent chunked, size unknown).  None: read, or nothing says otherwise."""
    decoded: bool = False
    """``data`` is the body with ``content_encoding`` already undone (a HAR's text)."""


def body(trace: Trace, direction: str) -> Body:
    key = f"http.{direction}.body"
    span = trace.outermost(key)
    data = b""
    decoded = False
    if span is not None:
        try:
            data = base64.b64decode(span.attrs[key] or b"")
        except (binascii.Error, TypeError, ValueError):
            data = b""
        # A HAR's text comes with its content coding undone (``tracing.har``).
        decoded = span.attrs.get(f"{key}.decoded") is True
    size = trace.attr(f"{key}.size")
    pairs = headers(trace, direction)
    sent = None
    if direction == "request" and not data and not size:
        # The middlewares record what the app read: say when that was not the body sent.
        from hopscope.tracing.har import unread  # (a rare path: imported only here)
        from hopscope.tracing.replay import declared_length

        declared = declared_length(pairs)
        if declared:
            sent = declared
        elif unread(pairs, data, size if isinstance(size, int) else None):
            sent = -1
    return Body(
        data=data,
        size=size if isinstance(size, int) else None,
        truncated=bool(trace.attr(f"{key}.truncated")),
        content_type=header_value(pairs, "content-type") or "",
        content_encoding=header_value(pairs, "content-encoding") or "",
        sent=sent,
        decoded=decoded,
    )


def url(trace: Trace) -> str:
    scheme = trace.attr("url.scheme") or "http"
    host = header_value(headers(trace, "request"), "host")
    if not host:
        address = trace.attr("server.address")
        port = trace.attr("server.port")
        host = f"{address or 'localhost'}" + (f":{port}" if port else "")
    path = trace.attr("url.path") or trace.path or "/"
    query = trace.attr("url.query")
    return f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
