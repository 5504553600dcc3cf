"""What ``hopscope replay`` needs to know, without sending anything.

A replay resends captured requests to a (new) version of an app and tells what changed.
The pure parts live here so they can be tested on their own and reused by any front end:
which span of a trace holds the request (:func:`captured_request`), which captured
headers may be sent again (:func:`replay_headers`), and how a new response differs from
the captured one (:func:`compare`, with :func:`json_diff` and :func:`header_diff`).
Sending is the ``hopscope.app.replay`` module's job: this package runs inside users'
apps and must not import an HTTP client.
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .encoding import decode_content
from .model import Span, Trace, outer_first
from .redact import REDACTED, is_redacted, is_sensitive, redact_url

__all__ = [
    "DEFAULT_IGNORED_HEADERS",
    "DROPPED_REQUEST_HEADERS",
    "CapturedRequest",
    "Comparison",
    "Difference",
    "JsonChange",
    "captured_request",
    "compare",
    "declared_length",
    "decode_content",
    "header_diff",
    "json_diff",
    "parse_ignore_path",
    "replay_headers",
]

#: Request headers never resent as captured: the HTTP client recomputes them (Host,
#: framing), they belong to one connection (hop-by-hop), or a proxy or hopscope itself
#: added them (a replay starts a trace of its own, so it sends its own traceparent).
DROPPED_REQUEST_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "traceparent",
        "tracestate",
        "x-request-start",
    }
)

#: Response headers a replay does not compare unless asked: they change on every
#: response (Date), with the server in front (Server), with framing, or come from hopscope.
DEFAULT_IGNORED_HEADERS = frozenset(
    {
        "date",
        "server",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "server-timing",
        "traceparent",
        "x-request-start",
    }
)


@dataclass(slots=True)
class CapturedRequest:
    """One request as it was captured, and the response it got then."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool
    status: int | None
    response_headers: list[tuple[str, str]]
    response_body: bytes
    response_truncated: bool
    duration_ns: int | None
    trace_id: str = ""
    start: int | None = None
    body_size: int | None = None
    """The whole request body's size when the capture knows it (more than ``body`` when
    ``truncated``)."""
    response_disconnected: bool = False
    """True when the client went away before the response ended: the captured body is
    then only what was sent until it did."""
    path_encoded: bool = False
    """True when ``path`` is as it went on the wire (percent-encoded, from a HAR file);
    the middlewares record it decoded."""
    websocket: bool = False


def declared_length(pairs: Iterable[tuple[str, str]]) -> int | None:
    """The request's ``Content-Length``, or None.  More than the captured body when the
    app did not read all of it (a 401 before reading an upload): the capture then holds
    only what the app read, and must not be resent as if whole."""
    value = next((v for n, v in pairs if n.lower() == "content-length"), "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


# -- which span holds the request ---------------------------------------------------------------


def captured_request(trace: Trace) -> CapturedRequest | None:
    """The request a trace recorded, or None when no span of it has an HTTP method.

    The request itself comes from the app span when there is one (the app middleware
    records headers and body), else from the outermost span that has a method (a proxy's
    client span); the status is the outermost hop's, i.e. what the client got.  A trace
    file is user input: values of the wrong type read as absent.
    """
    spans = [
        s
        for s in trace.spans.values()
        if isinstance(s.attrs.get("http.request.method"), str) and s.attrs["http.request.method"]
    ]
    if not spans:
        return None
    outer = min(spans, key=outer_first)
    apps = [s for s in spans if s.hop == "app" and not _inside_app_request(trace, s)]
    source = min(apps, key=outer_first) if apps else outer
    attrs = source.attrs

    body, body_ok = _decoded(attrs.get("http.request.body"))
    size = _as_int(attrs.get("http.request.body.size"))
    headers = _header_pairs(attrs.get("http.request.headers"))
    declared = declared_length(headers)
    redacted = REDACTED.encode() in body  # an exporter changed it, and its length
    if declared is not None and declared > max(len(body), size or 0) and not redacted:
        size = declared  # the app did not read the whole body: it was not all captured
    from .har import unread  # (har imports this module)

    not_read = unread(headers, body, size)  # sent chunked, and none of it read
    if not_read:
        size = None
    truncated = (
        not body_ok
        or not_read
        or attrs.get("http.request.body.truncated") is True
        or (size is not None and size > len(body))
    )
    response_body, response_ok = _decoded(attrs.get("http.response.body"))
    response_size = _as_int(attrs.get("http.response.body.size"))
    disconnected = attrs.get("disconnected") is True
    response_truncated = (
        not response_ok
        or disconnected
        or attrs.get("http.response.body.truncated") is True
        or (response_size is not None and response_size > len(response_body))
    )
    root = trace.root
    duration = root.duration_ns if root is not None else None
    return CapturedRequest(
        method=attrs["http.request.method"],
        path=_text(attrs.get("url.path")) or "/",
        query=_text(attrs.get("url.query")),
        headers=headers,
        body=body,
        truncated=truncated,
        status=_outer_status(trace),
        response_headers=_header_pairs(attrs.get("http.response.headers")),
        response_body=response_body,
        response_truncated=response_truncated,
        response_disconnected=disconnected,
        duration_ns=duration if isinstance(duration, int) else None,
        trace_id=trace.trace_id,
        start=source.start if isinstance(source.start, int) else None,
        body_size=size,
        path_encoded=attrs.get("interface") == "har",
        websocket=attrs.get("network.protocol.name") == "websocket",
    )


def _inside_app_request(trace: Trace, span: Span) -> bool:
    """True when an ancestor is itself an app span with a request: ``span`` is then a
    downstream service's request made while handling that one, not the one to replay."""
    seen = {span.span_id}
    parent_id = span.parent_id
    while parent_id is not None and parent_id in trace.spans and parent_id not in seen:
        seen.add(parent_id)
        parent = trace.spans[parent_id]
        if parent.hop == "app" and isinstance(parent.attrs.get("http.request.method"), str):
            return True
        parent_id = parent.parent_id
    return False


def _outer_status(trace: Trace) -> int | None:
    for span in sorted(trace.spans.values(), key=outer_first):
        if "http.response.status_code" in span.attrs:
            return _as_int(span.attrs["http.response.status_code"])
    return None


def _as_int(value: Any) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _decoded(encoded: Any) -> tuple[bytes, bool]:
    """The captured bytes of a base64 body attribute, and whether they could be read."""
    if encoded is None or encoded == "":
        return b"", True
    if not isinstance(encoded, str):
        return b"", False
    try:
        return binascii.a2b_base64(encoded), True
    except (binascii.Error, ValueError):
        return b"", False


def _header_pairs(headers: Any) -> list[tuple[str, str]]:
    if not isinstance(headers, list):
        return []
    pairs = []
    for pair in headers:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            name, value = pair
            if isinstance(name, str) and isinstance(value, str):
                pairs.append((name, value))
    return pairs


# -- what to send -------------------------------------------------------------------------------


def replay_headers(
    captured: Sequence[tuple[str, str]], overrides: Sequence[tuple[str, str]] = ()
) -> tuple[list[tuple[str, str]], list[str]]:
    """``(headers to send, names withheld)`` for resending a request.

    Dropped: :data:`DROPPED_REQUEST_HEADERS`, ``Proxy-*``, ``X-Forwarded-*``, HTTP/2
    pseudo-headers and whatever the captured ``Connection`` names.  A captured value that
    is a redaction marker is withheld (never sent as if it were the credential) and its
    name returned, unless an override gives the real value.  Each override replaces every
    captured header of its name (in the place of the first), or is added at the end.
    """
    tokens = {
        token.strip().lower()
        for name, value in captured
        if name.lower() == "connection"
        for token in value.split(",")
    }
    overridden = {name.lower() for name, _ in overrides}
    by_name: dict[str, list[tuple[str, str]]] = {}
    for name, value in overrides:
        by_name.setdefault(name.lower(), []).append((name, value))
    out: list[tuple[str, str]] = []
    withheld: list[str] = []
    for name, value in captured:
        lowered = name.lower()
        if lowered in by_name:
            out.extend(by_name.pop(lowered))  # in the place of the first captured one
            continue
        if lowered in overridden or _dropped(lowered) or lowered in tokens:
            continue
        if is_redacted(value):
            if all(lowered != known.lower() for known in withheld):
                withheld.append(name)
            continue
        out.append((name, value))
    for items in by_name.values():
        out.extend(items)
    return out, withheld


def _dropped(name: str) -> bool:
    return name in DROPPED_REQUEST_HEADERS or name.startswith(("proxy-", "x-forwarded-", ":"))


# -- how a response differs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """One way a replayed response differs from the captured one."""

    kind: str
    """``status``, ``body``, ``header`` or ``error``."""
    detail: str
    """One line for people, e.g. ``data.name: 'ann' -> 'bob'``."""

    def __str__(self) -> str:
        if self.kind == "header":  # "header content-type: ..." reads better than "header: ..."
            return f"header {self.detail}"
        return f"{self.kind}: {self.detail}"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class JsonChange:
    """A value that differs between two JSON documents, at ``path`` (keys and indexes)."""

    path: tuple[str | int, ...]
    old: Any = MISSING
    new: Any = MISSING

    @property
    def dotted(self) -> str:
        return ".".join(str(part) for part in self.path) or "(root)"

    def __str__(self) -> str:
        if self.old is MISSING:
            return f"{self.dotted}: added {_short(self.new)}"
        if self.new is MISSING:
            return f"{self.dotted}: removed (was {_short(self.old)})"
        return f"{self.dotted}: {_short(self.old)} -> {_short(self.new)}"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_ignore_path(text: str) -> tuple[str, ...]:
    """``data.created_at``, ``items.*.id`` or the JSON Pointer ``/items/*/id`` as
    segments; ``*`` stands for any key or index.  Raises ValueError for an empty one."""
    if text.startswith("/"):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in text[1:].split("/")]
    else:
        parts = text.split(".")
    if not text or any(part == "" for part in parts):
        raise ValueError(f"bad path {text!r}: expected e.g. data.created_at or items.*.id")
    return tuple(parts)


def _ignored(path: tuple[str | int, ...], ignore: Sequence[tuple[str, ...]]) -> bool:
    """True when some ignore pattern matches ``path`` or one of its ancestors."""
    for pattern in ignore:
        if len(pattern) <= len(path) and all(
            want == "*" or want == str(got) for want, got in zip(pattern, path, strict=False)
        ):
            return True
    return False


def json_diff(old: Any, new: Any, ignore: Sequence[tuple[str, ...]] = ()) -> list[JsonChange]:
    """Where two JSON values differ, structurally: object keys in any order, arrays by
    index, ``1`` equal to ``1.0`` but not to ``true``.  Subtrees matching an ``ignore``
    pattern (see :func:`parse_ignore_path`) are not compared, nor a secret's ``old``
    value an exporter redacted (a HAR's ``"access_token": "[redacted]"``)."""
    return list(_walk((), old, new, ignore))


def _walk(
    path: tuple[str | int, ...], old: Any, new: Any, ignore: Sequence[tuple[str, ...]]
) -> Iterator[JsonChange]:
    if path and _ignored(path, ignore):
        return
    if isinstance(old, str) and path and is_sensitive(str(path[-1])) and is_redacted(old):
        return  # an exporter hid the captured value: nothing to compare it with
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            yield from _walk((*path, key), old[key], new.get(key, MISSING), ignore)
        for key in new:
            if key not in old:
                yield from _walk((*path, key), MISSING, new[key], ignore)
    elif isinstance(old, list) and isinstance(new, list):
        for index in range(max(len(old), len(new))):
            yield from _walk(
                (*path, index),
                old[index] if index < len(old) else MISSING,
                new[index] if index < len(new) else MISSING,
                ignore,
            )
    elif not _same_scalar(old, new):
        yield JsonChange(path, old, new)


def _same_scalar(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool) or old is None or new is None:
        return old is new
    if isinstance(old, int | float) and isinstance(new, int | float):
        if isinstance(old, float) and isinstance(new, float) and math.isnan(old):
            return math.isnan(new)
        return old == new
    if type(old) is not type(new) or isinstance(old, dict | list):
        return False
    return bool(old == new)


def _header(pairs: Iterable[tuple[str, str]], name: str) -> str:
    return ", ".join(v for n, v in pairs if n.lower() == name)


#: ``decoder(body, content_encoding)``: the body with its content codings undone, or None.
Decoder = Callable[[bytes, str], bytes | None]


def _body_differences(
    captured: CapturedRequest,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    ignore: Sequence[tuple[str, ...]],
    decoder: Decoder,
) -> list[str]:
    old_raw = captured.response_body
    if captured.response_truncated:
        # Only the first bytes were kept: the new body must start with the same ones.
        prefix = body[: len(old_raw)]
        if prefix == old_raw:
            return []
        where = _first_difference(old_raw, prefix)
        return [f"first {len(old_raw)} bytes (all the capture kept) differ at byte {where}"]
    # Each side decoded on its own, or kept as it is when it cannot be: a browser's HAR
    # holds bodies already decoded under a Content-Encoding header that says gzip.
    old = decoder(old_raw, _header(captured.response_headers, "content-encoding"))
    new = decoder(body, _header(headers, "content-encoding"))
    old = old_raw if old is None else old
    new = body if new is None else new
    if old == new:
        return []
    old_json, new_json = _json(old), _json(new)
    if old_json is not MISSING and new_json is not MISSING:
        changes = json_diff(old_json, new_json, ignore)
        return [str(change) for change in changes]
    where = _first_difference(old, new)
    detail = f"{len(old)} -> {len(new)} bytes, first difference at byte {where}"
    snippet_old, snippet_new = _snippet(old, where), _snippet(new, where)
    if snippet_old is not None and snippet_new is not None:
        detail += f": {snippet_old} -> {snippet_new}"
    return [detail]


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return MISSING


def _first_difference(old: bytes, new: bytes) -> int:
    for index, (a, b) in enumerate(zip(old, new, strict=False)):
        if a != b:
            return index
    return min(len(old), len(new))


def _snippet(data: bytes, at: int, width: int = 24) -> str | None:
    """A short piece of text from ``at``, or None when the body is not printable text."""
    try:
        text = data[at : at + width * 4].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        text = data[at : at + width].decode("utf-8", errors="replace")
    piece = text[:width]
    if piece and not piece.isprintable():
        return None
    return repr(piece) + ("..." if len(text) > width else "")


def header_diff(
    old: Sequence[tuple[str, str]],
    new: Sequence[tuple[str, str]],
    ignore: Iterable[str] = (),
) -> list[str]:
    """How the response headers the capture had changed: only names present in ``old``
    are compared (case-insensitively, all values in order), except
    :data:`DEFAULT_IGNORED_HEADERS` and ``ignore``; a redacted captured value is not
    compared, since the capture no longer knows it, and a URL whose secret query values
    were redacted is compared with the new one redacted the same way."""
    skip = DEFAULT_IGNORED_HEADERS | {name.lower() for name in ignore}
    old_values: dict[str, list[str]] = {}
    for name, value in old:
        old_values.setdefault(name.lower(), []).append(value)
    new_values: dict[str, list[str]] = {}
    for name, value in new:
        new_values.setdefault(name.lower(), []).append(value)
    out = []
    for name, values in old_values.items():
        if name in skip or any(is_redacted(v) for v in values):
            continue
        now = new_values.get(name)
        if now is not None and any(_QUOTED_REDACTED in value for value in values):
            now = [redact_url(value) for value in now]  # a Location's secret query values
        if now is None:
            out.append(f"{name}: removed (was {_quoted(values)})")
        elif now != values:
            out.append(f"{name}: {_quoted(values)} -> {_quoted(now)}")
    return out


#: How an exporter's redaction marker reads inside a URL (``redact_url``).
_QUOTED_REDACTED = quote(REDACTED)


def _quoted(values: list[str]) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(slots=True)
class Comparison:
    """What :func:`compare` found; empty :attr:`differences` means the responses match."""

    differences: list[Difference] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.differences


def compare(
    captured: CapturedRequest,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    ignore: Sequence[tuple[str, ...]] = (),
    ignore_headers: Iterable[str] = (),
    decoder: Decoder = decode_content,
) -> Comparison:
    """Compare a new response (``body`` as it came on the wire, content-coded or not)
    with the captured one: status, body (JSON structurally, without the ``ignore``
    paths) and the captured response headers (without :data:`DEFAULT_IGNORED_HEADERS`
    and ``ignore_headers``).  ``decoder(body, content_encoding)`` undoes content codings
    (None when it cannot); the default knows gzip and deflate."""
    result = Comparison()
    if captured.status is not None and status != captured.status:
        result.differences.append(Difference("status", f"{captured.status} -> {status}"))
    for detail in _body_differences(captured, headers, body, ignore, decoder):
        result.differences.append(Difference("body", detail))
    for detail in header_diff(captured.response_headers, headers, ignore_headers):
        result.differences.append(Difference("header", detail))
    return result
