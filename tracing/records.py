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

Ids are ints (0 means "no parent"); ``ts`` are epoch nanoseconds from ``time.time_ns``;
``attrs`` is a dict or None.  Attribute values may be raw: header lists of byte pairs,
``bytes`` or lists of ``bytes`` chunks for bodies; :func:`to_events` normalises them.
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
        return [_plain(item) for item in value]
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


def normalise_attrs(attrs: dict[str, Any] | None, body_limit: int = BODY_CAP) -> dict[str, Any]:
    """JSON-ready attributes: header pairs as text, bodies as base64, bytes as latin-1."""
    if not attrs:
        return {}
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if key in _HEADER_KEYS:
            out[key] = _headers(value)
        elif key.endswith(".body"):
            out[key] = _body(value, body_limit)
        else:
            out[key] = value if type(value) in _AS_IS else _plain(value)
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
