"""The tail's lines are the lines of the assembled model.

``Tail`` folds events into slim per-span summaries instead of ``tracing.model`` traces,
for speed; these tests hold it to the model: the reference below is the formatting the
tail used to do on full :class:`~hopscope.tracing.model.Trace` objects, and the timing
rule (a line is due ``hold`` after its root span ends, measured against the newest event,
or up to ``wait`` later while a span still runs) is replayed on a
:class:`~hopscope.tracing.model.TraceBuilder`.
"""

from __future__ import annotations

import io
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hopscope.app.tail import Tail, format_line
from hopscope.tracing.model import Span, Trace, TraceBuilder, assemble
from hopscope.tracing.tracefile import read_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEMO = Path(__file__).parent / "data" / "demo-trace.jsonl"
HOLD = 0.3
HOLD_NS = int(HOLD * 1e9)
WAIT_NS = 2 * 10**9  # Tail's default wait for spans still running after the root's end
T0 = 1_700_000_000_000_000_000

Event = dict[str, Any]


# -- the reference: the tail's formatting over tracing.model ---------------------------

_HOP_ORDER = ("client", "proxy", "queue", "server", "app")


def _ms(ns: int | None) -> str:
    return "?" if ns is None else f"{ns / 1e6:.1f}ms"


def _clock(ns: int | None) -> str:
    if ns is None:
        return "--:--:--.---"
    return datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S.%f")[:-3]


def _top_level(trace: Trace, span: Span) -> bool:
    seen: set[str] = set()
    parent_id = span.parent_id
    while parent_id is not None and parent_id in trace.spans and parent_id not in seen:
        seen.add(parent_id)
        parent = trace.spans[parent_id]
        if parent.hop == span.hop:
            return False
        parent_id = parent.parent_id
    return True


def _hop_times(trace: Trace) -> list[tuple[str, int, int, int]]:
    """``(name, total ns, finished spans, running spans)`` per hop, then per user span."""
    hops: dict[str, list[int]] = {}
    user: dict[str, list[int]] = {}
    for span in trace.spans.values():
        if span.start is None:
            continue
        if span.attrs.get("span.kind") == "user":
            bucket = user.setdefault(span.name or "span", [0, 0, 0])
        elif span.name == "background":
            bucket = user.setdefault("background", [0, 0, 0])
        elif span.attrs.get("span.kind") == "queue":
            bucket = hops.setdefault("queue", [0, 0, 0])
        elif _top_level(trace, span):
            bucket = hops.setdefault(span.hop, [0, 0, 0])
        else:
            continue
        duration = span.duration_ns
        if duration is None:
            bucket[2] += 1
        else:
            bucket[0] += duration
            bucket[1] += 1
    order = {hop: index for index, hop in enumerate(_HOP_ORDER)}
    ordered = sorted(hops.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return [(n, *b) for n, b in ordered] + [(n, *b) for n, b in user.items()]  # type: ignore[misc]


def _running(trace: Trace) -> bool:
    return any(s.start is not None and s.end is None for s in trace.spans.values())


def _exception_types(trace: Trace) -> list[str]:
    names: dict[str, None] = {}
    for span in sorted(trace.spans.values(), key=lambda s: s.start or 0):
        for event in span.events:
            if event.name == "exception" and event.attrs.get("exception.type"):
                names[str(event.attrs["exception.type"]).rpartition(".")[2]] = None
        if span.attrs.get("exception.type"):
            names[str(span.attrs["exception.type"]).rpartition(".")[2]] = None
    return list(names)


def reference_line(trace: Trace, color: bool = False) -> str:
    import click

    colours = {2: "green", 3: "cyan", 4: "yellow", 5: "red"}
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
        status = 101
    status_text = str(status) if status is not None else "---"
    if color and status is not None:
        status_text = click.style(status_text, fg=colours.get(status // 100), bold=True)
    parts.append(status_text)
    parts.append(_ms(trace.duration_ns))
    for name, total, count, running in _hop_times(trace):
        if not count:
            parts.append(f"{name}=running")
        else:
            parts.append(
                f"{name}={_ms(total)}"
                + (f"x{count}" if count > 1 else "")
                + ("+running" if running else "")
            )
    types = _exception_types(trace)
    if types or trace.error:
        parts.append("error" + (f"={','.join(types)}" if types else ""))
    if any(s.attrs.get("disconnected") for s in trace.spans.values()):
        parts.append("client-gone")
    return " ".join(parts)


def reference_batches(batches: list[list[Event]]) -> list[list[str]]:
    """The lines each batch makes due, then those the close flushes (each sorted)."""
    builder = TraceBuilder()
    done: set[str] = set()
    newest = 0
    out: list[list[str]] = []

    def due(flush: bool) -> list[str]:
        ready = [
            t
            for t in builder.traces.values()
            if t.end is not None
            and (
                flush
                or (
                    t.end + HOLD_NS <= newest
                    and (not _running(t) or t.end + HOLD_NS + WAIT_NS <= newest)
                )
            )
        ]
        lines = []
        for trace in ready:
            try:
                lines.append(reference_line(trace))
            except (TypeError, ValueError):
                pass
            done.add(trace.trace_id)
            del builder.traces[trace.trace_id]
        return sorted(lines)

    for batch in batches:
        for event in batch:
            if event["trace_id"] not in done:
                builder.add(event)
                newest = max(newest, event["ts"])
        out.append(due(False))
    out.append(due(True))
    return out


def tail_batches(batches: list[list[Event]]) -> list[list[str]]:
    tail = Tail(io.StringIO(), color=False, live=False, hold=HOLD)
    out = [sorted(tail.feed(batch)) for batch in batches]
    out.append(sorted(tail.close()))
    return out


def demo_events() -> list[Event]:
    return list(read_events(DEMO))


# -- a real recorded trace: client, proxy, queue, server and app hops ------------------


def test_demo_trace_lines_are_the_models_lines() -> None:
    events = demo_events()
    traces = sorted(assemble(events), key=lambda t: t.end or 0)
    expected = [reference_line(t) for t in traces]
    assert len(expected) == 12 and any(" WS " in line for line in expected)
    assert any("error=RuntimeError" in line for line in expected)
    assert any("queue=" in line and "background=" in line for line in expected)
    out = io.StringIO()
    tail = Tail(out, color=False, live=False, hold=HOLD)
    tail.feed(events)
    tail.close()
    assert out.getvalue().splitlines() == expected
    assert tail.printed == 12 and tail.malformed == 0 and tail.unfinished() == 0


@pytest.mark.parametrize("color", [False, True])
def test_format_line_of_an_assembled_trace_is_the_models(color: bool) -> None:
    for trace in assemble(demo_events()):
        assert format_line(trace, color) == reference_line(trace, color)


def test_demo_trace_in_shuffled_batches_gives_the_models_lines() -> None:
    events = demo_events()
    rng = random.Random(7)
    for _ in range(20):
        shuffled = events[:]
        # Each process's events in order, processes interleaved: what a collector sees.
        rng.shuffle(shuffled)
        cuts = sorted(rng.sample(range(1, len(shuffled)), rng.randint(1, 30)))
        batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
        assert tail_batches(batches) == reference_batches(batches)


# -- generated traces: the odd corners of the rules -----------------------------------

START_ATTRS = {
    "http.request.method": st.sampled_from(["GET", "POST", None]),
    "url.path": st.sampled_from(["/a", "/b/1", 7]),
    "span.kind": st.sampled_from(["user", "queue", "server"]),
    "network.protocol.name": st.sampled_from(["websocket", "http"]),
    "http.route": st.sampled_from(["/a", "/b/{id}", ""]),
    "http.request.headers": st.just([["host", "example.com:80"]]),
}
END_ATTRS = {
    "http.response.status_code": st.sampled_from([200, 404, 503, "500", None, "x"]),
    "http.route": st.sampled_from(["/a", "/b/{id}"]),
    "error": st.booleans(),
    "exception.type": st.sampled_from(["builtins.ValueError", "KeyError", ""]),
    "disconnected": st.just(True),
    "websocket.accepted": st.booleans(),
}


@st.composite
def trace_events(draw: st.DrawFn, trace_id: str) -> list[Event]:
    ids = [f"{n:016x}" for n in range(1, 6)]
    count = draw(st.integers(1, 5))
    events: list[Event] = []
    for span_id in ids[:count]:
        start = T0 + draw(st.integers(0, 10**9))
        end = start + draw(st.integers(0, 5 * 10**8))
        parent = draw(st.sampled_from([None, "f" * 16, *ids[:count]]))
        if draw(st.booleans()) or span_id == ids[0]:
            events.append({
                "kind": "span_start", "ts": start, "trace_id": trace_id, "span_id": span_id,
                "parent_id": parent,
                "hop": draw(st.sampled_from(["client", "proxy", "server", "app", "worker"])),
                "name": draw(st.sampled_from(["GET /a", "background", "queue", "db"])),
                "attrs": draw(st.fixed_dictionaries({}, optional=START_ATTRS)),
            })  # fmt: skip
        if draw(st.booleans()):
            events.append({
                "kind": "span_end", "ts": end, "trace_id": trace_id, "span_id": span_id,
                "attrs": draw(st.fixed_dictionaries({}, optional=END_ATTRS)),
            })  # fmt: skip
        for name in draw(st.lists(st.sampled_from(["exception", "response.start"]), max_size=2)):
            attrs = {"exception.type": draw(st.sampled_from(["app.Boom", "", "KeyError"]))}
            events.append({
                "kind": "event", "ts": draw(st.integers(start, end + 10**8)),
                "trace_id": trace_id, "span_id": span_id, "name": name, "attrs": attrs,
            })  # fmt: skip
    return events


@st.composite
def batches_of_traces(draw: st.DrawFn) -> list[list[Event]]:
    events: list[Event] = []
    for n in range(draw(st.integers(1, 4))):
        events += draw(trace_events(f"{n + 1:032x}"))
    events = draw(st.permutations(events))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(events) - 1, 1)), max_size=6)))
    return [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches_of_traces())
def test_generated_traces_give_the_models_lines_at_the_same_time(
    batches: list[list[Event]],
) -> None:
    assert tail_batches(batches) == reference_batches(batches)


def test_lines_come_out_in_order_of_their_root_span_end() -> None:
    events = demo_events()
    tail = Tail(io.StringIO(), color=False, live=False, hold=0)
    events.reverse()  # the root spans' ends come last, newest first
    lines = tail.feed(events)
    ends = {reference_line(t): t.end for t in assemble(events)}
    assert len(lines) == 12
    assert [ends[line] for line in lines] == sorted(ends[line] for line in lines)


def _clock_cases() -> list[int]:
    second = T0 - T0 % 10**9
    near = [second + d for d in (-1, 0, 1, 499, 500, 501, 999_499, 999_500, 999_501)]
    near += [second + 10**9 - d for d in (1, 499, 500, 501, 999, 1000)]
    return [*near, second + 123_456_789, 0, 1, 10**9 - 500, 17 * 10**17 + 999_999_999]


@given(st.one_of(st.sampled_from(_clock_cases()), st.integers(0, 4 * 10**18)))
def test_clock_is_what_datetime_prints(ns: int) -> None:
    from hopscope.app.tail import _clock as clock

    assert clock(ns) == _clock(ns)
    assert clock(ns + 1) == _clock(ns + 1)  # the next one, maybe in the same second


@given(
    st.one_of(st.sampled_from(_clock_cases()), st.integers(0, 4 * 10**18)),
    st.lists(
        st.one_of(
            st.integers(-1_001_000, 1_001_000),
            st.sampled_from([-1001, -1000, -999, -1, 1, 999, 1000, 1001, 998_999, 999_000]),
        ),
        max_size=12,
    ),
)
def test_clock_of_times_near_the_one_before_is_what_datetime_prints(
    ns: int, steps: list[int]
) -> None:
    # _clock reuses the text of the millisecond it formatted last, away from its edges.
    from hopscope.app.tail import _clock as clock

    for step in steps:
        ns = max(ns + step, 0)
        assert clock(ns) == _clock(ns), ns
    edge = ns - ns % 1_000_000
    for near in (edge, edge + 999, edge + 1000, edge + 998_999, edge + 999_000, edge + 999_999):
        assert clock(near) == _clock(near), near
