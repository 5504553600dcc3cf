"""The assembled view: traces made of spans made of events.

Wire events (see docs/trace-format.md) arrive in any order across processes; a
:class:`TraceBuilder` folds them into :class:`Trace` objects as they come, so a live
viewer sees requests that are still running, and a file loader sees finished ones.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

__all__ = [
    "HOP_ORDER",
    "QUEUE",
    "Event",
    "Span",
    "Trace",
    "TraceBuilder",
    "TraceInfo",
    "assemble",
    "header_pairs",
    "header_value",
    "outer_first",
]


@dataclass(slots=True)
class Event:
    """A point in time inside a span: a body chunk, the response head, an exception."""

    name: str
    ts: int
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Span:
    """One hop's (or one user block's) stretch of time inside a trace."""

    trace_id: str
    span_id: str
    parent_id: str | None = None
    hop: str = "app"
    name: str = ""
    start: int | None = None
    end: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def duration_ns(self) -> int | None:
        if self.start is None or self.end is None:
            return None
        return self.end - self.start

    def body(self, direction: str) -> bytes:
        """The captured first bytes of the ``request`` or ``response`` body."""
        encoded = self.attrs.get(f"http.{direction}.body")
        return base64.b64decode(encoded) if encoded else b""

    def headers(self, direction: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.attrs.get(f"http.{direction}.headers", [])]

    def event(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)


@dataclass(slots=True)
class Trace:
    """One request's life, across every hop that reported it."""

    trace_id: str
    spans: dict[str, Span] = field(default_factory=dict)
    dropped: int = 0
    _info: TraceInfo | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def info(self) -> TraceInfo:
        """What lists and filters read of the trace, worked out in one pass over its spans
        and kept until the next event (:class:`TraceBuilder` forgets it; code that changes
        spans by hand must call :meth:`changed`)."""
        info = self._info
        if info is None:
            info = self._info = TraceInfo(self)
        return info

    def changed(self) -> None:
        """Forget the summary: the spans were changed other than through a builder."""
        self._info = None

    @property
    def root(self) -> Span | None:
        """The outermost span: among those whose parent is not in this trace, the one of the
        outermost hop (client, proxy, server, app), earliest first.  A queue span is never
        the root: it is waiting in front of a hop, not a hop."""
        root_id = self.info.root_id
        return None if root_id is None else self.spans.get(root_id)

    @property
    def start(self) -> int | None:
        return self.info.start

    @property
    def end(self) -> int | None:
        return self.info.end

    @property
    def finished(self) -> bool:
        return self.info.end is not None

    @property
    def duration_ns(self) -> int | None:
        info = self.info
        start, end = info.start, info.end
        return None if start is None or end is None else end - start

    def outline(self) -> list[Span]:
        """The spans as far as a request list's row needs them (hop, name, start, end
        and a few attributes, ``tracefile.OUTLINE_KEYS``): a trace read from a file's
        summary has them without reading its events
        (:class:`~hopscope.tracing.tracefile.SummarisedTrace`)."""
        return list(self.spans.values())

    def latest_ts(self) -> int:
        """The newest timestamp of any span start, end or event (0 for none)."""
        newest = 0
        for span in self.spans.values():
            for ts in (span.start, span.end):
                if ts is not None and ts > newest:
                    newest = ts
            for point in span.events:
                if point.ts > newest:
                    newest = point.ts
        return newest

    def children(self, span: Span) -> list[Span]:
        return sorted(
            (s for s in self.spans.values() if s.parent_id == span.span_id),
            key=lambda s: s.start or 0,
        )

    def by_hop(self, hop: str) -> list[Span]:
        return [s for s in self.spans.values() if s.hop == hop]

    def outermost(self, key: str) -> Span | None:
        """The outermost span that recorded attribute ``key``: where several hops saw
        the same request (a proxy and the app both see its headers), the outermost saw
        it closest to how the client sent it.  (:class:`TraceInfo`, which the list and
        filters read, agrees with it without a sort per lookup.)"""
        found = [span for span in list(self.spans.values()) if key in span.attrs]
        return min(found, key=outer_first) if found else None

    def attr(self, key: str) -> Any:
        """Attribute ``key`` as the outermost hop recorded it (None when none did)."""
        span = self.outermost(key)
        return span.attrs[key] if span is not None else None

    @property
    def method(self) -> str | None:
        value = self.info.method
        return str(value) if value is not None else None

    @property
    def path(self) -> str | None:
        value = self.info.path
        return str(value) if value is not None else None

    @property
    def status(self) -> int | None:
        value = self.info.status
        return int(value) if value is not None else None

    @property
    def route(self) -> str | None:
        value = self.info.route
        return str(value) if value is not None else None

    @property
    def error(self) -> bool:
        return self.info.error


def header_pairs(value: Any) -> list[tuple[str, str]]:
    """A recorded header list as text pairs, in order, repeats kept.  A trace file can
    hold anything: what is not a pair is left out rather than a crash."""
    if not isinstance(value, list):
        return []
    return [
        (str(pair[0]), str(pair[1]))
        for pair in value
        if isinstance(pair, list | tuple) and len(pair) == 2
    ]


def header_value(pairs: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (any case), or None."""
    name = name.lower()
    return next((value for key, value in pairs if key.lower() == name), None)


#: The hops from the client inwards.
HOP_ORDER = {"client": 0, "proxy": 1, "server": 2, "app": 3}


def outer_first(span: Span) -> tuple[int, int]:
    """Sort key: the outermost hop first (unknown hops last), then the earliest (a
    start that is not a number, from a file, as 0)."""
    start = span.start
    return (HOP_ORDER.get(span.hop, 4), start if type(start) is int else 0)


#: The key :attr:`TraceInfo.hops` files queue spans under (no hop name equals it).
QUEUE = ("queue",)

#: How a summary line writes :data:`QUEUE` (JSON has no tuples).
_QUEUE_KEY = list(QUEUE)

#: Lowercase header names, shared between traces rather than one new string per header.
_LOWER: dict[str, str] = {}


class TraceInfo:
    """A trace's summary: the fields a request list shows and every filter reads.

    A viewer re-applies its filter to each of 100,000 traces on a keystroke and draws
    rows of any of them, so this is worked out once per change of the trace, in a single
    pass over the spans, instead of by every reader in its own (sorting) pass.  Values
    are as recorded (a trace file is user input): ``status`` may be a string.
    """

    __slots__ = (
        "bodies",
        "end",
        "error",
        "failed",
        "header_text",
        "hops",
        "host",
        "method",
        "odd_headers",
        "path",
        "root_id",
        "route",
        "start",
        "status",
    )

    start: int | None
    """The earliest span start."""
    end: int | None
    """The root span's end (None while it runs)."""
    root_id: str | None
    method: Any
    path: Any
    status: Any
    route: Any
    """Values of the outermost hop that has them (``Trace._attr``)."""
    host: str | None
    """The Host header (or ``:authority``) of the outermost hop that knows a host, without
    its port; else that hop's ``server.address``."""
    error: bool
    """Some span has a true ``error`` attribute."""
    failed: bool
    """``error``, or some span has an ``exception`` event."""
    header_text: str
    """Every span's request and response headers that are text pairs, in one string
    (one object, not one per header): ``"\\n" + "name\\0value\\n" * n``, names
    lowercased.  A search for ``"\\nname\\0"`` finds a header by name in C."""
    odd_headers: tuple[tuple[str, str], ...] | None
    """The same pairs when one holds a newline or NUL (so the text would be ambiguous),
    else None."""
    bodies: tuple[str, ...]
    """Every span's captured bodies (base64 text), request and response."""
    hops: tuple[Any, ...]
    """``(hop, longest, hop, longest...)``: each hop that has spans, and its longest
    finished span in ns (None if none finished); queue spans count under :data:`QUEUE`."""

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        if self.odd_headers is not None:
            return self.odd_headers
        lines = self.header_text[1:-1].split("\n") if len(self.header_text) > 1 else []
        return tuple((name, value) for name, _, value in (x.partition("\0") for x in lines))

    def longest(self, hop: str | tuple[str]) -> tuple[bool, int | None]:
        """Whether ``hop`` (or :data:`QUEUE`) has spans, and its longest finished one."""
        hops = self.hops
        if hop not in hops:
            return False, None
        return True, hops[hops.index(hop) + 1]

    def summary(self) -> list[Any]:
        """The fields as a JSON-ready list: what a trace file's summary line carries, so a
        viewer makes a row without folding the trace's events (:meth:`from_summary`)."""
        hops = [_QUEUE_KEY if key is QUEUE else key for key in self.hops]
        odd = None if self.odd_headers is None else [list(pair) for pair in self.odd_headers]
        return [
            self.start,
            self.end,
            self.root_id,
            self.method,
            self.path,
            self.status,
            self.route,
            self.host,
            self.error,
            self.failed,
            self.header_text,
            odd,
            list(self.bodies),
            hops,
        ]

    @classmethod
    def from_summary(cls, fields: list[Any]) -> TraceInfo:
        """The info :meth:`summary` describes (raises ValueError/TypeError when ``fields``
        is not one: a trace file is user input)."""
        (start, end, root_id, method, path, status, route, host, error, failed, text, odd,
         bodies, hops) = fields  # fmt: skip
        if not (
            (start is None or type(start) is int)
            and (end is None or type(end) is int)
            and (root_id is None or type(root_id) is str)
            and (host is None or type(host) is str)
            and type(error) is bool
            and type(failed) is bool
            and type(text) is str
            and type(bodies) is list
            and type(hops) is list
        ):
            raise ValueError("not a trace summary")
        info = cls.__new__(cls)
        info.start, info.end, info.root_id = start, end, root_id
        info.method, info.path, info.status, info.route = method, path, status, route
        info.host, info.error, info.failed = host, error, failed
        info.header_text = text
        info.odd_headers = None if odd is None else tuple((n, v) for n, v in odd)
        info.bodies = tuple(bodies)
        if _QUEUE_KEY in hops:  # the only list among keys (str) and lengths (int, None)
            hops[hops.index(_QUEUE_KEY)] = QUEUE
        info.hops = tuple(hops)
        return info

    def __init__(self, trace: Trace) -> None:
        self._sum_up(trace.spans)

    @classmethod
    def of_spans(cls, spans: dict[str, Span]) -> TraceInfo:
        """The info of a trace made of ``spans`` (keyed by span id), without a
        :class:`Trace` around them (a trace file's writer sums up a request this way)."""
        info = cls.__new__(cls)
        info._sum_up(spans)
        return info

    def _sum_up(self, spans: dict[str, Span]) -> None:
        order = HOP_ORDER.get
        first = end = root_id = host = method = path = status = route = None
        # (rank, start) of the span each value came from: the outermost hop, earliest.
        no = (99, 0)
        root_at = host_at = method_at = path_at = status_at = route_at = no
        error = failed = False
        headers: list[tuple[str, str]] = []
        bodies: list[str] = []
        hops: dict[str | tuple[str], int | None] = {}
        for span in spans.values():
            attrs = span.attrs
            start, stop = span.start, span.end
            if start is not None and (first is None or start < first):
                first = start
            hop = span.hop
            at = (order(hop, 4) if type(hop) is str else 4, start or 0)
            queue = "span.kind" in attrs and attrs["span.kind"] == "queue"
            if at < root_at and not queue:
                parent = span.parent_id
                if parent is None or parent not in spans:
                    end, root_id, root_at = stop, span.span_id, at
            if "http.request.method" in attrs and at < method_at:
                method, method_at = attrs["http.request.method"], at
            if "url.path" in attrs and at < path_at:
                path, path_at = attrs["url.path"], at
            if "http.response.status_code" in attrs:
                if at < status_at:
                    status, status_at = attrs["http.response.status_code"], at
            elif stop is None and span.events and at < status_at:
                # A running span (a stream, a long download) whose response head went
                # out: its status is known before its end attributes carry it.
                head = _head_status(span.events)
                if head is not None:
                    status, status_at = head, at
            if "http.route" in attrs and at < route_at:
                route, route_at = attrs["http.route"], at
            if "http.request.headers" in attrs:
                pairs = _text_pairs(attrs["http.request.headers"])
                if pairs:
                    headers += pairs
                    if at < host_at:
                        found = _host_header(pairs)
                        if found is not None:
                            host, host_at = found, at
            if "server.address" in attrs and at < host_at:
                address = attrs["server.address"]
                if type(address) is str:
                    host, host_at = address, at
            if "http.response.headers" in attrs:
                headers += _text_pairs(attrs["http.response.headers"])
            if "http.request.body" in attrs:
                body = attrs["http.request.body"]
                if body and type(body) is str:
                    bodies.append(body)
            if "http.response.body" in attrs:
                body = attrs["http.response.body"]
                if body and type(body) is str:
                    bodies.append(body)
            if attrs.get("error"):
                error = failed = True
            elif not failed and span.events:
                for event in span.events:
                    if event.name == "exception":
                        failed = True
                        break
            key = QUEUE if queue else hop if type(hop) is str else ""
            if start is None or stop is None:
                if key not in hops:
                    hops[key] = None
            else:
                longest = hops.get(key)
                if longest is None or stop - start > longest:
                    hops[key] = stop - start
        self.start, self.end, self.root_id = first, end, root_id
        self.method, self.path, self.status, self.route = method, path, status, route
        self.host = host
        self.error, self.failed = error, failed
        text = "\n" + "".join([f"{name}\0{value}\n" for name, value in headers])
        if text.count("\n") != len(headers) + 1 or text.count("\0") != len(headers):
            self.header_text, self.odd_headers = "\n", tuple(headers)
        else:
            self.header_text, self.odd_headers = text, None
        self.bodies = tuple(bodies)
        self.hops = tuple(chain.from_iterable(hops.items()))


#: The events that carry a response head's status, and the attribute holding it: the
#: app's and the proxy's ``response.start``, the server hop's ``response.head``.
_HEAD_EVENTS = {"response.start": "status", "response.head": "http.response.status_code"}


def _head_status(events: list[Event]) -> Any:
    """The status of the first response head among ``events`` (None if none was sent)."""
    for event in events:
        key = _HEAD_EVENTS.get(event.name)
        if key is not None:
            value = event.attrs.get(key)
            if value is not None:
                return value
    return None


def _text_pairs(headers: Any) -> list[tuple[str, str]]:
    """The text pairs of a header list, names lowercased (anything else is skipped: a
    trace file is user input)."""
    if type(headers) is not list and type(headers) is not tuple:
        return []
    lower = _LOWER
    try:
        return [
            (lower[pair[0]], pair[1])
            for pair in headers
            if (type(pair) is list or type(pair) is tuple)
            and len(pair) == 2
            and type(pair[0]) is str
            and type(pair[1]) is str
        ]
    except KeyError:  # a name not seen before
        pass
    out = []
    for pair in headers:
        if (type(pair) is list or type(pair) is tuple) and len(pair) == 2:
            name, value = pair
            if type(name) is str and type(value) is str:
                low = lower.get(name)
                if low is None:
                    low = name.lower()
                    if len(lower) < 10_000:
                        lower[name] = low
                out.append((low, value))
    return out


def _host_header(pairs: list[tuple[str, str]]) -> str | None:
    for name, value in pairs:
        if name == "host" or name == ":authority":
            return _strip_port(value) if ":" in value else value
    return None


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host[1:]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host


class TraceBuilder:
    """Folds wire events into traces, keeping at most ``max_traces`` (oldest evicted)."""

    def __init__(self, max_traces: int | None = None) -> None:
        self.traces: OrderedDict[str, Trace] = OrderedDict()
        self.max_traces = max_traces
        self.dropped = 0
        self.evicted = 0

    def add(self, event: dict[str, Any]) -> Trace | None:
        """Apply one event; returns the trace it touched (None for non-trace events)."""
        kind = event.get("kind")
        if kind == "dropped":
            self.dropped += int(event.get("count", 0))
            return None
        if kind not in ("span_start", "span_end", "event"):
            raise ValueError(f"unknown event kind {kind!r}")
        trace_id = event.get("trace_id")
        span_id = event.get("span_id")
        if not isinstance(trace_id, str) or not isinstance(span_id, str):
            raise ValueError("event without trace_id/span_id")
        # Check everything before touching a trace: a bad event must leave no trace behind.
        ts = event.get("ts")
        attrs = event.get("attrs") or {}
        if not isinstance(ts, int) or not isinstance(attrs, dict):
            raise ValueError("event without an integer ts or with non-object attrs")
        trace = self.traces.get(trace_id)
        if trace is None:
            trace = self.traces[trace_id] = Trace(trace_id)
            if self.max_traces is not None and len(self.traces) > self.max_traces:
                self.traces.popitem(last=False)
                self.evicted += 1
        trace._info = None
        span = trace.spans.get(span_id)
        if span is None:
            span = trace.spans[span_id] = Span(trace_id, span_id)
        if kind == "span_start":
            span.parent_id = event.get("parent_id")
            span.hop = event.get("hop", span.hop)
            span.name = event.get("name", span.name)
            span.start = ts
            span.attrs = {**attrs, **span.attrs}
        elif kind == "span_end":
            span.end = ts
            if "name" in event:
                span.name = event["name"]
            span.attrs.update(attrs)
        else:
            name = event.get("name", "")
            span.events.append(Event(name, ts, attrs))
            if name == "exception":
                # An exception can arrive after its span ended (Starlette's error
                # middleware sends the 500, then re-raises): the span is in error all the same.
                span.attrs["error"] = True
        return trace

    def extend(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.add(event)


def assemble(events: Iterable[dict[str, Any]]) -> list[Trace]:
    builder = TraceBuilder()
    builder.extend(events)
    return list(builder.traces.values())
