"""The ``"r"`` record of a request through ``hopscope proxy``: two spans in one record.

Why its own layout: the proxy records a ``client`` span (the request as the client sent
it, the response as the client got it) and under it a ``proxy`` span (the upstream
exchange).  Made one tuple and one attribute dict at a time, those were eight records
per request, and the proxy's event loop paid for every one of them.  Like the
middlewares' ``"r"`` records (see :mod:`~hopscope.tracing.records`), the proxy now keeps
the raw fields and compact event tuples it already had in hand, and :func:`expand_proxy`
(in the proxy's drain thread for a request still running, else in the collector) turns
them into the same ``"s"``/``"p"``/``"e"`` records as before.

Layout (``interface`` is ``"proxy"``): ``("r", begin, trace_id, client_id, parent_id,
thread_id, "proxy", request, end_at, end, items)`` where ``request`` is
:data:`PROXY_REQUEST`, ``end`` is :data:`PROXY_END` (None until the request ended) and
``items`` are the compact tuples below or whole records (exceptions, disconnects),
closed by ``None``; ``end_at`` is ``len(items)`` once ended, else -1.
"""

from __future__ import annotations

from typing import Any

from .httpattrs import request_attrs

__all__ = [
    "CONNECT",
    "PROXY_END",
    "PROXY_REQUEST",
    "PROXY_START",
    "REQUEST_BODY",
    "RESPONSE_BODY",
    "RESPONSE_START",
    "RETRY",
    "SENT",
    "client_start",
    "end_records",
    "expand_proxy",
    "head_record",
    "header_fields",
    "item_record",
]

Record = tuple[Any, ...]

#: ``request`` fields: the ASGI scope's (as in ``records.ASGI_REQUEST``), then the proxy's.
#: ``headers`` is a list of pairs, or bytes: the fields as ``name: value`` lines joined by
#: CRLF (what the proxy's own listener records: one object instead of three per field).
PROXY_REQUEST = (
    "method", "scheme", "http_version", "path", "query_string", "client", "server", "headers",
    "head_ts", "accepted_ts", "request_number", "proxy_id",
)  # fmt: skip
#: ``end`` fields.  ``proxy_ended``: the request went upstream (a refused one did not);
#: ``upstream_conn``: the upstream connection's id, None when none was reached;
#: ``response_headers``: a list of pairs, or bytes (``name: value`` lines joined by
#: CRLF, as a response written whole went to the client).
PROXY_END = (
    "ts", "status", "response_headers", "proxy_ended", "upstream_status", "upstream_conn",
    "request_size", "request_body", "request_truncated", "request_summary",
    "response_size", "response_body", "response_truncated", "response_summary",
    "client_extra", "proxy_extra",
)  # fmt: skip

#: Item codes (first field of a compact item; the second is always its timestamp).
#: ``(PROXY_START, ts, target, headers, kept, added_end, removed, up_host, up_port, origin)``:
#: ``headers[kept:added_end]`` are the fields the proxy added; or ``headers`` is bytes,
#: those fields as they went upstream (``name: value`` lines joined by CRLF, what
#: hopscope's proxy records now: one object to marshal and load instead of a tuple and
#: two bytes per field), and ``kept``/``added_end`` are unused.
PROXY_START = 10
#: ``(REQUEST_BODY, ts, size, more)``: a client span event
REQUEST_BODY = 11
#: ``(CONNECT, ts, reused, connection_id, exchange, connect_ns, local_port)``
CONNECT = 12
#: ``(SENT, ts, bytes)``
SENT = 13
#: ``(RETRY, ts)``
RETRY = 14
#: ``(RESPONSE_START, ts, status, http_version, removed)``
RESPONSE_START = 15
#: ``(RESPONSE_BODY, ts, size)``: a chunk relayed while more was to come
RESPONSE_BODY = 16


def client_start(record: Record) -> Record:
    """The client span's ``"s"`` record."""
    _, begin, trace_id, client_id, parent_id, tid, _, request, _, _, _ = record
    method, path, accepted, number = request[0], request[3], request[9], request[10]
    if type(request[7]) is bytes:  # the headers as a block (see PROXY_REQUEST)
        request = (*request[:7], header_fields(request[7]))
    attrs = request_attrs({}, request)
    if accepted is not None:
        attrs["connection.accepted_ts"] = accepted
        attrs["connection.request_number"] = number
    name = f"{method} {path}"
    return ("s", begin, trace_id, client_id, parent_id, "client", name, tid, attrs)


def item_record(item: Any, record: Record) -> Record:
    """The record one item of ``record`` stands for."""
    code = item[0]
    if type(code) is str:
        return item if type(item) is tuple else tuple(item)
    trace_id, client_id, tid, request = record[2], record[3], record[5], record[7]
    proxy_id = request[11]
    ts = item[1]
    if code == RESPONSE_BODY:
        return ("p", ts, trace_id, proxy_id, "response.body", {"size": item[2], "more": True})
    if code == PROXY_START:
        _, _, target, headers, kept, added_end, removed, host, port, origin = item
        attrs: dict[str, Any] = {
            "http.request.method": request[0],
            "url.full": origin + target.decode("latin-1"),
            "server.address": host,
            "server.port": port,
            "proxy.request.headers.added": header_fields(headers)
            if type(headers) is bytes
            else headers[kept:added_end],
        }
        if removed:
            attrs["proxy.request.headers.removed"] = removed
        name = f"{request[0]} {request[3]}"
        return ("s", ts, trace_id, proxy_id, client_id, "proxy", name, tid, attrs)
    if code == CONNECT:
        _, _, reused, conn_id, exchange, connect_ns, local_port = item
        attrs = {"reused": reused, "connection.id": conn_id, "connection.exchange": exchange}
        if not reused:
            attrs["connect_ns"] = connect_ns
            attrs["network.local.port"] = local_port
        return ("p", ts, trace_id, proxy_id, "upstream.connect", attrs)
    if code == SENT:
        return ("p", ts, trace_id, proxy_id, "request.sent", {"bytes": item[2]})
    if code == RESPONSE_START:
        attrs = {"status": item[2], "http.version": item[3]}
        if item[4]:
            attrs["proxy.response.headers.removed"] = item[4]
        return ("p", ts, trace_id, proxy_id, "response.start", attrs)
    if code == REQUEST_BODY:
        attrs = {"size": item[2], "more": item[3]}
        return ("p", ts, trace_id, client_id, "request.body", attrs)
    if code == RETRY:
        attrs = {"reason": "stale connection"}
        return ("p", ts, trace_id, proxy_id, "upstream.retry", attrs)
    raise ValueError(f"unknown proxy item code {code!r}")


def header_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """``(name, value)`` pairs of a block of ``name: value`` lines joined by CRLF (names
    hold no colon, values no CR or LF: a parser checked them, or the proxy made them)."""
    if not block:
        return []
    return [tuple(line.split(b": ", 1)) for line in block.split(b"\r\n")]  # type: ignore[misc]


def _body_attrs(
    attrs: dict[str, Any], direction: str, size: int, chunks: Any, truncated: bool
) -> None:
    attrs[f"http.{direction}.body.size"] = size
    if size:
        attrs[f"http.{direction}.body"] = chunks
        attrs[f"http.{direction}.body.truncated"] = truncated


def end_records(record: Record, out: list[Record]) -> None:
    """Append the two spans' ends (and body summaries) to ``out``."""
    trace_id, client_id = record[2], record[3]
    proxy_id = record[7][11]
    (ts, status, headers, proxy_ended, up_status, up_conn, req_size, req_body, req_cut,
     req_summary, resp_size, resp_body, resp_cut, resp_summary, client_extra,
     proxy_extra) = record[9]  # fmt: skip
    if proxy_ended:
        attrs: dict[str, Any] = dict(proxy_extra) if proxy_extra else {}
        if up_conn is not None:
            attrs["http.response.status_code"] = up_status or None
            attrs["upstream.connection.id"] = up_conn
        attrs["http.request.body.size"] = req_size
        attrs["http.response.body.size"] = resp_size
        if resp_summary is not None:
            out.append(("p", ts, trace_id, proxy_id, "response.body.summary", resp_summary))
        out.append(("e", ts, trace_id, proxy_id, attrs))
    attrs = dict(client_extra) if client_extra else {}
    if headers is not None:
        attrs["http.response.headers"] = (
            header_fields(headers) if type(headers) is bytes else headers
        )
    attrs["http.response.status_code"] = status or None
    _body_attrs(attrs, "request", req_size, req_body, req_cut)
    _body_attrs(attrs, "response", resp_size, resp_body, resp_cut)
    if req_summary is not None:
        out.append(("p", ts, trace_id, client_id, "request.body.summary", req_summary))
    out.append(("e", ts, trace_id, client_id, attrs))


def head_record(record: Record) -> Record:
    """The client span's ``request.head`` event (its whole head arrived)."""
    return ("p", record[7][8], record[2], record[3], "request.head", None)


def expand_proxy(record: Record) -> list[Record]:
    """The records a proxy ``"r"`` record stands for, in the order they were made."""
    out = [client_start(record), head_record(record)]
    items, end_at = record[10], record[8]
    ended = end_at >= 0 and record[9] is not None
    for index, item in enumerate(items):
        if index == end_at and ended:
            end_records(record, out)
            ended = False
        if item is None:
            break
        out.append(item_record(item, record))
    if ended:
        end_records(record, out)
    return out
