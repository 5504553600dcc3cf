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

import os
import random
import sys
from binascii import b2a_base64 as _b2a_base64
from typing import Any

from .httpattrs import request_attrs
from .proxyrecord import expand_proxy

__all__ = [
    "BODY_LIMIT",
    "HOPS",
    "Record",
    "event_count",
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
#: Random bits from the generator the ids come from (reseeded in forked children), for
#: callers that draw ids inline (``hopscope proxy``): a call less than new_span_id().
random_bits = _getrandbits


def new_trace_id() -> int:
    """A random non-zero 128-bit id (W3C traceparent forbids all zeros)."""
    return _getrandbits(128) or 1


def new_span_id() -> int:
    """A random non-zero 64-bit id."""
    return _getrandbits(64) or 1


#: The process the generator was seeded in (see hopscope.tracing.forking).
_seed_pid = os.getpid()


def _reseed_after_fork() -> None:
    # Forked workers would otherwise draw the same ids as their siblings.
    global _seed_pid
    _rand.seed()
    _seed_pid = os.getpid()


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
    if isinstance(value, str):
        return str.__str__(value)  # a subclass's own __str__ is the app's code
    try:
        return str(value)
    except Exception:
        return unshowable(value)


def unshowable(value: Any) -> str:
    """What stands for a value whose ``repr`` (or ``str``) raises or recurses without
    end: the app's object, not hopscope's to fix, and one attribute of one request is
    all it may cost (the rest of its request and its batch are kept)."""
    return f"<unrepresentable {type(value).__qualname__}>"


def safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # a raising __repr__, or a structure too deep for it
        return unshowable(value)


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
    if type(value) is bytes:
        data = value
    elif isinstance(value, list | tuple):
        try:
            data = b"".join(value)
        except TypeError:
            data = b"".join(bytes(chunk) for chunk in value)
    else:
        data = bytes(value)
    if len(data) > limit:
        data = data[:limit]
    # base64.b64encode without its argument checks: same text.
    return _b2a_base64(data, newline=False).decode("ascii")


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
        return {k if type(k) is str else _text(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return safe_repr(value)


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
    try:
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
    except Exception:
        # One value that cannot be made plain (a self-referencing list, one nested too
        # deep, odd header pairs): the others are kept, and it becomes a placeholder.
        return _normalise_each(attrs, body_limit)
    return out


def _normalise_each(attrs: dict[str, Any], body_limit: int) -> dict[str, Any]:
    """:func:`normalise_attrs`, one attribute at a time (only after one failed): a value
    that fails becomes its ``repr`` or a placeholder, or, for headers and bodies (whose
    readers expect their shapes), is left out."""
    out: dict[str, Any] = {}
    for key, value in list(attrs.items()):
        if value is None:
            continue
        if type(key) is not str:
            key = _text(key)
        kind = _key_kind(key)
        try:
            if kind == _PLAIN_KEY:
                out[key] = _plain(value)
            elif kind == _HEADERS_KEY:
                out[key] = _headers(value)
            else:
                out[key] = _body(value, body_limit)
        except Exception:
            if kind == _PLAIN_KEY:
                out[key] = safe_repr(value)  # a cycle's repr says "[...]"; too deep: a placeholder
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
    if type(name) is not str and name is not None:
        # A user span's name is the app's value (``span(obj)``): text, as readers
        # expect (one that is a list cost its request its line in ``hopscope tail``).
        name = _text(name)
    return _started(
        ts, trace_id, span_id, parent_id, hop, name, tid, normalise_attrs(attrs), process
    )


def _started(
    ts: int,
    trace_id: int,
    span_id: int,
    parent_id: int,
    hop: str,
    name: str,
    tid: int,
    merged: dict[str, Any],
    process: dict[str, Any] | None,
) -> Event:
    """A span start from attributes already normalised (``merged`` gains the process's)."""
    if process:
        if merged.keys().isdisjoint(process):
            merged.update(process)  # what setdefault per key does when none is there
        else:
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
    "response_ts",
)  # fmt: skip
#: ``response_ts`` (when true) is the time of a response start that is not among the
#: items: the middleware keeps it out when nothing came before it (most responses), and
#: its ``response.start`` event, made of ``status`` and ``response_headers``, is then the
#: span's first.  An ``end`` of 11 fields (no ``response_ts``) is read too.
#: ``request`` is ``(fields, headers)``: these environ values, and the environ's
#: ``(key, value)`` pairs that may be headers (``HTTP_*``, ``CONTENT_*``), in order; or
#: ``(fields, keys, values)``, those pairs as two tuples (what the middleware makes: no
#: pair to build, and the tuple of keys is shared by like requests).
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
    method, path = request[0], request[3]
    attrs = request_attrs({"interface": "asgi"}, request)
    return f"{method} {'' if path is None else path}", attrs


def _asgi_end(end: Any) -> tuple[int, dict[str, Any]]:
    (ts, status, headers, route, req_size, req_body, req_cut, resp_size, resp_body, resp_cut,
     extra) = end[:11] if len(end) == 12 else end  # fmt: skip
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


def _wsgi_request(request: Any) -> tuple[Any, Any]:
    """``(fields, header pairs)`` of either layout of :data:`WSGI_REQUEST`."""
    if len(request) == 3:
        fields, keys, values = request
        return fields, zip(keys, values, strict=True)
    fields, pairs = request
    return fields, pairs


def _wsgi_start(request: Any) -> tuple[str, dict[str, Any]]:
    fields, pairs = _wsgi_request(request)
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


# -- the collector's quick path -------------------------------------------------------------
# ``_request_events`` is what the collector runs for every request, and on a small machine
# it shares the cores with the app it watches.  The functions below make the normalised
# attributes of the common case (the types servers really give) in one step, instead of
# building raw attributes and normalising them key by key; each returns None for anything
# else, and the general path (the ``_asgi_*``/``_wsgi_*`` makers and normalise_attrs)
# then does what it always did.  tests/test_records.py checks that both agree.

#: Scalar types a value of the quick path may have (None is left to the general path,
#: or checked where it is common, because normalise_attrs leaves None values out).
_SCALARS = frozenset({str, int, float, bool})


def _plain_pairs(pairs: Any) -> Any:
    """``_plain(pairs)`` for a list of ``(name, value)`` pairs of bytes or str."""
    out: list[list[str]] = []
    append = out.append
    for item in pairs:
        kind = type(item)
        if (kind is tuple or kind is list) and len(item) == 2:
            name, value = item
            kind_name, kind_value = type(name), type(value)
            if kind_name is bytes:
                name = name.decode("latin-1")
            elif kind_name is not str:
                return _plain(pairs)
            if kind_value is bytes:
                value = value.decode("latin-1")
            elif kind_value is not str:
                return _plain(pairs)
            append([name, value])
        else:
            return _plain(pairs)
    return out


def _asgi_quick_start(request: Any) -> tuple[str, dict[str, Any]] | None:
    if len(request) != len(ASGI_REQUEST):
        return None
    method, scheme, version, path, query, client, server, headers, _ = request
    if type(query) is bytes:
        query = query.decode("latin-1")
    kind = type(client)
    if (kind is not tuple and kind is not list) or len(client) != 2:
        return None
    kind = type(server)
    if (kind is not tuple and kind is not list) or len(server) != 2:
        return None
    client_host, client_port = client
    server_host, server_port = server
    plain = (method, scheme, version, query, client_host, client_port, server_host, server_port)
    if type(path) is not str or not _SCALARS.issuperset(map(type, plain)):
        return None
    if type(headers) is not list and type(headers) is not tuple:
        return None
    attrs = {
        "interface": "asgi",
        "http.request.method": method,
        "url.scheme": scheme,
        "network.protocol.version": version,
        "url.path": path,
        "url.query": query,
        "client.address": client_host,
        "client.port": client_port,
        "server.address": server_host,
        "server.port": server_port,
        "http.request.headers": _headers(headers),
    }
    return f"{method} {path}", attrs


def _asgi_quick_end(end: Any) -> tuple[int, dict[str, Any]] | None:
    if len(end) != 12 and len(end) != 11:
        return None
    (ts, status, headers, route, req_size, req_body, req_cut, resp_size, resp_body, resp_cut,
     extra) = end[:11]  # fmt: skip
    if extra or type(route) not in _AS_IS or type(status) not in _AS_IS:
        return None
    if not _SCALARS.issuperset(map(type, (req_size, resp_size))):
        return None
    attrs: dict[str, Any] = {}
    if status:
        attrs["http.response.status_code"] = status
    if headers is not None:
        attrs["http.response.headers"] = _headers(headers)
    if route is not None:
        attrs["http.route"] = route
    attrs["http.request.body.size"] = req_size
    if req_size:
        if req_body:
            attrs["http.request.body"] = _body(req_body, BODY_CAP)
        if type(req_cut) not in _SCALARS:
            return None
        attrs["http.request.body.truncated"] = req_cut
    attrs["http.response.body.size"] = resp_size
    if resp_size:
        if resp_body:
            attrs["http.response.body"] = _body(resp_body, BODY_CAP)
        if type(resp_cut) not in _SCALARS:
            return None
        attrs["http.response.body.truncated"] = resp_cut
    return ts, attrs


#: environ key -> header name (bounded: header names come from clients).
_WSGI_NAMES: dict[str, str] = {}


def _wsgi_quick_headers(pairs: Any) -> list[list[str]] | None:
    """``_headers(_wsgi_headers(pairs))`` for str keys and values."""
    out = []
    names = _WSGI_NAMES
    for key, value in pairs:
        if type(key) is not str or type(value) is not str:
            return None
        name = names.get(key)
        if name is None:
            if key[:5] == "HTTP_":
                name = key[5:].replace("_", "-").lower()
                if len(names) < 4096:
                    names[key] = name
            elif value and key in _CONTENT_HEADERS:
                name = _CONTENT_HEADERS[key]
            else:
                continue
        out.append([name, value])
    return out


def _wsgi_quick_start(request: Any) -> tuple[str, dict[str, Any]] | None:
    if len(request) != 2 and len(request) != 3:
        return None
    fields, pairs = _wsgi_request(request)
    if len(fields) != len(WSGI_REQUEST):
        return None
    (method, script, path_info, query, protocol, scheme, client, client_port, server,
     server_port, software) = fields  # fmt: skip
    if not _SCALARS.issuperset(map(type, fields[:10])) or type(software) not in _AS_IS:
        return None
    if type(script) is not str or type(path_info) is not str or type(protocol) is not str:
        return None
    headers = _wsgi_quick_headers(pairs)
    if headers is None:
        return None
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
    }
    number = port(client_port)
    if number is not None:
        attrs["client.port"] = number
    attrs["server.address"] = server
    number = port(server_port)
    if number is not None:
        attrs["server.port"] = number
    attrs["http.request.headers"] = headers
    if software is not None:
        attrs["server.software"] = software
    return f"{method} {path}", attrs


def _wsgi_quick_end(end: Any) -> tuple[int, dict[str, Any]] | None:
    if len(end) != len(WSGI_END):
        return None
    (ts, status, headers, route, req_size, req_body, req_cut, resp_size, resp_body, resp_cut,
     file_wrapper, disconnected, error) = end  # fmt: skip
    if not _AS_IS.issuperset(map(type, (status, route, error))):
        return None
    if not _SCALARS.issuperset(map(type, (req_size, req_cut, resp_size, resp_cut))):
        return None
    attrs: dict[str, Any] = {}
    if status is not None:
        attrs["http.response.status_code"] = status
    if headers is not None:
        attrs["http.response.headers"] = _headers(headers)
    if route is not None:
        attrs["http.route"] = route
    attrs["http.request.body.size"] = req_size
    if req_body is not None:
        attrs["http.request.body"] = _body(req_body, BODY_CAP)
    attrs["http.request.body.truncated"] = req_cut
    if file_wrapper:
        attrs["wsgi.file_wrapper"] = True
    else:
        attrs["http.response.body.size"] = resp_size
        if resp_body is not None:
            attrs["http.response.body"] = _body(resp_body, BODY_CAP)
        attrs["http.response.body.truncated"] = resp_cut
    if disconnected:
        attrs["disconnected"] = True
    if error is not None:
        attrs["error"] = True
        attrs["exception.type"] = error
    return ts, attrs


_INTERFACES = {"asgi": (_asgi_start, _asgi_end), "wsgi": (_wsgi_start, _wsgi_end)}
_QUICK = {
    "asgi": (_asgi_quick_start, _asgi_quick_end),
    "wsgi": (_wsgi_quick_start, _wsgi_quick_end),
}


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
    if interface == "proxy":
        return expand_proxy(record)
    out = [request_start(interface, ts, trace_id, span_id, parent_id, tid, request)]
    size = len(items)
    if 0 <= end_at <= size:
        first = _first_item(interface, end)
        if first is not None:
            item_records(first, 0, 1, trace_id, span_id, out)
        stop = item_records(items, 0, end_at, trace_id, span_id, out)
        out.append(request_end(interface, trace_id, span_id, end))
        if stop == end_at:
            item_records(items, end_at, size, trace_id, span_id, out)
    else:
        item_records(items, 0, size, trace_id, span_id, out)
    return out


def _first_item(interface: str, end: Any) -> list[Any] | None:
    """The response start an ASGI ``end`` holds (see :data:`ASGI_END`), as an item."""
    if interface == "asgi" and type(end) is tuple and len(end) > 11 and end[11]:
        return [(RESPONSE_START, end[11], end[1], end[2])]
    return None


def _request_events(record: Record, process: dict[str, Any] | None) -> list[Event]:
    """``to_events`` of each record :func:`expand` makes, without making them: this is
    the collector's busiest path (hex ids once, no intermediate tuples)."""
    _, ts, trace_id, span_id, parent_id, tid, interface, request, end_at, end, items = record
    if interface == "proxy":
        return [event for each in expand_proxy(record) for event in to_events(each, process)]
    make_start, make_end = _INTERFACES[interface]
    quick_start, quick_end = _QUICK[interface]
    try:
        started = quick_start(request)
    except Exception:  # odd values: the general path keeps what it can of them
        started = None
    if started is None:
        name, attrs = make_start(request)
        attrs = normalise_attrs(attrs)
    else:
        name, attrs = started
    first = _started(ts, trace_id, span_id, parent_id, "app", name, tid, attrs, process)
    events = [first]
    ids = (first["trace_id"], first["span_id"])
    size = len(items)
    if 0 <= end_at <= size:
        lead = _first_item(interface, end)
        if lead is not None:
            _item_events(lead, 0, 1, ids, process, events)
        stop = _item_events(items, 0, end_at, ids, process, events)
        try:
            ended = quick_end(end)
        except Exception:
            ended = None
        if ended is None:
            end_ts, end_attrs = make_end(end)
            end_attrs = normalise_attrs(end_attrs)
        else:
            end_ts, end_attrs = ended
        events.append(
            {
                "kind": "span_end",
                "ts": end_ts,
                "trace_id": ids[0],
                "span_id": ids[1],
                "attrs": end_attrs,
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
        attrs: dict[str, Any]
        if code == RESPONSE_START:
            name = "response.start"
            status, headers = item[2], item[3]
            if type(status) is int and (type(headers) is list or type(headers) is tuple):
                attrs = {"status": status, "headers": _plain_pairs(headers)}
            else:
                attrs = normalise_attrs({"status": status, "headers": headers})
        elif code == REQUEST_BODY or code == RESPONSE_BODY:
            name = _BODY_EVENTS[code]
            size, more = item[2], item[3]
            if type(size) is int and type(more) is bool:
                attrs = {"size": size, "more": more}
            else:
                attrs = normalise_attrs({"size": size, "more": more})
        else:
            raise ValueError(f"unknown item code {code!r}")
        out.append(
            {
                "kind": "event",
                "ts": item[1],
                "trace_id": ids[0],
                "span_id": ids[1],
                "name": name,
                "attrs": attrs,
            }
        )
    return hi


def event_count(record: Record) -> int:
    """How many wire events ``to_events(record)`` makes, without making them (for a
    collector nobody reads from: its counters stay right at no cost)."""
    shape = record[0]
    if shape == "c":
        return 2
    if shape != "r":
        return 1
    if record[6] == "proxy":
        return sum(2 if each[0] == "c" else 1 for each in expand(record))
    items, end_at = record[10], record[8]
    count = 2 if 0 <= end_at <= len(items) else 1
    if count == 2 and _first_item(record[6], record[9]) is not None:
        count += 1
    for item in items:
        if item is None:
            break
        count += 2 if item[0] == "c" else 1
    return count


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
