"""HAR 1.2: hopscope traces out to HTTP tools, and browsers' recordings in.

HAR is what every browser's network panel saves and what HTTP tools open, so a trace
exported as HAR can be looked at anywhere, and a HAR saved from a browser can be looked
at in hopscope.  Exported files end up attached to bug reports: secrets in headers,
cookies, query strings and form or JSON bodies are replaced by :data:`REDACTED` unless
the caller asks otherwise.

A HAR entry is one request seen from the client, so a trace becomes one entry built
from the outermost hop that recorded each field (what the client sent and got), and a
HAR entry becomes a trace of one ``client`` span.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from .encoding import decode_content, decode_prefix
from .model import Event, Span, Trace, assemble, header_pairs, header_value, outer_first
from .redact import REDACTED, is_sensitive, redact_headers, redact_query, redact_url
from .replay import declared_length
from .tracefile import GZIP_MAGIC

__all__ = [
    "HAR_VERSION",
    "UNREAD_NOTE",
    "Exchange",
    "HarError",
    "exchange",
    "har_events_from",
    "har_timings",
    "har_to_events",
    "load_har",
    "redact_body",
    "redact_header_values",
    "redact_query",
    "redact_url",
    "traces_to_har",
    "unread",
]

HAR_VERSION = "1.2"
_READABLE_VERSIONS = ("1.1", "1.2")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HEX32 = re.compile(r"[0-9a-f]{32}")
#: Entry fields kept as span attributes when a HAR is loaded.
_ENTRY_ATTRS = (("serverIPAddress", "network.peer.address"), ("connection", "connection.id"))


class HarError(ValueError):
    """A HAR that cannot be read; the message is one line for the user."""


# --------------------------------------------------------------------------------------
# The HTTP exchange inside a trace


def _decode_body(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        return b""
    try:
        return base64.b64decode(value)
    except (binascii.Error, ValueError):
        return b""


def _body_of(trace: Trace, direction: str) -> tuple[bytes, int | None, bool]:
    """The captured bytes, total size and cut flag of the request or response body."""
    key = f"http.{direction}.body"
    size = trace.attr(f"{key}.size")
    valid = isinstance(size, int) and not isinstance(size, bool)
    truncated = bool(trace.attr(f"{key}.truncated"))
    return _decode_body(trace.attr(key)), size if valid else None, truncated


@dataclass(slots=True)
class Exchange:
    """One request and its response as the client saw them."""

    method: str
    scheme: str
    authority: str
    """``host[:port]`` the request was sent to (its Host header when it had one)."""
    path: str
    query: str
    http_version: str = ""
    """``"1.1"``, ``"2"``... (empty when unknown)."""
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    request_body: bytes = b""
    request_body_size: int | None = None
    request_truncated: bool = False
    request_unread: bool = False
    """True when the request came chunked and the app read none of it: its size is not
    known (``request_body_size`` None), and the body is not empty (see :func:`unread`)."""
    status: int | None = None
    status_text: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes = b""
    response_body_size: int | None = None
    response_truncated: bool = False

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}" + (
            f"?{self.query}" if self.query else ""
        )


def exchange(trace: Trace) -> Exchange | None:
    """The trace's HTTP request and response, or None when it has no request (a span
    recorded on its own)."""
    method = trace.attr("http.request.method")
    if not isinstance(method, str) or not method:
        return None
    path_span = trace.outermost("url.path")
    attrs = path_span.attrs if path_span is not None else {}
    request_headers = header_pairs(trace.attr("http.request.headers"))
    scheme = str(attrs.get("url.scheme") or trace.attr("url.scheme") or "http")
    path = str(attrs.get("url.path") or "/")
    query = attrs.get("url.query")
    full = attrs.get("url.full")
    authority = header_value(request_headers, "host") or header_value(request_headers, ":authority")
    if not authority and isinstance(full, str):
        authority = urlsplit(full).netloc
    if not authority:
        address = attrs.get("server.address") or trace.attr("server.address") or "localhost"
        port = attrs.get("server.port") or trace.attr("server.port")
        shown = f"[{address}]" if ":" in str(address) else str(address)
        default = _DEFAULT_PORTS.get(scheme)
        authority = shown + (f":{port}" if port and port != default else "")
    status = trace.attr("http.response.status_code")
    if status is None and trace.attr("websocket.accepted") is True:
        status = 101  # an app span's WebSocket: HAR viewers show 0 as a failed request
    status_text = trace.attr("http.response.status_text")
    version = trace.attr("network.protocol.version")
    request_body, request_size, request_truncated = _body_of(trace, "request")
    declared = declared_length(request_headers)
    redacted = REDACTED.encode() in request_body  # an exporter changed its length
    if declared is not None and declared > max(len(request_body), request_size or 0):
        if not redacted:  # the app did not read it all: not all of it was captured
            request_size = declared
            request_truncated = request_truncated or bool(request_body)
    request_unread = unread(request_headers, request_body, request_size)
    if request_unread:
        request_size = None
    response_body, response_size, response_truncated = _body_of(trace, "response")
    result = Exchange(
        method=method,
        scheme=scheme,
        authority=authority,
        path=path,
        query=str(query) if query else "",
        http_version=str(version) if version else "",
        request_headers=request_headers,
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        status_text=str(status_text) if status_text else "",
        response_headers=header_pairs(trace.attr("http.response.headers")),
        request_body=request_body,
        request_body_size=request_size,
        request_truncated=request_truncated,
        request_unread=request_unread,
        response_body=response_body,
        response_body_size=response_size,
        response_truncated=response_truncated,
    )
    if not result.status_text and result.status is not None:
        try:
            result.status_text = HTTPStatus(result.status).phrase
        except ValueError:
            pass
    return result


# --------------------------------------------------------------------------------------
# Redaction beyond headers


#: Headers whose value is a URL, which can carry a secret in its query string.
_URL_HEADERS = frozenset({":path", "referer", "location", "content-location"})


def redact_header_values(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """:func:`~hopscope.tracing.redact.redact_headers`, plus secret query parameters in
    the headers that hold URLs (HTTP/2's ``:path``, Referer, Location)."""
    return [
        (name, redact_url(value) if name.lower() in _URL_HEADERS else value)
        for name, value in redact_headers(pairs)
    ]


def _redact_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: REDACTED if is_sensitive(str(key)) else _redact_json(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact_json(item) for item in value]
    return value


def redact_body(data: bytes, content_type: str) -> bytes:
    """The body with sensitive form fields (urlencoded or multipart) or JSON keys
    replaced; other bodies as they are (a body of unknown shape cannot be searched for
    secrets reliably)."""
    media = content_type.split(";")[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return data
        return redact_query(text).encode("ascii")
    if media == "application/json" or media.endswith("+json"):
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return data
        redacted = _redact_json(document)
        if redacted == document:
            return data
        compact = b", " not in data and b": " not in data
        separators = (",", ":") if compact else (", ", ": ")
        return json.dumps(redacted, ensure_ascii=False, separators=separators).encode("utf-8")
    if media == "multipart/form-data":
        return _redact_multipart(data, content_type)
    return data


_BOUNDARY = re.compile(r';\s*boundary="?([^";]+)"?', re.IGNORECASE)
_PART_NAME = re.compile(rb';\s*name="([^"]*)"', re.IGNORECASE)


def _redact_multipart(data: bytes, content_type: str) -> bytes:
    """A multipart form with the values of its sensitive fields (not files) replaced,
    every other byte as it was."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return data
    delimiter = b"--" + found.group(1).encode("latin-1")
    parts = data.split(delimiter)
    for index, part in enumerate(parts[1:], start=1):
        head, blank, value = part.partition(b"\r\n\r\n")
        name = _PART_NAME.search(head)
        if not blank or name is None or b"filename" in head.lower():
            continue
        if is_sensitive(name.group(1).decode("latin-1")):
            end = b"\r\n" if value.endswith(b"\r\n") else b""
            parts[index] = head + blank + REDACTED.encode() + end
    return delimiter.join(parts)


# --------------------------------------------------------------------------------------
# Export


def _iso(ns: int) -> str:
    moment = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
    millis = (ns // 1_000_000) % 1000
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _all_ts(trace: Trace) -> list[int]:
    stamps: list[int] = []
    for span in trace.spans.values():
        stamps += [ts for ts in (span.start, span.end) if ts is not None]
        stamps += [event.ts for event in span.events]
    return stamps


def _first_event(spans: Iterable[Span], names: tuple[str, ...]) -> Event | None:
    for span in spans:
        for event in sorted(span.events, key=lambda e: e.ts):
            if event.name in names:
                return event
    return None


def _last_request_chunk(span: Span) -> int | None:
    stamps = [e.ts for e in span.events if e.name == "request.body"]
    summary = span.event("request.body.summary")
    if summary is not None and isinstance(summary.attrs.get("last_ts"), int):
        stamps.append(summary.attrs["last_ts"])
    return max(stamps) if stamps else None


def _nonneg_ns(attrs: dict[str, Any], key: str) -> int | None:
    value = attrs.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return int(value)
    return None


def har_timings(trace: Trace) -> dict[str, float]:
    """HAR ``timings`` (milliseconds) for a trace; they add up to the root span's time.

    The client's view comes first: events on the ``client`` and ``proxy`` spans (the
    proxy's ``upstream.connect``, ``request.sent``, ``response.start``; a loaded HAR's
    ``connect``).  Without them the server's view stands in: ``send`` lasts until the
    last request body chunk arrived, ``wait`` until the response head, ``receive`` the
    rest.  Phases that cannot be known are -1, as HAR asks.
    """
    root = trace.root
    stamps = _all_ts(trace)
    start = root.start if root is not None and root.start is not None else None
    if start is None and stamps:
        start = min(stamps)
    phases: dict[str, int | None] = dict.fromkeys(("blocked", "dns", "connect", "ssl"))
    if start is None:
        return {**{k: -1.0 for k in phases}, "send": 0.0, "wait": 0.0, "receive": 0.0}
    end = root.end if root is not None and root.end is not None else max(stamps)
    end = max(end, start)
    front = sorted(
        (s for s in trace.spans.values() if s.hop in ("client", "proxy")), key=outer_first
    )
    cursor = start
    sent_ts: int | None = None
    connect = _first_event(front, ("connect", "upstream.connect"))
    head = _first_event(front, ("response.start",))
    if head is not None or connect is not None:
        sent = _first_event(front, ("request.sent",))
        sent_ts = sent.ts if sent is not None else None
    else:
        for span in sorted(trace.spans.values(), key=outer_first):
            head = _first_event([span], ("response.start",))
            if head is not None:
                sent_ts = _last_request_chunk(span)
                cursor = min(max(cursor, span.start or cursor), end)
                break
    if connect is not None:
        attrs = connect.attrs
        phases["dns"] = _nonneg_ns(attrs, "dns_ns")
        phases["connect"] = _nonneg_ns(attrs, "connect_ns")
        ssl = _nonneg_ns(attrs, "ssl_ns")
        if ssl is not None and phases["connect"] is not None:
            phases["ssl"] = min(ssl, phases["connect"])  # HAR counts ssl inside connect
        connected = min(max(connect.ts, start), end)
        if connect.name == "connect":  # a loaded HAR: its own numbers, unknowns kept
            phases["blocked"] = _nonneg_ns(attrs, "blocked_ns")
        cursor = connected
    send_end = min(max(sent_ts if sent_ts is not None else cursor, cursor), end)
    head_ts = min(max(head.ts if head is not None else end, send_end), end)
    # Time before the first known phase (a proxy reading the request head, a server
    # before the app) is blocked, so that the phases add up to the whole.
    setup = (phases["dns"] or 0) + (phases["connect"] or 0)
    before = cursor - start - setup - (phases["blocked"] or 0)
    if before > 0:
        phases["blocked"] = (phases["blocked"] or 0) + before
    timings = {key: -1.0 if value is None else _ms(value) for key, value in phases.items()}
    timings["send"] = _ms(send_end - cursor)
    timings["wait"] = _ms(head_ts - send_end)
    timings["receive"] = _ms(end - head_ts)
    return timings


def _http_version(version: str) -> str:
    if not version:
        return "HTTP/1.1"
    return f"HTTP/{version}" if version[0].isdigit() else version


def _har_headers(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in pairs]


def _request_cookies(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    cookies = []
    for name, value in pairs:
        if name.lower() != "cookie":
            continue
        for item in value.split(";"):
            key, sep, val = item.strip().partition("=")
            if key and sep:
                cookies.append({"name": key, "value": val})
    return cookies


def _response_cookies(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    cookies = []
    for name, value in pairs:
        if name.lower() != "set-cookie":
            continue
        first, *params = value.split(";")
        key, sep, val = first.strip().partition("=")
        if not key or not sep:
            continue
        cookie: dict[str, Any] = {"name": key, "value": val}
        for param in params:
            pname, _, pvalue = param.strip().partition("=")
            lowered = pname.lower()
            if lowered in ("path", "domain"):
                cookie[lowered] = pvalue
            elif lowered == "expires":
                cookie["expires"] = _cookie_expires(pvalue)
            elif lowered == "samesite":
                cookie["sameSite"] = pvalue  # (not in HAR 1.2; Chromium's HARs carry it)
            elif lowered == "httponly":
                cookie["httpOnly"] = True
            elif lowered == "secure":
                cookie["secure"] = True
        cookies.append(cookie)
    return cookies


def _cookie_expires(value: str) -> str:
    """A Set-Cookie ``Expires`` date as HAR 1.2 writes it (ISO 8601, as browsers export
    it); a date that does not parse goes on as it came."""
    try:
        moment = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return value
    if moment.tzinfo is None:  # (RFC 6265 dates are GMT)
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _redact_cookies(cookies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**cookie, "value": REDACTED} for cookie in cookies]


def _text_or_base64(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"text": base64.b64encode(data).decode("ascii"), "encoding": "base64"}


def _truncation_note(kept: int, size: int | None) -> str:
    total = f" of {size}" if size is not None else ""
    return f"hopscope kept only the first {kept}{total} bytes of this body"


def unread(headers: Iterable[tuple[str, str]], body: bytes, size: int | None) -> bool:
    """Whether a request body the app middleware recorded as 0 bytes was in fact not read.

    The middlewares record what the app read.  An upload the app did not read (a 401
    before reading it) is told by its ``Content-Length`` (:func:`declared_length`); sent
    chunked, it has none, and the 0 bytes read would show as an empty body.  So a chunked
    request of which nothing was read is said to be unread, its size unknown (an empty
    chunked body, which a client rarely sends, reads the same: nothing says it apart).
    """
    if body or size:
        return False
    pairs = list(headers)
    if declared_length(pairs) is not None:
        return False
    return any(
        name.lower() == "transfer-encoding" and "chunked" in value.lower() for name, value in pairs
    )


#: What a HAR export says of a request body the app did not read (see :func:`unread`).
UNREAD_NOTE = "not read by the app: sent chunked, its size is unknown and none was captured"


def _post_data(ex: Exchange, redact: bool) -> dict[str, Any] | None:
    if ex.request_unread:
        mime = header_value(ex.request_headers, "content-type") or "application/octet-stream"
        return {"mimeType": mime, "params": [], "text": "", "comment": UNREAD_NOTE}
    size = ex.request_body_size if ex.request_body_size is not None else len(ex.request_body)
    if not ex.request_body and not size:
        return None
    mime = header_value(ex.request_headers, "content-type") or "application/octet-stream"
    data = redact_body(ex.request_body, mime) if redact else ex.request_body
    post: dict[str, Any] = {"mimeType": mime, "params": []}
    try:
        post["text"] = data.decode("utf-8")
    except UnicodeDecodeError:
        # HAR 1.2 has no encoding for request bodies; tools that read one call it this.
        post["text"] = base64.b64encode(data).decode("ascii")
        post["_encoding"] = "base64"
    if mime.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        text = post["text"] if "_encoding" not in post else ""
        post["params"] = [
            {"name": name, "value": value}
            for name, value in parse_qsl(text, keep_blank_values=True)
        ]
    if ex.request_truncated:
        post["comment"] = _truncation_note(len(ex.request_body), ex.request_body_size)
    elif ex.request_body_size and not ex.request_body:
        post["comment"] = f"hopscope did not capture this body of {ex.request_body_size} bytes"
    return post


def _content(ex: Exchange, redact: bool) -> dict[str, Any]:
    mime = header_value(ex.response_headers, "content-type") or "x-unknown"
    size = ex.response_body_size if ex.response_body_size is not None else len(ex.response_body)
    content: dict[str, Any] = {"size": size, "mimeType": mime}
    data = ex.response_body
    decoded_cut = ""
    if data:
        coding = header_value(ex.response_headers, "content-encoding")
        if coding and not ex.response_truncated:
            plain = decode_content(data, coding)
            if plain is not None:
                content["size"] = len(plain)
                content["compression"] = len(plain) - len(data)
                data = plain
        elif coding:
            # A compressed body cut at the capture limit: its start, decoded as far as it
            # goes, as the UI's Response tab shows it (the raw gzip bytes would read as
            # garbage under a text mimeType).  Its decoded size is not known: ``size``
            # stays what was sent.
            plain, said = decode_prefix(data, coding, _CUT_DECODE_LIMIT)
            if said is not None and said.startswith("decoded"):
                data, decoded_cut = _whole_characters(plain), said
        if redact and not ex.response_truncated:  # a login's {"access_token": ...}
            data = redact_body(data, mime)
        content.update(_text_or_base64(data))
    if ex.response_truncated:
        note = _truncation_note(len(ex.response_body), ex.response_body_size)
        if decoded_cut:
            note += f"; the text is their start, {decoded_cut} ({len(data)} bytes)"
        content["comment"] = note
    return content


#: How much of a cut compressed body an export decodes at most (64 KiB of gzip can hold
#: far more).
_CUT_DECODE_LIMIT = 1024 * 1024


def _whole_characters(data: bytes) -> bytes:
    """``data`` without a UTF-8 character cut at its end (a decoded prefix stops
    anywhere), so that text stays text."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[: exc.start]
    return data


def _entry(trace: Trace, ex: Exchange, redact: bool) -> dict[str, Any]:
    request_headers = ex.request_headers
    response_headers = ex.response_headers
    request_cookies = _request_cookies(request_headers)
    response_cookies = _response_cookies(response_headers)
    query = ex.query
    if redact:
        request_headers = redact_header_values(request_headers)
        response_headers = redact_header_values(response_headers)
        request_cookies = _redact_cookies(request_cookies)
        response_cookies = _redact_cookies(response_cookies)
        query = redact_query(query)
    url = f"{ex.scheme}://{ex.authority}{ex.path}" + (f"?{query}" if query else "")
    version = _http_version(ex.http_version)
    request: dict[str, Any] = {
        "method": ex.method,
        "url": url,
        "httpVersion": version,
        "cookies": request_cookies,
        "headers": _har_headers(request_headers),
        "queryString": [
            {"name": name, "value": value}
            for name, value in parse_qsl(query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": ex.request_body_size
        if ex.request_body_size is not None
        else -1  # HAR: not known
        if ex.request_unread
        else len(ex.request_body),
    }
    post = _post_data(ex, redact)
    if post is not None:
        request["postData"] = post
    response: dict[str, Any] = {
        "status": ex.status or 0,
        "statusText": ex.status_text,
        "httpVersion": version,
        "cookies": response_cookies,
        "headers": _har_headers(response_headers),
        "content": _content(ex, redact),
        "redirectURL": header_value(response_headers, "location") or "",
        "headersSize": -1,
        "bodySize": ex.response_body_size if ex.response_body_size is not None else -1,
    }
    timings = har_timings(trace)
    total = sum(value for key, value in timings.items() if value > 0 and key != "ssl")
    stamps = _all_ts(trace)
    root = trace.root
    start = root.start if root is not None and root.start is not None else min(stamps or [0])
    entry: dict[str, Any] = {
        "startedDateTime": _iso(start),
        "time": round(total, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": timings,
        "_traceId": trace.trace_id,
    }
    peer = trace.attr("network.peer.address")
    if isinstance(peer, str) and peer:
        entry["serverIPAddress"] = peer
    if trace.error:
        entry["comment"] = "the request ended in an error"
    return entry


def _creator_version() -> str:
    try:
        from importlib.metadata import version

        return version("hopscope")
    except Exception:  # not installed (a source tree): the version is only informative
        return "unknown"


def traces_to_har(traces: Iterable[Trace], redact: bool = True) -> dict[str, Any]:
    """A HAR 1.2 document with one entry per trace that holds an HTTP request."""
    entries = []
    for trace in traces:
        ex = exchange(trace)
        if ex is not None:
            entries.append(_entry(trace, ex, redact))
    entries.sort(key=lambda entry: entry["startedDateTime"])
    return {
        "log": {
            "version": HAR_VERSION,
            "creator": {"name": "hopscope", "version": _creator_version()},
            "entries": entries,
        }
    }


# --------------------------------------------------------------------------------------
# Import


def _parse_time(value: Any, where: str) -> int:
    if not isinstance(value, str):
        raise HarError(f"{where}: startedDateTime is missing")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise HarError(f"{where}: startedDateTime {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return ((moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)) * 1000


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _ns(ms: float | None) -> int | None:
    return None if ms is None or ms < 0 else round(ms * 1_000_000)


def _version_of(http_version: Any) -> str | None:
    if not isinstance(http_version, str) or not http_version:
        return None
    text = http_version.strip().lower()
    if text in ("h2", "h2c"):
        return "2"
    if text == "h3" or text.startswith("h3-"):
        return "3"
    if text.startswith("http/"):
        number = text[5:]
        return {"2.0": "2", "3.0": "3"}.get(number, number) or None
    return None


def _name_values(items: Any) -> list[list[str]]:
    if not isinstance(items, list):
        return []
    return [
        [str(item.get("name", "")), str(item.get("value", ""))]
        for item in items
        if isinstance(item, dict)
    ]


def _body_bytes(text: Any, encoding: Any) -> bytes:
    if not isinstance(text, str):
        return b""
    if isinstance(encoding, str) and encoding.lower() == "base64":
        try:
            return base64.b64decode(text)
        except (binascii.Error, ValueError):
            return text.encode("utf-8")
    return text.encode("utf-8")


def _request_attrs(entry: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    method, url = request["method"], request["url"]
    parts = urlsplit(url)
    scheme = parts.scheme or "http"
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    attrs: dict[str, Any] = {
        "interface": "har",
        "http.request.method": method.upper(),
        "url.full": url,
        "url.scheme": scheme,
        "url.path": parts.path or "/",
        "url.query": parts.query,
        "http.request.headers": _name_values(request.get("headers")),
    }
    if parts.hostname:
        attrs["server.address"] = parts.hostname
    if port:
        attrs["server.port"] = port
    version = _version_of(request.get("httpVersion"))
    if version:
        attrs["network.protocol.version"] = version
    for har_key, attr in _ENTRY_ATTRS:
        if isinstance(entry.get(har_key), str) and entry[har_key]:
            attrs[attr] = entry[har_key].strip("[]")
    if isinstance(entry.get("_resourceType"), str):
        attrs["har.resource_type"] = entry["_resourceType"]
    if scheme in ("ws", "wss") or entry.get("_resourceType") == "websocket":
        attrs["network.protocol.name"] = "websocket"  # not replayable as a plain GET
    return attrs


def _cut_note(body: dict[str, Any]) -> bool:
    """True when hopscope's export said this body was cut (:func:`_truncation_note`)."""
    return str(body.get("comment", "")).startswith("hopscope kept only")


def _decoded_text(body: bytes, headers: list[list[str]]) -> bool:
    """Whether ``body``, a HAR's text, is the body with the content coding its headers
    name already undone: HAR 1.2 says a text is decoded, and browsers and hopscope's
    export write it so, while the headers still say ``gzip``.  Readers (the Response
    tab) must then not undo it again; the headers stay as they were sent.  Bytes that
    still decode as that coding, or start as gzip does, are not marked (hopscope's
    export writes a body it could not decode as it was captured)."""
    coding = header_value(((name, value) for name, value in headers), "content-encoding")
    if not body or not coding or not coding.strip() or coding.strip().lower() == "identity":
        return False
    if "gzip" in coding.lower() and body[:2] == b"\x1f\x8b":
        return False  # gzip's magic: never the start of a decoded text
    return decode_content(body, coding) is None


def _end_attrs(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    post = request.get("postData")
    if isinstance(post, dict):
        if isinstance(post.get("text"), str):
            sent = _body_bytes(post["text"], post.get("encoding", post.get("_encoding")))
        else:
            pairs = _name_values(post.get("params"))
            sent = "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode("ascii")
        attrs["http.request.body"] = base64.b64encode(sent).decode("ascii")
        attrs["http.request.body.size"] = len(sent)
        if _decoded_text(sent, _name_values(request.get("headers"))):
            attrs["http.request.body.decoded"] = True  # see the response's below
        # A body cut at capture (hopscope's own export says so; any HAR says it by a
        # bodySize larger than the text) must never be replayed as if whole.
        size = request.get("bodySize")
        declared = size if isinstance(size, int) and not isinstance(size, bool) else -1
        noted = _cut_note(post)
        # Redaction changes a body's length: then only hopscope's note says it was cut.
        if noted or (declared > len(sent) and REDACTED.encode() not in sent):
            attrs["http.request.body.truncated"] = True
            attrs["http.request.body.size"] = max(declared, len(sent))
    status = response.get("status")
    if isinstance(status, int) and not isinstance(status, bool) and status > 0:
        attrs["http.response.status_code"] = status
    else:  # browsers record requests that got no answer with status 0
        attrs["error"] = True
        error = response.get("_error")
        attrs["error.type"] = error if isinstance(error, str) and error else "no response"
    if isinstance(response.get("statusText"), str) and response["statusText"]:
        attrs["http.response.status_text"] = response["statusText"]
    attrs["http.response.headers"] = _name_values(response.get("headers"))
    content = response.get("content")
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        received = _body_bytes(content["text"], content.get("encoding"))
        attrs["http.response.body"] = base64.b64encode(received).decode("ascii")
        if _decoded_text(received, attrs["http.response.headers"]):
            attrs["http.response.body.decoded"] = True
        size = content.get("size")
        valid = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if REDACTED.encode() in received and not _cut_note(content):
            valid = False  # redaction changed the length, not a cut at capture
        attrs["http.response.body.size"] = size if valid else len(received)
    elif isinstance(content, dict):  # saved without bodies: its size says there was one
        size = content.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            attrs["http.response.body.size"] = size
    return attrs


def _timing_points(entry: dict[str, Any], start: int) -> tuple[list[tuple[int, str, Any]], int]:
    """The ``timings`` as points in time: ``connect`` (with the setup phases' lengths),
    ``request.sent``, ``response.start``; and the end of the entry."""
    timings = entry.get("timings")
    timings = timings if isinstance(timings, dict) else {}
    phases = {
        key: _ns(_number(timings.get(key)))
        for key in ("blocked", "dns", "connect", "ssl", "send", "wait", "receive")
    }
    if all(phases[key] is None for key in ("send", "wait", "receive")):
        return [], start + (_ns(_number(entry.get("time"))) or 0)
    points: list[tuple[int, str, Any]] = []
    cursor = start
    setup = {
        f"{key}_ns": phases[key]
        for key in ("blocked", "dns", "connect", "ssl")
        if phases[key] is not None
    }
    if setup:
        cursor += sum(phases[key] or 0 for key in ("blocked", "dns", "connect"))
        points.append((cursor, "connect", {**setup, "reused": phases["connect"] is None}))
    cursor += phases["send"] or 0
    points.append((cursor, "request.sent", {}))
    cursor += phases["wait"] or 0
    points.append((cursor, "response.start", None))
    return points, cursor + (phases["receive"] or 0)


def _entry_events(entry: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(entry, dict):
        raise HarError(f"{where} is not an object")
    request = entry.get("request")
    if not isinstance(request, dict):
        raise HarError(f"{where} has no request")
    method, url = request.get("method"), request.get("url")
    if not isinstance(method, str) or not method or not isinstance(url, str):
        raise HarError(f"{where}: request.method or request.url is missing")
    start = _parse_time(entry.get("startedDateTime"), where)
    response = entry.get("response")
    response = response if isinstance(response, dict) else {}
    trace_id = entry.get("_traceId")
    if not isinstance(trace_id, str) or not _HEX32.fullmatch(trace_id):
        trace_id = secrets.token_hex(16)
    ids = {"trace_id": trace_id, "span_id": secrets.token_hex(8)}
    start_attrs = _request_attrs(entry, request)
    end_attrs = _end_attrs(request, response)
    points, end = _timing_points(entry, start)
    name = f"{start_attrs['http.request.method']} {start_attrs['url.path']}"
    events: list[dict[str, Any]] = [
        {
            "kind": "span_start",
            "ts": start,
            **ids,
            "parent_id": None,
            "hop": "client",
            "name": name,
            "attrs": start_attrs,
        }
    ]
    for ts, point, attrs in points:
        if attrs is None:
            attrs = {"status": end_attrs.get("http.response.status_code")}
        events.append({"kind": "event", "ts": ts, **ids, "name": point, "attrs": attrs})
    events.append({"kind": "span_end", "ts": end, **ids, "attrs": end_attrs})
    return events


def har_to_events(document: Any, name: str = "HAR") -> list[dict[str, Any]]:
    """Wire events for every entry of a parsed HAR document (one ``client`` span each)."""
    log = document.get("log") if isinstance(document, dict) else None
    if not isinstance(log, dict):
        raise HarError(f"{name} is not a HAR file (no log object)")
    version = log.get("version") or "1.1"  # HAR 1.2: an empty version means 1.1
    if version not in _READABLE_VERSIONS:
        raise HarError(f"{name} is HAR version {version!r}; hopscope reads 1.1 and 1.2")
    entries = log.get("entries")
    if not isinstance(entries, list):
        raise HarError(f"{name} is not a HAR file (no log.entries list)")
    events: list[dict[str, Any]] = []
    for index, entry in enumerate(entries, start=1):
        events += _entry_events(entry, f"{name}: entry {index}")
    return events


def load_har(path: str | os.PathLike[str]) -> list[Trace]:
    """Read a HAR file (as a browser saves it) into traces."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise HarError(f"cannot open {name}: {exc.strerror}") from None
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        if raw.startswith(GZIP_MAGIC):
            raise HarError(f"{name} is gzip-compressed: gunzip it first") from None
        raise HarError(f"{name} is not a HAR file (not JSON)") from None
    return assemble(har_to_events(document, name))


def har_events_from(raw: bytes, name: str) -> list[dict[str, Any]] | None:
    """The events of a HAR file's bytes; None when they do not even look like one (not
    a JSON object with a ``log``).  Raises :class:`HarError` for a broken HAR file."""
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or "log" not in document:
        return None
    return har_to_events(document, name)
