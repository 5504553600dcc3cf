"""The HTTP exchange inside a trace, as the detail pane shows it: URL, headers, bodies.

Several hops may describe the same request (a proxy and the app both see its headers);
like the model, the outermost hop that recorded an attribute wins, because it saw the
request closest to how the client sent it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from hopscope.tracing.model import Span, Trace

__all__ = ["Body", "attr", "body", "headers", "http_span", "url"]

_HOP_ORDER = {"client": 0, "proxy": 1, "server": 2, "app": 3}


def _outer_first(span: Span) -> tuple[int, int]:
    return (_HOP_ORDER.get(span.hop, 4), span.start or 0)


def http_span(trace: Trace, key: str) -> Span | None:
    """The outermost span that recorded ``key``."""
    found = [span for span in list(trace.spans.values()) if key in span.attrs]
    return min(found, key=_outer_first) if found else None


def attr(trace: Trace, key: str) -> Any:
    span = http_span(trace, key)
    return span.attrs[key] if span is not None else None


def headers(trace: Trace, direction: str, kind: str = "headers") -> list[tuple[str, str]]:
    """``direction`` is ``request`` or ``response``; pairs in their order, repeats kept
    (``kind`` ``trailers``: the response's trailer fields)."""
    value = attr(trace, f"http.{direction}.{kind}")
    if not isinstance(value, list):
        return []
    # A file can hold anything: a pair that is not one is left out, not a crash.
    return [
        (str(pair[0]), str(pair[1]))
        for pair in value
        if isinstance(pair, list | tuple) and len(pair) == 2
    ]


def header(pairs: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((value for key, value in pairs if key.lower() == name), None)


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
    span = http_span(trace, key)
    data = b""
    decoded = False
    if span is not None:
        try:
            data = base64.b64decode(span.attrs[key] or b"")
        except (binascii.Error, TypeError, ValueError):
            data = b""
        # A HAR's text comes with its content coding undone (``tracing.har``).
        decoded = span.attrs.get(f"{key}.decoded") is True
    size = attr(trace, f"{key}.size")
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
        truncated=bool(attr(trace, f"{key}.truncated")),
        content_type=header(pairs, "content-type") or "",
        content_encoding=header(pairs, "content-encoding") or "",
        sent=sent,
        decoded=decoded,
    )


def url(trace: Trace) -> str:
    scheme = attr(trace, "url.scheme") or "http"
    host = header(headers(trace, "request"), "host")
    if not host:
        address = attr(trace, "server.address")
        port = attr(trace, "server.port")
        host = f"{address or 'localhost'}" + (f":{port}" if port else "")
    path = attr(trace, "url.path") or trace.path or "/"
    query = attr(trace, "url.query")
    return f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
