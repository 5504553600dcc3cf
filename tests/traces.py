"""Looking into what a :class:`~hopscope.tracing.MemorySink` recorded, as the middleware
tests do: its one trace, the app span at its root, a span's own children and events;
and a sink as third parties write them, to compare with."""

from __future__ import annotations

import time
from typing import Any

from hopscope.tracing import MemorySink, Sink
from hopscope.tracing.model import Span, Trace
from hopscope.tracing.records import Record

__all__ = ["EmitOnlySink", "app_span", "events", "finished", "the_trace", "user_children"]


def the_trace(sink: MemorySink) -> Trace:
    """The one trace ``sink`` holds (fails when it holds another number)."""
    traces: list[Trace] = sink.traces()
    assert len(traces) == 1, traces
    return traces[0]


def finished(sink: MemorySink, count: int, timeout: float = 10.0) -> list[Trace]:
    """The sink's traces once ``count`` spans have ended (``timeout`` seconds at most):
    a server span can end after the client has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        traces: list[Trace] = sink.traces()
        spans = [span for trace in traces for span in trace.spans.values()]
        if len(spans) >= count and all(span.finished for span in spans):
            return traces
        assert time.monotonic() < deadline, f"the spans did not end: {traces}"
        time.sleep(0.02)


def app_span(trace: Trace) -> Span:
    """The root span of ``trace``, an ``app`` span."""
    root = trace.root
    assert root is not None and root.hop == "app"
    return root


def user_children(trace: Trace, parent: Span) -> list[Span]:
    """Children other than ``background``: how long an app takes to return after its
    response is wall-clock time, so a loaded machine can add a background span anywhere."""
    return [c for c in trace.children(parent) if c.name != "background"]


def events(span_: Span, name: str) -> list[dict[str, Any]]:
    """The attributes of each of ``span_``'s events called ``name``."""
    return [e.attrs for e in span_.events if e.name == name]


class EmitOnlySink(Sink):
    """A sink as third parties write them: emit() only.  Each record it got, in ``got``."""

    def __init__(self) -> None:
        self.got: list[Record] = []

    def emit(self, record: Record) -> None:
        self.got.append(record)
