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
from typing import Any

__all__ = ["Event", "Span", "Trace", "TraceBuilder", "assemble"]


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

    @property
    def root(self) -> Span | None:
        """The outermost span: among those whose parent is not in this trace, the one of the
        outermost hop (client, proxy, server, app), earliest first.  A queue span is never
        the root: it is waiting in front of a hop, not a hop."""
        best: Span | None = None
        for span in self.spans.values():
            if span.parent_id is not None and span.parent_id in self.spans:
                continue
            if span.attrs.get("span.kind") == "queue":
                continue
            if best is None or _outer_first(span) < _outer_first(best):
                best = span
        return best

    @property
    def start(self) -> int | None:
        starts = [s.start for s in self.spans.values() if s.start is not None]
        return min(starts) if starts else None

    @property
    def end(self) -> int | None:
        root = self.root
        return root.end if root is not None else None

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def duration_ns(self) -> int | None:
        start, end = self.start, self.end
        return None if start is None or end is None else end - start

    def children(self, span: Span) -> list[Span]:
        return sorted(
            (s for s in self.spans.values() if s.parent_id == span.span_id),
            key=lambda s: s.start or 0,
        )

    def by_hop(self, hop: str) -> list[Span]:
        return [s for s in self.spans.values() if s.hop == hop]

    def _attr(self, key: str) -> Any:
        for span in sorted(self.spans.values(), key=_outer_first):
            if key in span.attrs:
                return span.attrs[key]
        return None

    @property
    def method(self) -> str | None:
        value = self._attr("http.request.method")
        return str(value) if value is not None else None

    @property
    def path(self) -> str | None:
        value = self._attr("url.path")
        return str(value) if value is not None else None

    @property
    def status(self) -> int | None:
        value = self._attr("http.response.status_code")
        return int(value) if value is not None else None

    @property
    def route(self) -> str | None:
        value = self._attr("http.route")
        return str(value) if value is not None else None

    @property
    def error(self) -> bool:
        return any(span.attrs.get("error") for span in self.spans.values())


_HOP_ORDER = {"client": 0, "proxy": 1, "server": 2, "app": 3}


def _outer_first(span: Span) -> tuple[int, int]:
    return (_HOP_ORDER.get(span.hop, 4), span.start or 0)


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
