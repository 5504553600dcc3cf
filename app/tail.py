"""``hopscope tail``: one line per finished request, like an access log with hops.

Events are folded into traces as they come; a trace's line is printed ``hold`` seconds
after its root span ends, and the trace is then forgotten, so memory stays bounded
however long the tail runs.  The hold is there because one request's spans come from
several processes, each sending in batches: the proxy's client span ends last but its
records can arrive before the app's, and a background task is recorded after the
response.  "After" is measured against the newest event seen and, live, against the
clock too (a ticker prints lines when traffic stops).  Events that arrive for a trace
already printed are ignored rather than printed as a second, partial line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

import click
from hopscope.tracing.model import Span, Trace, TraceBuilder

__all__ = ["Tail", "format_line"]

Event = dict[str, Any]

_HOP_ORDER = ("client", "proxy", "queue", "server", "app")
_STATUS_COLOURS = {2: "green", 3: "cyan", 4: "yellow", 5: "red"}


def _ms(ns: int | None) -> str:
    return "?" if ns is None else f"{ns / 1e6:.1f}ms"


def _clock(ns: int | None) -> str:
    if ns is None:
        return "--:--:--.---"
    return datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S.%f")[:-3]


def _top_level(trace: Trace, span: Span) -> bool:
    """True when no ancestor of ``span`` in this trace belongs to the same hop."""
    seen: set[str] = set()
    parent_id = span.parent_id
    while parent_id is not None and parent_id in trace.spans and parent_id not in seen:
        seen.add(parent_id)
        parent = trace.spans[parent_id]
        if parent.hop == span.hop:
            return False
        parent_id = parent.parent_id
    return True


def hop_times(trace: Trace) -> list[tuple[str, int, int]]:
    """``(name, total ns, count)``: each hop's outermost spans, then user spans by name."""
    hops: dict[str, list[int]] = {}
    user: dict[str, list[int]] = {}
    for span in trace.spans.values():
        duration = span.duration_ns
        if duration is None:
            continue
        if span.attrs.get("span.kind") == "user":
            bucket = user.setdefault(span.name or "span", [0, 0])
        elif span.name == "background":
            bucket = user.setdefault("background", [0, 0])
        elif span.attrs.get("span.kind") == "queue":
            # Waiting in front of the server is not the server's time.
            bucket = hops.setdefault("queue", [0, 0])
        elif _top_level(trace, span):
            bucket = hops.setdefault(span.hop, [0, 0])
        else:
            continue
        bucket[0] += duration
        bucket[1] += 1
    order = {hop: index for index, hop in enumerate(_HOP_ORDER)}
    ordered = sorted(hops.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return [(n, t, c) for n, (t, c) in ordered] + [(n, t, c) for n, (t, c) in user.items()]


def format_line(trace: Trace, color: bool = False) -> str:
    """``HH:MM:SS.mmm METHOD /path [route] STATUS TOTAL hop=ms ...``."""
    root = trace.root
    method = trace.method
    if root is not None and root.attrs.get("network.protocol.name") == "websocket":
        method = "WS"
    path = trace.path
    if path is None:
        path = root.name if root is not None else "?"
    parts = [_clock(trace.start), method or "-", path]
    route = trace.route
    if route and route != path:
        parts.append(f"[{route}]")
    status = trace.status
    if status is None and root is not None and root.attrs.get("websocket.accepted"):
        status = 101  # the handshake's Switching Protocols
    status_text = str(status) if status is not None else "---"
    if color and status is not None:
        status_text = click.style(status_text, fg=_STATUS_COLOURS.get(status // 100), bold=True)
    parts.append(status_text)
    parts.append(_ms(trace.duration_ns))
    for name, total, count in hop_times(trace):
        parts.append(f"{name}={_ms(total)}" + (f"x{count}" if count > 1 else ""))
    types = _exception_types(trace)
    if types or trace.error:
        parts.append("error" + (f"={','.join(types)}" if types else ""))
    if any(s.attrs.get("disconnected") for s in trace.spans.values()):
        parts.append("client-gone")
    return " ".join(parts)


def _exception_types(trace: Trace) -> list[str]:
    """Short names of the exceptions raised in the trace, first seen first."""
    names: dict[str, None] = {}
    for span in sorted(trace.spans.values(), key=lambda s: s.start or 0):
        for event in span.events:
            if event.name == "exception" and event.attrs.get("exception.type"):
                names[str(event.attrs["exception.type"]).rpartition(".")[2]] = None
        if span.attrs.get("exception.type"):
            names[str(span.attrs["exception.type"]).rpartition(".")[2]] = None
    return list(names)


class Tail:
    """Turns a stream of wire events into printed lines.

    ``max_in_flight`` caps unfinished traces (the oldest are forgotten, counted in
    :attr:`evicted`); ``remember`` is how many printed trace ids are kept to ignore
    their stragglers.
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
    ) -> None:
        self.out = out if out is not None else sys.stdout
        if color is None:
            isatty = getattr(self.out, "isatty", None)
            color = bool(isatty and isatty())
        self.color = color
        self.builder = TraceBuilder(max_traces=max_in_flight)
        self._done: OrderedDict[str, None] = OrderedDict()
        self._held: dict[str, Trace] = {}
        self._remember = remember
        self._hold_ns = int(hold * 1e9)
        self._live = live
        self._newest = 0
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        self.printed = 0
        self.dropped = 0
        self.malformed = 0

    @property
    def evicted(self) -> int:
        return self.builder.evicted

    @property
    def in_flight(self) -> int:
        return len(self.builder.traces)

    def feed(self, events: Iterable[Event]) -> list[str]:
        """Fold a batch of events; print and return the lines of requests it finished.

        The whole batch is folded before any line is made, so spans that finish together
        (a response and the work right after it) are reported together.
        """
        with self._lock:
            if self._live and self._hold_ns and self._ticker is None:
                self._ticker = threading.Thread(
                    target=self._tick_forever, name="hopscope-tail", daemon=True
                )
                self._ticker.start()
            return self._feed(events)

    def _feed(self, events: Iterable[Event]) -> list[str]:
        touched: dict[str, Trace] = {}
        notes: list[str] = []
        for event in events:
            if not isinstance(event, dict):
                self.malformed += 1
                continue
            if event.get("kind") == "dropped":
                count = event.get("count")
                if isinstance(count, int) and count > 0:
                    self.dropped += count
                    pid = (event.get("attrs") or {}).get("process.pid")
                    where = f" by pid {pid}" if pid is not None else ""
                    notes.append(
                        f"!! {count} events dropped{where} (queue full or collector unreachable)"
                    )
                continue
            if event.get("trace_id") in self._done:
                continue
            try:
                trace = self.builder.add(event)
            except (KeyError, TypeError, ValueError):
                self.malformed += 1
                continue
            if trace is not None:
                touched[trace.trace_id] = trace
                ts = event.get("ts")
                if isinstance(ts, int) and ts > self._newest:
                    self._newest = ts
        for trace_id, trace in touched.items():
            try:
                if trace.end is not None:
                    self._held[trace_id] = trace
            except TypeError:  # timestamps of the wrong type in untrusted data
                pass
        lines = notes + self._due(self._held.values())
        self._write(lines)
        return lines

    def _due(self, candidates: Iterable[Trace], flush: bool = False) -> list[str]:
        """Lines for finished traces whose hold has passed (all finished ones on flush)."""
        now = max(self._newest, time.time_ns()) if self._live else self._newest
        ready: list[tuple[int, str, Trace]] = []
        for trace in list(candidates):
            trace_id = trace.trace_id
            try:
                end = trace.end
            except TypeError:  # timestamps of the wrong type in untrusted data
                end = None
            if self.builder.traces.get(trace_id) is not trace:
                self._held.pop(trace_id, None)  # evicted from a full builder meanwhile
                continue
            if end is None:
                continue
            if flush or end + self._hold_ns <= now:
                ready.append((end, trace_id, trace))
        lines: list[str] = []
        for _, trace_id, trace in sorted(ready, key=lambda item: item[0]):
            try:
                line = format_line(trace, self.color)
            except (TypeError, ValueError):
                self.malformed += 1
                line = None
            self._forget(trace_id)
            if line is not None:
                lines.append(line)
                self.printed += 1
        return lines

    def _write(self, lines: list[str]) -> None:
        for line in lines:
            self.out.write(line + "\n")
        if lines:
            self.out.flush()

    def tick(self) -> list[str]:
        """Print what became due with the passing of time (live tails call this)."""
        with self._lock:
            lines = self._due(self._held.values())
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
            lines = self._due(self.builder.traces.values(), flush=True)
            self._write(lines)
            return lines

    def _forget(self, trace_id: str) -> None:
        self._held.pop(trace_id, None)
        self.builder.traces.pop(trace_id, None)
        self._done[trace_id] = None
        if len(self._done) > self._remember:
            self._done.popitem(last=False)

    def unfinished(self) -> int:
        """How many requests started but never ended (in what was seen)."""
        return len(self.builder.traces)
