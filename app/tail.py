"""``hopscope tail``: one line per finished request, like an access log with hops.

Events are folded into traces as they come; a trace's line is printed ``hold`` seconds
after its root span ends (up to ``wait`` seconds more while a span below still runs:
see :class:`Tail`), and the trace is then forgotten, so memory stays bounded
however long the tail runs.  The hold is there because one request's spans come from
several processes, each sending in batches: the proxy's client span ends last but its
records can arrive before the app's, and a background task is recorded after the
response.  "After" is measured against the newest event seen and, live, against the
clock too (a ticker prints lines when traffic stops).  Events that arrive for a trace
already printed are ignored rather than printed as a second, partial line.

Why not :class:`~hopscope.tracing.model.TraceBuilder`: a tail runs next to the apps it
watches (in the proxy's recording child, in ``hopscope run``), so its CPU is taken from
their throughput.  Full traces keep every attribute, header and event, and their summary
(:class:`~hopscope.tracing.model.TraceInfo`) works out header text and bodies a line
never shows.  A tail keeps only what the line reads, per span (:class:`_Span`), and
picks the root, method, path, status and route by the same rules as ``TraceInfo``, so
the lines are the same (tests/test_tail.py checks that against the model).
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from datetime import datetime
from operator import itemgetter
from typing import Any, TextIO

import click
from hopscope.tracing.model import Trace
from hopscope.tracing.proxyrecord import (
    CONNECT,
    PROXY_START,
    REQUEST_BODY,
    RESPONSE_BODY,
    RESPONSE_START,
    RETRY,
    SENT,
)
from hopscope.tracing.records import normalise_attrs, to_events
from hopscope.tracing.safetext import printable
from hopscope.tracing.sinks import dropped_event

__all__ = ["Tail", "format_line"]

Event = dict[str, Any]

#: The order of the hops in a line (other hops after them, by name).
_HOP_RANK = {hop: rank for rank, hop in enumerate(("client", "proxy", "queue", "server", "app"))}
_LAST_HOP = len(_HOP_RANK)
_STATUS_COLOURS = {2: "green", 3: "cyan", 4: "yellow", 5: "red"}
#: How outer a hop is when choosing the root and the values a line shows: the ranks of
#: :class:`~hopscope.tracing.model.TraceInfo` (other hops rank 4).
_RANK = {"client": 0, "proxy": 1, "server": 2, "app": 3}
#: The only span attributes a line reads; the rest are not kept.
_KEYS = (
    "http.request.method",
    "url.path",
    "http.response.status_code",
    "http.route",
    "span.kind",
    "network.protocol.name",
    "websocket.accepted",
    "error",
    "exception.type",
    "disconnected",
)
_KINDS = frozenset({"span_start", "span_end", "event"})
#: The proxy record's item codes (its point events, which a line does not read).
_PROXY_CODES = frozenset(
    {PROXY_START, REQUEST_BODY, CONNECT, SENT, RETRY, RESPONSE_START, RESPONSE_BODY}
)
_UNKNOWN: Any = object()
#: The item codes of a plain request's record, in their order.
_USUAL_CODES = (PROXY_START, CONNECT, SENT, RESPONSE_START)
_HEX32 = "%032x"
_END = itemgetter(0)
_HEX16 = "%016x"


def _plain_proxy(record: Any) -> tuple[int, int, tuple[Any, ...]] | None:
    """``(trace_num, newest, quick)`` of a plain proxied request's record, else None.

    Plain: ended, one proxy span, only the proxy's own item codes, no error, distinct
    ids: its line is :meth:`_Trace._quick_line` of ``quick`` (the fields
    :attr:`_Trace.quick` keeps) unless more of the trace arrives; ``newest`` is the
    latest time in the record.  Anything else, down to a field that cannot be read (an
    exception), is left to :meth:`Tail._fold_proxy`, which judges it as the wire events
    would.  Why apart from it, checked in as few steps as the plain case allows (the
    usual four items without a loop): field by field in ``_fold_proxy``'s order, the
    checks cost the recording child more than the rest of the request's line.
    """
    if type(record) is not tuple or len(record) != 11:
        return None
    kind, begin, trace_num, client_num, parent_num, _, interface, request, end_at, end, items = (
        record
    )
    try:
        if (
            kind != "r"
            or interface != "proxy"
            or type(begin) is not int
            or type(trace_num) is not int
            or type(client_num) is not int
            or type(parent_num) is not int
            or type(end_at) is not int
            or type(request) is not tuple
            or type(end) is not tuple
            or type(items) not in (list, tuple)
            or len(request) != 12
            or len(end) != 16
        ):
            return None
        method, path, head_ts, proxy_num = request[0], request[3], request[8], request[11]
        end_ts, status = end[0], end[1]
        if (
            type(method) is not str
            or type(path) is not str
            or type(head_ts) is not int
            or type(proxy_num) is not int
            or type(end_ts) is not int
            or type(status) is not int
            or trace_num <= 0
            or client_num <= 0
            or parent_num < 0
            or proxy_num <= 0
            or status <= 0
            or end_at < 0
            or not end[3]  # the request went upstream
            or end[5] is None  # and reached an upstream connection
            or end[14] is not None  # no client_extra (an error, a disconnect)
            or end[15] is not None  # nor proxy_extra
            or parent_num == client_num
            or parent_num == proxy_num
            or client_num == proxy_num
        ):
            return None
        newest = end_ts if end_ts > begin else begin
        if head_ts > newest:
            newest = head_ts
        if len(items) == 5 and items[4] is None:
            start, connect, sent, response, _ = items
            usual = (
                type(start) is tuple
                and type(connect) is tuple
                and type(sent) is tuple
                and type(response) is tuple
                and (start[0], connect[0], sent[0], response[0]) == _USUAL_CODES
            )
        else:
            usual = False
        if usual:  # these four items, in this order: no loop
            proxy_ts, connect_ts, sent_ts, response_ts = start[1], connect[1], sent[1], response[1]
            if (
                type(proxy_ts) is not int
                or type(connect_ts) is not int
                or type(sent_ts) is not int
                or type(response_ts) is not int
                or proxy_ts < begin
            ):
                return None
            if (  # (the end is the latest, as a rule: max() only when it is not)
                proxy_ts > newest or connect_ts > newest or sent_ts > newest or response_ts > newest
            ):
                newest = max(newest, proxy_ts, connect_ts, sent_ts, response_ts)
            quick = (begin, client_num, parent_num, method, path, status, proxy_ts, proxy_num,
                     end[4], end_ts)  # fmt: skip
            return trace_num, newest, quick
        proxy_ts = None
        for item in items:
            if item is None:
                break
            if type(item) is not tuple:
                return None
            code = item[0]
            ts = item[1]
            if type(ts) is not int:
                return None
            if code == PROXY_START:
                if proxy_ts is not None:
                    return None
                proxy_ts = ts
            elif code not in _PROXY_CODES:
                return None
            if ts > newest:
                newest = ts
        if proxy_ts is None or proxy_ts < begin:
            return None
    except Exception:  # a field that is not what it should be: _fold_proxy judges it
        return None
    quick = (begin, client_num, parent_num, method, path, status, proxy_ts, proxy_num,
             end[4], end_ts)  # fmt: skip
    return trace_num, newest, quick


def _ms(ns: int | None) -> str:
    return "?" if ns is None else f"{ns / 1e6:.1f}ms"


#: The last second :func:`_clock` formatted, and its text: lines come in time order, so
#: most of them are in the second of the line before.
_second: tuple[int, str] = (0, "")
#: ``(low, high, text)``: every time in ``[low, high)`` ns shows as ``text`` (the inner
#: part of the millisecond :func:`_clock` formatted last, see there).
_millisecond: tuple[int, int, str] = (0, 0, "")
#: Times up to this many ns (the year 2096) are seconds as a float to 0.25 µs or better.
_CLOCK_EXACT = 4 * 10**18


def _clock(ns: int | None) -> str:
    """``datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S.%f")[:-3]``, formatting each
    second once: the microseconds are rounded as ``fromtimestamp`` rounds them (half to
    even, into the next second when they round up to it).

    A time 1 µs or more inside its millisecond shows that millisecond however the float
    rounds (to 0.25 µs or better below :data:`_CLOCK_EXACT`): its text is made from the
    integer, and kept for the next times in the same part of that millisecond (a line's
    time is often in the millisecond of the line before, at thousands of requests a
    second).  Only times near a millisecond's edges take the float path."""
    global _second, _millisecond
    if ns is None:
        return "--:--:--.---"
    low, high, text = _millisecond
    if low <= ns < high:
        return text
    if type(ns) is int and 0 < ns < _CLOCK_EXACT:
        inner = ns % 1_000_000
        if 1000 <= inner < 999_000:  # the float's rounding cannot move it: integers do
            second = ns // 1_000_000_000
            cached = _second
            if cached[0] != second or not cached[1]:
                cached = _second = (second, datetime.fromtimestamp(second).strftime("%H:%M:%S"))
            text = f"{cached[1]}.{ns // 1_000_000 % 1000:03d}"
            low = ns - inner
            _millisecond = (low + 1000, low + 999_000, text)
            return text
    frac, whole = math.modf(ns / 1e9)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    cached = _second
    if cached[0] != second or not cached[1]:
        cached = _second = (second, datetime.fromtimestamp(second).strftime("%H:%M:%S"))
    return f"{cached[1]}.{micros // 1000:03d}"


def _kept(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: attrs[key] for key in _KEYS if key in attrs}


def _status(status: Any) -> dict[str, Any]:
    """``normalise_attrs({"http.response.status_code": status or None})``, quicker for
    an int."""
    if type(status) is int and status:
        return {"http.response.status_code": status}
    return normalise_attrs({"http.response.status_code": status or None})


def _end_attrs(extra: dict[str, Any] | None, status: Any) -> dict[str, Any]:
    """A proxy record's span end attributes: the kept ``extra`` ones and the status."""
    if not extra:
        return _status(status)
    attrs = _kept(extra)
    attrs["http.response.status_code"] = status or None
    return normalise_attrs(attrs)


def _normalised(value: Any) -> Any:
    """``value`` as a point event's attribute after ``to_events`` normalised it."""
    return normalise_attrs({"value": value}).get("value")


def _inherited(process: dict[str, Any] | None) -> dict[str, Any] | None:
    """The line attributes a process's info gives every span start it sends (none, from
    hopscope's own recorders)."""
    if not process:
        return None
    return _kept(process) or None


#: The events that carry a response head's status, and the attribute holding it
#: (``TraceInfo``'s: a running span's status is its first head's).
_HEAD_EVENTS = {"response.start": "status", "response.head": "http.response.status_code"}


class _Span:
    """What a line needs of a span: its place in the tree, its times, a few attributes
    (:data:`_KEYS`), the exception types of its ``exception`` events, in order, and the
    status of its first response head (:data:`_HEAD_EVENTS`)."""

    __slots__ = ("attrs", "end", "head", "hop", "name", "parent_id", "raised", "start")

    def __init__(self) -> None:
        # The defaults of tracing.model.Span: a span known only by an event or its end.
        self.parent_id: Any = None
        self.hop: Any = "app"
        self.name: Any = ""
        self.start: int | None = None
        self.end: int | None = None
        self.attrs: dict[str, Any] = {}
        self.raised: list[Any] | None = None
        self.head: Any = None


class _Trace:
    """A request's spans, folded from wire events the way ``TraceBuilder.add`` folds
    them (so the same events give the same line).

    A plain proxied request (see :func:`_plain_proxy`) is kept as :attr:`quick`, the
    few fields of its record a line reads, instead of two spans: why, the spans and
    their attribute dicts, made and walked for every request, were most of the
    recording child's work.  Anything else folded into the trace, or a look at
    :attr:`spans`, makes the spans first (:meth:`_materialize`).
    """

    __slots__ = ("_end", "_root", "_spans", "quick", "trace_id")

    def __init__(self, trace_id: str, quick: tuple[Any, ...] | None = None) -> None:
        self.trace_id = trace_id
        self._spans: dict[Any, _Span] = {}
        #: ``(begin, client_num, parent_num, method, path, status, proxy_start,
        #: proxy_num, upstream_status, end)`` of a plain proxied request (its ids as
        #: the record's numbers: made hex only if the spans are made), or None.
        self.quick = quick
        self._end: Any = _UNKNOWN if quick is None else quick[9]
        self._root: _Span | None = None

    @property
    def spans(self) -> dict[Any, _Span]:
        if self.quick is not None:
            self._materialize()
        return self._spans

    def _materialize(self) -> None:
        """The spans :attr:`quick` stands for, as :meth:`Tail._fold_proxy` folds them."""
        quick = self.quick
        assert quick is not None
        self.quick = None
        self._end = _UNKNOWN
        begin, client_num, parent_num, method, path, status, proxy_ts, proxy_num = quick[:8]
        up_status, end = quick[8:]
        client_id = _HEX16 % client_num
        proxy_id = _HEX16 % proxy_num
        parent_id = _HEX16 % parent_num if parent_num else None
        name = f"{method} {path}"
        kept = {"http.request.method": method, "url.path": path}
        self.started(client_id, begin, parent_id, "client", name, kept, None)
        kept = {"http.request.method": method}
        self.started(proxy_id, proxy_ts, client_id, "proxy", name, kept, None)
        self.ended(proxy_id, end, _status(up_status))
        self.ended(client_id, end, _status(status))

    def _quick_line(self, quick: tuple[Any, ...], color: bool) -> str:
        """:meth:`line` of the two spans :attr:`quick` stands for (a client span, the
        root, and its proxy span, both ended, no error, no route)."""
        begin, _, _, method, path, status, proxy_ts, _, _, end = quick
        if not (path.isprintable() and method.isprintable()):  # never raw to the terminal
            method, path = printable(method), printable(path)
        total = f"{(end - begin) / 1e6:.1f}ms"  # (formatted once, printed twice)
        if color:
            status = click.style(str(status), fg=_STATUS_COLOURS.get(status // 100), bold=True)
        return (
            f"{_clock(begin)} {method or '-'} {path} {status} {total} "
            f"client={total} proxy={(end - proxy_ts) / 1e6:.1f}ms"
        )

    def fold(self, kind: str, span_id: str, ts: int, attrs: dict[str, Any], event: Event) -> None:
        if self.quick is not None:
            self._materialize()
        self._end = _UNKNOWN
        span = self._spans.get(span_id)
        if span is None:
            span = self._spans[span_id] = _Span()
        if kind == "span_start":
            span.parent_id = event.get("parent_id")
            span.hop = event.get("hop", span.hop)
            span.name = event.get("name", span.name)
            span.start = ts
            kept = _kept(attrs)
            if kept:
                span.attrs = {**kept, **span.attrs}  # what the end said is kept
        elif kind == "span_end":
            span.end = ts
            if "name" in event:
                span.name = event["name"]
            kept = _kept(attrs)
            if kept:
                span.attrs.update(kept)
        elif (name := event.get("name", "")) in _HEAD_EVENTS:
            if span.head is None:
                span.head = attrs.get(_HEAD_EVENTS[name])
        elif name == "exception":
            raised = attrs.get("exception.type")
            if raised:
                if span.raised is None:
                    span.raised = [raised]
                else:
                    span.raised.append(raised)
            # It can arrive after its span ended: the span is in error all the same.
            span.attrs["error"] = True

    # -- folding without events (Tail._fold_proxy): what fold does for each kind --------
    def span(self, span_id: str) -> _Span:
        """The span an event names (made, with the defaults, when it is not known yet)."""
        if self.quick is not None:
            self._materialize()
        span = self._spans.get(span_id)
        if span is None:
            span = self._spans[span_id] = _Span()
        return span

    def started(
        self,
        span_id: str,
        ts: int,
        parent_id: str | None,
        hop: str,
        name: str,
        kept: dict[str, Any],
        inherited: dict[str, Any] | None,
    ) -> None:
        """A span start whose line attributes are ``kept`` (normalised), the emitting
        process's (``inherited``) filling in the ones it lacks."""
        if self.quick is not None:
            self._materialize()
        span = self._spans.get(span_id)
        if span is None:
            span = self._spans[span_id] = _Span()
        span.parent_id = parent_id
        span.hop = hop
        span.name = name
        span.start = ts
        if inherited:
            for key, value in inherited.items():
                kept.setdefault(key, value)
        if kept:
            attrs = span.attrs
            span.attrs = {**kept, **attrs} if attrs else kept

    def ended(self, span_id: str, ts: int, kept: dict[str, Any]) -> None:
        if self.quick is not None:
            self._materialize()
        span = self._spans.get(span_id)
        if span is None:
            span = self._spans[span_id] = _Span()
        span.end = ts
        if kept:
            span.attrs.update(kept)

    def root(self) -> _Span | None:
        """The outermost span whose parent is not in the trace (never a queue span):
        ``TraceInfo.root_id``'s rule (not asked of a :attr:`quick` trace)."""
        spans = self._spans
        root = None
        root_at = (99, 0)
        for span in spans.values():
            hop = span.hop
            at = (_RANK.get(hop, 4) if type(hop) is str else 4, span.start or 0)
            if at < root_at and span.attrs.get("span.kind") != "queue":
                parent = span.parent_id
                if parent is None or parent not in spans:
                    root, root_at = span, at
        return root

    @property
    def end(self) -> int | None:
        """The root span's end (None while it runs, or when the ids make no tree)."""
        end = self._end
        if end is _UNKNOWN:
            try:
                root = self._root = self.root()
            except TypeError:  # an unhashable parent id in untrusted data
                root = self._root = None
            end = self._end = root.end if root is not None else None
        return end  # type: ignore[no-any-return]

    def line(self, color: bool = False) -> str:
        """``HH:MM:SS.mmm METHOD /path [route] STATUS TOTAL hop=ms ...``."""
        quick = self.quick
        if quick is not None:
            return self._quick_line(quick, color)
        spans = self._spans
        root = self._root if self._end is not _UNKNOWN else self.root()
        # The values of the outermost hop that has them, earliest first (TraceInfo's).
        no = (99, 0)
        method = path = status = route = start = None
        method_at = path_at = status_at = route_at = no
        error = gone = raised = False
        # Each hop's outermost spans, then user spans by name: (total ns, count of
        # finished spans, count of spans still running).
        hops: dict[Any, list[int]] = {}
        user: dict[Any, list[int]] = {}
        for span in spans.values():
            attrs = span.attrs
            first, last = span.start, span.end
            if first is not None:
                if start is None or first < start:
                    start = first
                kind = attrs.get("span.kind") if attrs else None
                if kind == "user":
                    bucket = user.setdefault(span.name or "span", [0, 0, 0])
                elif span.name == "background":
                    bucket = user.setdefault("background", [0, 0, 0])
                elif kind == "queue":
                    # Waiting in front of the server is not the server's time.
                    bucket = hops.setdefault("queue", [0, 0, 0])
                elif self._top_level(span):
                    bucket = hops.setdefault(span.hop, [0, 0, 0])
                else:
                    bucket = None
                if bucket is not None:
                    if last is not None:
                        bucket[0] += last - first
                        bucket[1] += 1
                    else:  # still running when the line is made (see Tail's wait)
                        bucket[2] += 1
            if span.raised:
                raised = True
            if last is None and span.head is not None and "http.response.status_code" not in attrs:
                # A running span whose response head went out (a stream): its status.
                at = (_RANK.get(span.hop, 4) if type(span.hop) is str else 4, first or 0)
                if at < status_at:
                    status, status_at = span.head, at
            if not attrs:
                continue
            if attrs.get("error"):
                error = True
            if attrs.get("disconnected"):
                gone = True
            if "exception.type" in attrs:
                raised = True
            hop = span.hop
            at = (_RANK.get(hop, 4) if type(hop) is str else 4, first or 0)
            if "http.request.method" in attrs and at < method_at:
                method, method_at = attrs["http.request.method"], at
            if "url.path" in attrs and at < path_at:
                path, path_at = attrs["url.path"], at
            if "http.response.status_code" in attrs and at < status_at:
                status, status_at = attrs["http.response.status_code"], at
            if "http.route" in attrs and at < route_at:
                route, route_at = attrs["http.route"], at
        end = root.end if root is not None else None
        root_attrs = root.attrs if root is not None else {}
        if method is not None:
            method = str(method)
        if root_attrs.get("network.protocol.name") == "websocket":
            method = "WS"
        if path is not None:
            path = str(path)
        else:
            path = root.name if root is not None else "?"
        parts = [_clock(start), method or "-", path]
        if route is not None:
            route = str(route)
            if route and route != path:
                parts.append(f"[{route}]")
        if status is not None:
            status = int(status)
        elif root_attrs.get("websocket.accepted"):
            status = 101  # the handshake's Switching Protocols
        status_index = len(parts)
        parts.append(str(status) if status is not None else "---")
        parts.append(_ms(None if start is None or end is None else end - start))
        if len(hops) == 2 and "client" in hops and "proxy" in hops:
            items = [("client", hops["client"]), ("proxy", hops["proxy"])]  # (sorted: a proxy's)
        elif len(hops) > 1:
            order = _HOP_RANK.get
            items = sorted(hops.items(), key=lambda item: (order(item[0], _LAST_HOP), item[0]))
        else:
            items = list(hops.items())
        for name, (total, count, running) in (*items, *user.items()):
            if not count:
                parts.append(f"{name}=running")
            else:
                parts.append(
                    f"{name}={total / 1e6:.1f}ms"
                    + (f"x{count}" if count > 1 else "")
                    + ("+running" if running else "")
                )
        types = self.exception_types() if raised else []
        if types or error:
            parts.append("error" + (f"={','.join(types)}" if types else ""))
        if gone:
            parts.append("client-gone")
        line = " ".join(parts)
        safe = line.isprintable()
        if not safe:  # text from the traffic (or an app) never reaches the terminal raw
            parts = [printable(part) for part in parts]
        if color and status is not None:
            shown = parts[status_index]
            parts[status_index] = click.style(
                shown, fg=_STATUS_COLOURS.get(status // 100), bold=True
            )
        elif safe:
            return line
        return " ".join(parts)

    def running(self) -> bool:
        """Whether a span that started has not ended (not asked of a :attr:`quick`
        trace: both its spans ended)."""
        for span in self._spans.values():
            if span.end is None and span.start is not None:
                return True
        return False

    def _top_level(self, span: _Span) -> bool:
        """True when no ancestor of ``span`` in this trace belongs to the same hop."""
        spans = self._spans
        parent_id = span.parent_id
        if parent_id is None or parent_id not in spans:
            return True
        seen: set[Any] = set()
        while parent_id is not None and parent_id in spans and parent_id not in seen:
            seen.add(parent_id)
            parent = spans[parent_id]
            if parent.hop == span.hop:
                return False
            parent_id = parent.parent_id
        return True

    def exception_types(self) -> list[str]:
        """Short names of the exceptions raised in the trace, first seen first."""
        names: dict[str, None] = {}
        for span in sorted(self._spans.values(), key=lambda s: s.start or 0):
            for raised in span.raised or ():
                names[str(raised).rpartition(".")[2]] = None
            if span.attrs.get("exception.type"):
                names[str(span.attrs["exception.type"]).rpartition(".")[2]] = None
        return list(names)


def format_line(trace: Trace, color: bool = False) -> str:
    """The tail line of an assembled trace (a viewer's, a file's)."""
    slim = _Trace(trace.trace_id)
    for span_id, span in trace.spans.items():
        kept = slim.spans[span_id] = _Span()
        kept.parent_id, kept.hop, kept.name = span.parent_id, span.hop, span.name
        kept.start, kept.end, kept.attrs = span.start, span.end, _kept(span.attrs)
        raised = [
            e.attrs["exception.type"]
            for e in span.events
            if e.name == "exception" and e.attrs.get("exception.type")
        ]
        kept.raised = raised or None
        for event in span.events:
            key = _HEAD_EVENTS.get(event.name)
            if key is not None and event.attrs.get(key) is not None:
                kept.head = event.attrs[key]
                break
    return slim.line(color)


class Tail:
    """Turns a stream of wire events into printed lines.

    ``max_in_flight`` caps unfinished traces (the oldest are forgotten, counted in
    :attr:`evicted`); ``remember`` is how many printed trace ids are kept to ignore
    their stragglers.

    A line is due ``hold`` seconds after its root span ends.  When a span of the trace
    is still running then (the client left early and the app has not noticed yet; a
    background task), the line waits up to ``wait`` seconds more for it, and is printed
    as soon as nothing runs: whoever reads the log wants every hop's time that is known
    within that window.  What still runs after it is printed as ``app=running``.  A
    tail with no hold does not wait either.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        color: bool | None = None,
        max_in_flight: int = 10_000,
        remember: int = 10_000,
        hold: float = 0.3,
        live: bool = True,
        wait: float = 2.0,
    ) -> None:
        self.out = out if out is not None else sys.stdout
        if color is None:
            isatty = getattr(self.out, "isatty", None)
            color = bool(isatty and isatty())
        self.color = color
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._max_in_flight = max_in_flight
        #: Printed trace ids (their stragglers are ignored), the oldest first in
        #: ``_done_order`` (a set and a deque: cheaper than one OrderedDict).
        self._done: set[str] = set()
        self._done_order: deque[str] = deque()
        self._held: dict[str, _Trace] = {}
        #: ``(due, n, trace_id, trace, end)`` of held traces, soonest due first (see
        #: :meth:`_due_held`): ``due`` is the root's ``end``, or ``end`` plus the wait
        #: for a trace found with spans running; entries whose trace moved on are
        #: skipped when popped.
        self._due_heap: list[tuple[int, int, str, _Trace, int]] = []
        self._pushes = itertools.count()
        self._remember = remember
        self._hold_ns = int(hold * 1e9)
        self._wait_ns = int(wait * 1e9) if self._hold_ns else 0
        self._live = live
        self._newest = 0
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        self.printed = 0
        self.dropped = 0
        self.malformed = 0
        self.evicted = 0

    @property
    def in_flight(self) -> int:
        return len(self._traces)

    def feed(self, events: Iterable[Event]) -> list[str]:
        """Fold a batch of events; print and return the lines of requests it finished.

        The whole batch is folded before any line is made, so spans that finish together
        (a response and the work right after it) are reported together.
        """
        with self._lock:
            self._start_ticker()
            return self._feed(events)

    def _start_ticker(self) -> None:
        if self._live and self._hold_ns and self._ticker is None:
            self._ticker = threading.Thread(
                target=self._tick_forever, name="hopscope-tail", daemon=True
            )
            self._ticker.start()

    def _feed(self, events: Iterable[Event]) -> list[str]:
        touched: dict[str, _Trace] = {}
        notes: list[str] = []
        self._fold(events, touched, notes)
        return self._finish(touched, notes)

    def _fold(self, events: Iterable[Event], touched: dict[str, _Trace], notes: list[str]) -> None:
        traces, done, kinds = self._traces, self._done, _KINDS
        newest = self._newest
        for event in events:
            if not isinstance(event, dict):
                self.malformed += 1
                continue
            kind = event.get("kind")
            if kind == "dropped":
                count = event.get("count")
                if isinstance(count, int) and count > 0:
                    self.dropped += count
                    pid = (event.get("attrs") or {}).get("process.pid")
                    where = f" by pid {pid}" if pid is not None else ""
                    notes.append(
                        f"!! {count} events dropped{where} (queue full or collector unreachable)"
                    )
                continue
            trace_id = event.get("trace_id")
            if isinstance(trace_id, str) and trace_id in done:
                continue
            span_id = event.get("span_id")
            ts = event.get("ts")
            attrs = event.get("attrs") or {}
            # Checked before anything is kept: a bad event leaves no trace behind.
            if (
                kind not in kinds
                or not isinstance(trace_id, str)
                or not isinstance(span_id, str)
                or not isinstance(ts, int)
                or not isinstance(attrs, dict)
            ):
                self.malformed += 1
                continue
            trace = traces.get(trace_id)
            if trace is None:
                trace = self._new_trace(trace_id)
            trace.fold(kind, span_id, ts, attrs, event)
            touched[trace_id] = trace
            if ts > newest:
                newest = ts
        self._newest = newest

    def _new_trace(self, trace_id: str, quick: tuple[Any, ...] | None = None) -> _Trace:
        traces = self._traces
        trace = traces[trace_id] = _Trace(trace_id, quick)
        if len(traces) > self._max_in_flight:
            traces.popitem(last=False)
            self.evicted += 1
        return trace

    def _finish(self, touched: dict[str, _Trace], notes: list[str]) -> list[str]:
        held, heap, pushes = self._held, self._due_heap, self._pushes
        for trace_id, trace in touched.items():
            end = trace._end  # (the end property, without its call when it is known)
            if end is _UNKNOWN:
                end = trace.end
            if end is not None:
                held[trace_id] = trace
                heapq.heappush(heap, (end, next(pushes), trace_id, trace, end))
        lines = notes + self._due_held()
        self._write(lines)
        return lines

    # -- records straight from the collector ------------------------------------------
    def feed_records(
        self, records: Iterable[Any], process: dict[str, Any] | None = None, dropped: int = 0
    ) -> int:
        """Fold a collector batch (its sender's ``process`` info and ``dropped`` count)
        and print the lines it finished; returns how many records could not be read.

        Why: in the proxy's recording child, making wire events of the proxy's ``"r"``
        records cost more CPU than the tail itself, and a line reads a handful of their
        fields.  Those records are folded directly (:meth:`_fold_proxy`), to the same
        spans the events would give; every other record goes through
        :func:`~hopscope.tracing.records.to_events` as before.  Only for a collector
        that keeps no events (no ``-o`` file, no OTLP export).
        """
        with self._lock:
            self._start_ticker()
            touched: dict[str, _Trace] = {}
            notes: list[str] = []
            failed = 0
            inherited = _inherited(process)  # the same for the whole batch
            traces, done = self._traces, self._done
            for record in records:
                # A plain proxied request, new to the tail: a few fields kept (_Trace).
                if inherited is None and (plain := _plain_proxy(record)) is not None:
                    trace_num, latest, quick = plain
                    # records.hex_id's text (to_bytes: half the cost of formatting).
                    trace_id = (
                        trace_num.to_bytes(16).hex()
                        if trace_num >> 128 == 0
                        else _HEX32 % trace_num
                    )
                    if trace_id in done:
                        continue
                    if trace_id not in traces:  # (as _new_trace does)
                        trace = traces[trace_id] = _Trace(trace_id, quick)
                        if len(traces) > self._max_in_flight:
                            traces.popitem(last=False)
                            self.evicted += 1
                        touched[trace_id] = trace
                        if latest > self._newest:
                            self._newest = latest
                        continue
                try:
                    if not (
                        type(record) is tuple
                        and len(record) == 11
                        and record[0] == "r"
                        and record[6] == "proxy"
                        and self._fold_proxy(record, process, touched, inherited)
                    ):
                        self._fold(to_events(record, process), touched, notes)
                except Exception:  # a record of the right kind but the wrong shape
                    failed += 1
            if dropped > 0 or failed:
                count = max(dropped, 0) + failed
                self._fold([dropped_event(count, process or {})], touched, notes)
            self._finish(touched, notes)
            return failed

    def _fold_proxy(
        self,
        record: tuple[Any, ...],
        process: dict[str, Any] | None,
        touched: dict[str, _Trace],
        inherited: dict[str, Any] | None,
    ) -> bool:
        """Fold a proxy ``"r"`` record as its wire events would fold (the order of
        :func:`~hopscope.tracing.proxyrecord.expand_proxy`, the attributes a line reads);
        False, with nothing folded, when it is not the shape this knows (the caller then
        takes the event path, which judges it as it always did)."""
        _, begin, trace_num, client_num, parent_num, _, _, request, end_at, end, items = record
        if not (
            type(trace_num) is int
            and trace_num > 0
            and type(client_num) is int
            and client_num > 0
            and type(parent_num) is int
            and parent_num >= 0
            and type(begin) is int
            and type(request) is tuple
            and len(request) == 12
            and type(request[8]) is int
            and type(request[11]) is int
            and request[11] > 0
            and type(end_at) is int
            and (end is None or (type(end) is tuple and len(end) == 16 and type(end[0]) is int))
            and type(items) in (list, tuple)
        ):
            return False
        # Checked (and whole records in it made into events) before anything is kept.
        whole: dict[int, list[Event]] = {}
        newest = max(begin, request[8])
        for index, item in enumerate(items):
            if item is None:
                break
            if type(item) is not tuple or not item or type(item[1]) is not int:
                return False
            code = item[0]
            if type(code) is str:
                whole[index] = to_events(item, process)
            elif code not in _PROXY_CODES:
                return False
            elif item[1] > newest:
                newest = item[1]
        # records.hex_id's text, for the ids checked above (to_bytes: half the cost).
        trace_id = trace_num.to_bytes(16).hex() if trace_num >> 128 == 0 else _HEX32 % trace_num
        if trace_id in self._done:
            return True
        trace = self._traces.get(trace_id)
        proxy_num = request[11]
        method, path = request[0], request[3]
        plain = type(method) is str and type(path) is str  # as normalising leaves them
        if trace is None:
            trace = self._new_trace(trace_id)
        trace._end = _UNKNOWN
        client_id = _HEX16 % client_num
        proxy_id = _HEX16 % proxy_num
        name = f"{method} {path}"
        kept = {"http.request.method": method, "url.path": path}
        trace.started(
            client_id, begin, _HEX16 % parent_num if parent_num else None, "client", name,
            kept if plain else normalise_attrs(kept), inherited,
        )  # fmt: skip
        ended = end_at >= 0 and end is not None
        proxy_known = False  # the proxy span exists (point events add nothing else to it)
        for index, item in enumerate(items):
            if index == end_at and ended:
                self._proxy_ends(trace, end, client_id, proxy_id)
                ended = False
            if item is None:
                break
            code = item[0]
            if code == PROXY_START:
                kept = {"http.request.method": method}
                trace.started(
                    proxy_id, item[1], client_id, "proxy", name,
                    kept if plain else normalise_attrs(kept), inherited,
                )  # fmt: skip
                proxy_known = True
            elif type(code) is int:
                if code != REQUEST_BODY and not proxy_known:  # (the client span exists)
                    trace.span(proxy_id)
                    proxy_known = True
                if code == RESPONSE_START:
                    span = trace.span(proxy_id)
                    if span.head is None:
                        head = item[2]  # (as to_events normalises it)
                        span.head = head if type(head) is int else _normalised(head)
            else:
                self._fold(whole[index], touched, [])
        if ended:
            self._proxy_ends(trace, end, client_id, proxy_id)
        if end is not None and end[0] > newest:
            newest = end[0]
        touched[trace_id] = trace
        if newest > self._newest:
            self._newest = newest
        return True

    @staticmethod
    def _proxy_ends(trace: _Trace, end: Any, client_id: str, proxy_id: str) -> None:
        """The spans' ends of :func:`~hopscope.tracing.proxyrecord.end_records`."""
        ts, status, proxy_ended, up_status, up_conn = end[0], end[1], end[3], end[4], end[5]
        if proxy_ended:
            # (a response.body.summary event before this end adds nothing to the span)
            extra = end[15]
            if up_conn is None:
                attrs: dict[str, Any] = normalise_attrs(_kept(extra)) if extra else {}
            else:
                attrs = _end_attrs(extra, up_status)
            trace.ended(proxy_id, ts, attrs)
        trace.ended(client_id, ts, _end_attrs(end[14], status))

    def _due_held(self) -> list[str]:
        """Lines for the held traces whose hold has passed, as :meth:`_due` makes them.

        Why a heap: live, a trace is held ``hold`` seconds (0.3) after its end, so at a
        few thousand requests a second about a thousand are held; looking at each of
        them at every batch and tick cost more than folding the requests themselves.
        Each time a trace is folded and has an end, it is pushed with that end, so the
        heap always has an entry with a held trace's current end.  They come off it in
        the order :meth:`_due` sorts them to (by end), and due as it judges them.  One
        with spans still running goes back in, due ``wait`` later (the next event
        folded into it pushes it with its end again).
        """
        now = max(self._newest, time.time_ns()) if self._live else self._newest
        limit = now - self._hold_ns
        heap, held, traces = self._due_heap, self._held, self._traces
        wait = self._wait_ns
        ready: list[tuple[str, _Trace]] = []
        while heap and heap[0][0] <= limit:
            _, n, trace_id, trace, end = heapq.heappop(heap)
            if held.get(trace_id) is not trace:
                continue  # printed, forgotten, or pushed again with its new end
            current = trace._end
            if current is _UNKNOWN:
                current = trace.end
            if current != end:
                continue
            if wait and end + wait > limit and trace.quick is None and trace.running():
                heapq.heappush(heap, (end + wait, n, trace_id, trace, end))
                continue
            del held[trace_id]  # (its line is made below; a stale duplicate is skipped)
            if traces.get(trace_id) is not trace:
                continue  # evicted from a full tail meanwhile
            ready.append((trace_id, trace))
        return self._lines(ready) if ready else []

    def _due(self, candidates: Iterable[_Trace], flush: bool = False) -> list[str]:
        """Lines for finished traces whose hold has passed (all finished ones on flush)."""
        now = max(self._newest, time.time_ns()) if self._live else self._newest
        ready: list[tuple[int, str, _Trace]] = []
        traces = self._traces
        for trace in list(candidates):
            trace_id = trace.trace_id
            if traces.get(trace_id) is not trace:
                self._held.pop(trace_id, None)  # evicted from a full tail meanwhile
                continue
            end = trace.end
            if end is None:
                continue
            due = end + self._hold_ns
            if flush or (
                due <= now
                and (due + self._wait_ns <= now or trace.quick is not None or not trace.running())
            ):
                ready.append((end, trace_id, trace))
        ready.sort(key=_END)
        for _, trace_id, _ in ready:
            self._held.pop(trace_id, None)
        return self._lines([(trace_id, trace) for _, trace_id, trace in ready])

    def _lines(self, ready: list[tuple[str, _Trace]]) -> list[str]:
        """The lines of ``ready`` traces (no longer held), in order; each is forgotten."""
        lines: list[str] = []
        color = self.color
        traces, done, order, remember = self._traces, self._done, self._done_order, self._remember
        for trace_id, trace in ready:
            quick = trace.quick
            try:
                if quick is not None:
                    line: str | None = trace._quick_line(quick, color)
                else:
                    line = trace.line(color)
            except (TypeError, ValueError, OverflowError, OSError):  # untrusted values
                self.malformed += 1
                line = None
            # (as _forget, the trace no longer held, and known: both callers checked)
            del traces[trace_id]
            done.add(trace_id)
            order.append(trace_id)
            if len(order) > remember:
                done.discard(order.popleft())
            if line is not None:
                lines.append(line)
        self.printed += len(lines)
        return lines

    def _write(self, lines: list[str]) -> None:
        if lines:
            self.out.write("\n".join(lines) + "\n")  # (one write for the batch)
            self.out.flush()

    def tick(self) -> list[str]:
        """Print what became due with the passing of time (live tails call this)."""
        with self._lock:
            lines = self._due_held()
            self._write(lines)
            return lines

    def _tick_forever(self) -> None:
        while not self._closed.wait(0.1):
            try:
                self.tick()
            except (BrokenPipeError, ValueError):  # the reader went away or out closed
                return

    def close(self) -> list[str]:
        """Print every finished request still held, and stop the ticker."""
        self._closed.set()
        with self._lock:
            lines = self._due(self._traces.values(), flush=True)
            self._write(lines)
            return lines

    def _forget(self, trace_id: str) -> None:
        self._held.pop(trace_id, None)
        self._traces.pop(trace_id, None)
        self._done.add(trace_id)
        self._done_order.append(trace_id)
        if len(self._done_order) > self._remember:
            self._done.discard(self._done_order.popleft())

    def unfinished(self) -> int:
        """How many requests started but never ended (in what was seen)."""
        return len(self._traces)
