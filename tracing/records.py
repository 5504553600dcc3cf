"""Records: the tuples the hot path makes, and how they become wire events.

Why tuples: a request's hot path must cost microseconds, so middlewares only take
timestamps and keep references.  Everything that costs (hex ids, header decoding, base64,
JSON) happens later, in a sink's background thread or in the collector process, through
:func:`to_events`.  Records hold only types that :mod:`marshal` can carry, so a
:class:`~hopscope.tracing.SocketSink` ships them undecoded and the collector does the work.

Record shapes (the first item names the shape)::

    ("s", ts, trace_id, span_id, parent_id, hop, name, thread_id, attrs)   span start
    ("e", ts, trace_id, span_id, attrs)                                    span end
    ("p", ts, trace_id, span_id, name, attrs)                              point event
    ("c", start, end, trace_id, span_id, parent_id, hop, name, thread_id, attrs)
                                                            a whole span known at once
    ("r", start, trace_id, span_id, parent_id, thread_id, interface, request, end_at,
     end, items)                                  a whole request, as a middleware saw it

Ids are ints (0 means "no parent"); ``ts`` are epoch nanoseconds from ``time.time_ns``;
``attrs`` is a dict or None.  Attribute values may be raw: header lists of byte pairs,
``bytes`` or lists of ``bytes`` chunks for bodies; :func:`to_events` normalises them.

Why ``"r"``: a hello-world request used to cost a middleware three records, three attribute
dicts and a dozen small objects, and keeping them queued until the next drain made the
garbage collector walk them again and again.  An ``"r"`` record is what the request's
thread already had in hand: the raw request fields (``request``, laid out per
``interface``, see :data:`ASGI_REQUEST` and :data:`WSGI_REQUEST`), the raw end fields
(``end``, :data:`ASGI_END` / :data:`WSGI_END`) and ``items``, in the order they happened:
the span's own events as compact tuples led by an int code (:data:`REQUEST_BODY`,
:data:`RESPONSE_BODY`, :data:`RESPONSE_START`) and any record emitted inside the request
(logs, user spans, exceptions, background spans).  A ``None`` item closes the list
(later items are not part of it); the span ends before ``items[end_at]`` (-1: it did not
end).  :func:`expand` turns it back into the ``"s"``/``"p"``/``"e"`` records it stands
for, so the wire events are the same as if they had been emitted one by one.
"""

from __future__ import annotations

import base64
import os
import random
import sys
from typing import Any

__all__ = [
    "BODY_LIMIT",
    "HOPS",
    "Record",
    "expand",
    "legacy",
    "new_span_id",
    "new_trace_id",
    "server_software",
    "to_events",
]

Record = tuple[Any, ...]
Event = dict[str, Any]

HOPS = ("client", "proxy", "server", "app")

#: Default number of body bytes kept per direction (the rest is counted, not kept).
BODY_LIMIT = 64 * 1024

_HEADER_KEYS = frozenset(
    {"http.request.headers", "http.response.headers", "http.response.trailers"}
)

_rand = random.Random()
_getrandbits = _rand.getrandbits


def new_trace_id() -> int:
    """A random non-zero 128-bit id (W3C traceparent forbids all zeros)."""
    return _getrandbits(128) or 1


def new_span_id() -> int:
    """A random non-zero 64-bit id."""
    return _getrandbits(64) or 1


def _reseed_after_fork() -> None:
    # Forked workers would otherwise draw the same ids as their siblings.
    _rand.seed()


os.register_at_fork(after_in_child=_reseed_after_fork)


_HEX = {32: "%032x", 16: "%016x"}

#: Types :func:`_plain` returns unchanged: checked by exact type first, because most
#: attribute values are one of these and ``isinstance`` chains cost the collector more.
_AS_IS = frozenset({str, int, float, bool, type(None)})


def hex_id(value: int, width: int) -> str | None:
    if not value:
        return None
    pattern = _HEX.get(width)
    return pattern % value if pattern is not None else f"{value:0{width}x}"


def _text(value: Any) -> str:
    kind = type(value)
    if kind is bytes:
        return value.decode("latin-1")  # type: ignore[no-any-return]
    if kind is str:
        return value  # type: ignore[no-any-return]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1")
    return str(value)


def _headers(pairs: Any) -> list[list[str]]:
    # ASGI header pairs are bytes: decoded inline, as this runs for every request.
    return [
        [
            name.decode("latin-1") if type(name) is bytes else _text(name),
            value.decode("latin-1") if type(value) is bytes else _text(value),
        ]
        for name, value in pairs
    ]


def _body(value: Any, limit: int) -> str:
    if isinstance(value, list | tuple):
        try:
            data = b"".join(value)
        except TypeError:
            data = b"".join(bytes(chunk) for chunk in value)
    else:
        data = bytes(value)
    return base64.b64encode(data[:limit]).decode("ascii")


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind in _AS_IS:
        return value
    if kind is bytes:
        return value.decode("latin-1")
    if kind is list or kind is tuple:
        # Header pairs and the like: their bytes and plain items without a call each.
        return [
            item.decode("latin-1")
            if type(item) is bytes
            else item
            if type(item) in _AS_IS
            else _plain(item)
            for item in value
        ]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1")
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


#: Bodies are cut to their limit by whoever records them (the middleware knows its own
#: ``body_limit``); this cap only guards the encoder against a recorder that did not.
BODY_CAP = 16 * 1024 * 1024


_PLAIN_KEY, _HEADERS_KEY, _BODY_KEY = 0, 1, 2
#: How each attribute key is normalised, worked out once per key (bounded: user
#: attributes may have any names).  This runs for every attribute of every event.
_KEY_KINDS: dict[str, int] = {}


def _key_kind(key: str) -> int:
    kind = _HEADERS_KEY if key in _HEADER_KEYS else _BODY_KEY if key.endswith(".body") else 0
    if len(_KEY_KINDS) < 4096:
        _KEY_KINDS[key] = kind
    return kind


def normalise_attrs(attrs: dict[str, Any] | None, body_limit: int = BODY_CAP) -> dict[str, Any]:
    """JSON-ready attributes: header pairs as text, bodies as base64, bytes as latin-1."""
    if not attrs:
        return {}
    out: dict[str, Any] = {}
    kinds = _KEY_KINDS
    for key, value in attrs.items():
        if value is None:
            continue
        kind = kinds.get(key)
        if kind is None:
            kind = _key_kind(key)
        if kind == _PLAIN_KEY:
            out[key] = value if type(value) in _AS_IS else _plain(value)
        elif kind == _HEADERS_KEY:
            out[key] = _headers(value)
        else:
            out[key] = _body(value, body_limit)
    return out


def to_events(record: Record, process: dict[str, Any] | None = None) -> list[Event]:
    """Turn one record into wire events (see docs/trace-format.md).

    ``process`` holds what is true of the whole emitting process (pid, server software);
    it is merged into span starts so every span says where it ran.
    """
    shape = record[0]
    if shape == "s":
        _, ts, trace_id, span_id, parent_id, hop, name, tid, attrs = record
        return [_start(ts, trace_id, span_id, parent_id, hop, name, tid, attrs, process)]
    if shape == "e":
        _, ts, trace_id, span_id, attrs = record
        return [_end(ts, trace_id, span_id, attrs)]
    if shape == "p":
        _, ts, trace_id, span_id, name, attrs = record
        return [
            {
                "kind": "event",
                "ts": ts,
                "trace_id": hex_id(trace_id, 32),
                "span_id": hex_id(span_id, 16),
                "name": name,
                "attrs": normalise_attrs(attrs),
            }
        ]
    if shape == "c":
        _, start, end, trace_id, span_id, parent_id, hop, name, tid, attrs = record
        return [
            _start(start, trace_id, span_id, parent_id, hop, name, tid, None, process),
            _end(end, trace_id, span_id, attrs),
        ]
    if shape == "r":
        return _request_events(record, process)
    raise ValueError(f"unknown record shape {shape!r}")


def _start(
    ts: int,
    trace_id: int,
    span_id: int,
    parent_id: int,
    hop: str,
    name: str,
    tid: int,
    attrs: dict[str, Any] | None,
    process: dict[str, Any] | None,
) -> Event:
    merged = normalise_attrs(attrs)
    if process:
        for key, value in process.items():
            merged.setdefault(key, value)
    merged.setdefault("thread.id", tid)
    return {
        "kind": "span_start",
        "ts": ts,
        "trace_id": hex_id(trace_id, 32),
        "span_id": hex_id(span_id, 16),
        "parent_id": hex_id(parent_id, 16),
        "hop": hop,
        "name": name,
        "attrs": merged,
    }


def _end(ts: int, trace_id: int, span_id: int, attrs: dict[str, Any] | None) -> Event:
    return {
        "kind": "span_end",
        "ts": ts,
        "trace_id": hex_id(trace_id, 32),
        "span_id": hex_id(span_id, 16),
        "attrs": normalise_attrs(attrs),
    }


# -- whole requests ("r" records) ----------------------------------------------------------

#: Codes of the compact event tuples in an ``"r"`` record's items:
#: ``(REQUEST_BODY | RESPONSE_BODY, ts, size, more)`` and
#: ``(RESPONSE_START, ts, status, headers)``.
REQUEST_BODY, RESPONSE_BODY, RESPONSE_START = 0, 1, 2
_BODY_EVENTS = ("request.body", "response.body")

#: Field order of an ``"r"`` record's ``request`` and ``end`` tuples, per interface
#: (documentation; the expanders below unpack them in this order).
ASGI_REQUEST = (
    "method", "scheme", "http_version", "path", "query_string", "client", "server", "headers",
    "root_path",
)  # fmt: skip
ASGI_END = (
    "ts", "status", "response_headers", "route", "request_size", "request_body",
    "request_truncated", "response_size", "response_body", "response_truncated", "extra",
)  # fmt: skip
#: ``request`` is ``(fields, headers)``: these environ values, and the environ's
#: ``(key, value)`` pairs that may be headers (``HTTP_*``, ``CONTENT_*``), in order.
WSGI_REQUEST = (
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
    "wsgi.url_scheme", "REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME", "SERVER_PORT",
    "SERVER_SOFTWARE",
)  # fmt: skip
WSGI_END = (
    "ts", "status", "response_headers", "route", "request_size", "request_body",
    "request_truncated", "response_size", "response_body", "response_truncated",
    "file_wrapper", "disconnected", "exception_type",
)  # fmt: skip


def _asgi_start(request: Any) -> tuple[str, dict[str, Any]]:
    method, scheme, version, path, query, client, server, headers = request[:8]
    client = client or (None, None)
    server = server or (None, None)
    attrs = {
        "interface": "asgi",
        "http.request.method": method,
        "url.scheme": scheme,
        "network.protocol.version": version,
        "url.path": path,
        "url.query": query,
        "client.address": client[0],
        "client.port": client[1],
        "server.address": server[0],
        "server.port": server[1],
        "http.request.headers": headers,
    }
    return f"{method} {'' if path is None else path}", attrs


def _asgi_end(end: Any) -> tuple[int, dict[str, Any]]:
    (ts, status, headers, route, req_size, req_body, req_cut, resp_size, resp_body, resp_cut,
     extra) = end  # fmt: skip
    attrs: dict[str, Any] = {"http.response.status_code": status or None}
    if headers is not None:
        attrs["http.response.headers"] = headers
    if route is not None:
        attrs["http.route"] = route
    attrs["http.request.body.size"] = req_size
    if req_size:
        if req_body:
            attrs["http.request.body"] = req_body
        attrs["http.request.body.truncated"] = req_cut
    attrs["http.response.body.size"] = resp_size
    if resp_size:
        if resp_body:
            attrs["http.response.body"] = resp_body
        attrs["http.response.body.truncated"] = resp_cut
    if extra:
        attrs.update(extra)
    return ts, attrs


_PROTOCOLS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0", "HTTP/2": "2", "HTTP/2.0": "2"}
_CONTENT_HEADERS = {"CONTENT_TYPE": "content-type", "CONTENT_LENGTH": "content-length"}


def port(value: Any) -> int | None:
    """A port (or length) from a WSGI string, None when it is not a number."""
    if type(value) is int:
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def wsgi_text(wsgi_string: str) -> str:
    """PEP 3333 "native strings" carry bytes as latin-1, and URLs are really UTF-8.

    Some callers (httpx's WSGITransport) pass decoded text instead: what is not
    latin-1-encoded UTF-8 is kept as it is.
    """
    try:
        return wsgi_string.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return wsgi_string


def _wsgi_headers(pairs: Any) -> list[tuple[str, str]]:
    headers = []
    for key, value in pairs:
        if key[:5] == "HTTP_":
            headers.append((key[5:].replace("_", "-").lower(), value))
        elif value and key in _CONTENT_HEADERS:
            # Servers such as Werkzeug's always set these, empty when the client sent none.
            headers.append((_CONTENT_HEADERS[key], value))
    return headers


def _wsgi_start(request: Any) -> tuple[str, dict[str, Any]]:
    fields, pairs = request
    (method, script, path_info, query, protocol, scheme, client, client_port, server,
     server_port, software) = fields  # fmt: skip
    path = script + path_info
    if not path.isascii():
        path = wsgi_text(path)
    attrs = {
        "interface": "wsgi",
        "http.request.method": method,
        "url.scheme": scheme,
        "network.protocol.version": _PROTOCOLS.get(protocol) or protocol.removeprefix("HTTP/"),
        "url.path": path,
        "url.query": query,
        "client.address": client,
        "client.port": port(client_port),
        "server.address": server,
        "server.port": port(server_port),
        "http.request.headers": _wsgi_headers(pairs),
        "server.software": software,
    }
    return f"{method} {path}", attrs


def _wsgi_end(end: Any) -> tuple[int, dict[str, Any]]:
    (ts, status, headers, route, req_size, req_body, req_cut, resp_size, resp_body, resp_cut,
     file_wrapper, disconnected, error) = end  # fmt: skip
    attrs: dict[str, Any] = {
        "http.response.status_code": status,
        "http.response.headers": headers,
    }
    if route is not None:
        attrs["http.route"] = route
    attrs["http.request.body.size"] = req_size
    if req_body is not None:
        attrs["http.request.body"] = req_body
    attrs["http.request.body.truncated"] = req_cut
    if file_wrapper:
        attrs["wsgi.file_wrapper"] = True
    else:
        attrs["http.response.body.size"] = resp_size
        if resp_body is not None:
            attrs["http.response.body"] = resp_body
        attrs["http.response.body.truncated"] = resp_cut
    if disconnected:
        attrs["disconnected"] = True
    if error is not None:
        attrs["error"] = True
        attrs["exception.type"] = error
    return ts, attrs


_INTERFACES = {"asgi": (_asgi_start, _asgi_end), "wsgi": (_wsgi_start, _wsgi_end)}


def request_start(
    interface: str, ts: int, trace_id: int, span_id: int, parent_id: int, tid: int, request: Any
) -> Record:
    """The ``"s"`` record of a request's app span, from its raw ``request`` fields."""
    name, attrs = _INTERFACES[interface][0](request)
    return ("s", ts, trace_id, span_id, parent_id, "app", name, tid, attrs)


def request_end(interface: str, trace_id: int, span_id: int, end: Any) -> Record:
    """The ``"e"`` record of a request's app span, from its raw ``end`` fields."""
    ts, attrs = _INTERFACES[interface][1](end)
    return ("e", ts, trace_id, span_id, attrs)


def item_records(
    items: Any, lo: int, hi: int, trace_id: int, span_id: int, out: list[Record]
) -> int:
    """Append the records ``items[lo:hi]`` stand for to ``out``; returns where it stopped
    (the index of the ``None`` that closes the items, else ``hi``)."""
    for index in range(lo, hi):
        item = items[index]
        if item is None:
            return index
        code = item[0]
        if type(code) is str:
            if code == "r":
                raise ValueError("an 'r' record cannot nest")
            out.append(item if type(item) is tuple else tuple(item))
        elif code == RESPONSE_START:
            attrs = {"status": item[2], "headers": item[3]}
            out.append(("p", item[1], trace_id, span_id, "response.start", attrs))
        elif code == REQUEST_BODY or code == RESPONSE_BODY:
            attrs = {"size": item[2], "more": item[3]}
            out.append(("p", item[1], trace_id, span_id, _BODY_EVENTS[code], attrs))
        else:
            raise ValueError(f"unknown item code {code!r}")
    return hi


def expand(record: Record) -> list[Record]:
    """The ``"s"``, ``"p"`` and ``"e"`` records (and any others it holds) an ``"r"``
    record stands for, in the order they were made."""
    _, ts, trace_id, span_id, parent_id, tid, interface, request, end_at, end, items = record
    out = [request_start(interface, ts, trace_id, span_id, parent_id, tid, request)]
    size = len(items)
    if 0 <= end_at <= size:
        stop = item_records(items, 0, end_at, trace_id, span_id, out)
        out.append(request_end(interface, trace_id, span_id, end))
        if stop == end_at:
            item_records(items, end_at, size, trace_id, span_id, out)
    else:
        item_records(items, 0, size, trace_id, span_id, out)
    return out


def _request_events(record: Record, process: dict[str, Any] | None) -> list[Event]:
    """``to_events`` of each record :func:`expand` makes, without making them: this is
    the collector's busiest path (hex ids once, no intermediate tuples)."""
    _, ts, trace_id, span_id, parent_id, tid, interface, request, end_at, end, items = record
    make_start, make_end = _INTERFACES[interface]
    name, attrs = make_start(request)
    events = [_start(ts, trace_id, span_id, parent_id, "app", name, tid, attrs, process)]
    ids = (events[0]["trace_id"], events[0]["span_id"])
    size = len(items)
    if 0 <= end_at <= size:
        stop = _item_events(items, 0, end_at, ids, process, events)
        end_ts, end_attrs = make_end(end)
        events.append(
            {
                "kind": "span_end",
                "ts": end_ts,
                "trace_id": ids[0],
                "span_id": ids[1],
                "attrs": normalise_attrs(end_attrs),
            }
        )
        if stop == end_at:
            _item_events(items, end_at, size, ids, process, events)
    else:
        _item_events(items, 0, size, ids, process, events)
    return events


def _item_events(
    items: Any,
    lo: int,
    hi: int,
    ids: tuple[str | None, str | None],
    process: dict[str, Any] | None,
    out: list[Event],
) -> int:
    """:func:`item_records` and ``to_events`` in one step."""
    for index in range(lo, hi):
        item = items[index]
        if item is None:
            return index
        code = item[0]
        if type(code) is str:
            if code == "r":
                raise ValueError("an 'r' record cannot nest")
            out.extend(to_events(item if type(item) is tuple else tuple(item), process))
            continue
        if code == RESPONSE_START:
            name = "response.start"
            attrs: dict[str, Any] = {"status": item[2], "headers": item[3]}
        elif code == REQUEST_BODY or code == RESPONSE_BODY:
            name = _BODY_EVENTS[code]
            attrs = {"size": item[2], "more": item[3]}
        else:
            raise ValueError(f"unknown item code {code!r}")
        out.append(
            {
                "kind": "event",
                "ts": item[1],
                "trace_id": ids[0],
                "span_id": ids[1],
                "name": name,
                "attrs": normalise_attrs(attrs),
            }
        )
    return hi


def legacy(records: Any) -> list[Record]:
    """``records`` with every ``"r"`` record expanded (for readers of raw records)."""
    out: list[Record] = []
    for record in records:
        if record[0] == "r":
            out.extend(expand(record))
        else:
            out.append(record)
    return out


_SERVERS = ("uvicorn", "gunicorn", "hypercorn", "granian", "daphne", "waitress")


def server_software() -> str | None:
    """Which known server runs this process, as ``name/version`` (None when unknown)."""
    for name in _SERVERS:
        module = sys.modules.get(name)
        if module is not None:
            version = getattr(module, "__version__", None)
            return f"{name}/{version}" if version else name
    return None


def process_info(pid: int) -> dict[str, Any]:
    info: dict[str, Any] = {"process.pid": pid}
    software = server_software()
    if software:
        info["server.software"] = software
    return info
