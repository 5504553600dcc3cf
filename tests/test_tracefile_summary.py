"""Summary lines (format 1.1, 1.2): what the writers append per finished trace, and how
``hopscope view`` opens a file from them without folding its events.

The summary must say exactly what folding the trace's events says (``TraceInfo``), late
events must make a newer summary, and any file a summary does not fully cover (old
files, cut-off files, lines from elsewhere) must open the ordinary way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hopscope.app.collector import EventWriter
from hopscope.tracing import load, tracefile
from hopscope.tracing.model import QUEUE, TraceInfo
from hopscope.tracing.sinks import FileSink
from hopscope.tracing.tracefile import (
    SUMMARY_PREFIX,
    LoadReport,
    SummarisedTrace,
    SummaryScan,
    TraceFileWriter,
    read_events,
)
from hopscope.tui.app import HopscopeApp
from hopscope.tui.save import write_trace_file
from hopscope.tui.source import FileSource
from hopscope.tui.store import RequestStore
from uitools import list_lines, static_text, wait_for

Event = dict[str, Any]
T0 = 1_735_732_800_000_000_000
WAIT = 30.0
SIZE = (120, 35)


class Clock:
    """A writer's clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- generated traces ------------------------------------------------------------------


def headers(rng: random.Random, n: int) -> list[list[Any]]:
    pairs: list[list[Any]] = [["Host", f"api{n % 3}.example.com:80{n % 10}"], ["x-n", str(n)]]
    odd = rng.random()
    if odd < 0.1:
        pairs.append(["x-odd", "line\nbreak"])  # makes the header text ambiguous
    elif odd < 0.15:
        pairs.append(["x-nul", "a\0b"])
    elif odd < 0.2:
        pairs.append([5, "not a text pair"])
    elif odd < 0.25:
        pairs.append([":authority", "[::1]:8443"])
    return pairs


def body(rng: random.Random, n: int) -> str:
    return base64.b64encode(f'{{"n": {n}, "r": {rng.random()}}}'.encode()).decode()


def trace_events(rng: random.Random, n: int) -> tuple[list[Event], list[Event]]:
    """One request's events: ``(early, late)``, the late ones (another process's app
    span behind a proxy, an exception after the end) arriving after the rest ended."""
    trace_id = f"{n + 1:032x}"
    t = T0 + n * 10_000_000
    ids = iter(f"{n * 16 + k + 1:016x}" for k in range(16))

    def start(span: str, parent: str | None, hop: str, name: str, ts: int, **attrs: Any) -> Event:
        return {
            "kind": "span_start",
            "ts": ts,
            "trace_id": trace_id,
            "span_id": span,
            "parent_id": parent,
            "hop": hop,
            "name": name,
            "attrs": attrs,
        }

    def end(span: str, ts: int, **attrs: Any) -> Event:
        return {"kind": "span_end", "ts": ts, "trace_id": trace_id, "span_id": span, "attrs": attrs}

    def point(span: str, name: str, ts: int, **attrs: Any) -> Event:
        return {
            "kind": "event",
            "ts": ts,
            "trace_id": trace_id,
            "span_id": span,
            "name": name,
            "attrs": attrs,
        }

    early: list[Event] = []
    late: list[Event] = []
    method = rng.choice(["GET", "POST", "DELETE", 7])
    status: Any = rng.choice([200, 201, 404, 500, "503", None])
    proxied = rng.random() < 0.4
    outer = None
    if proxied:
        outer = next(ids)
        early.append(
            start(outer, None, "proxy", "proxy", t, **{
                "http.request.method": method,
                "url.path": f"/p/{n}",
                "http.request.headers": headers(rng, n),
            })
        )  # fmt: skip
    if rng.random() < 0.3:
        queue = next(ids)
        early.append(start(queue, outer, "server", "queue", t + 10, **{"span.kind": "queue"}))
        early.append(end(queue, t + 500 + rng.randrange(1000)))
    app_span = next(ids)
    app = [
        start(app_span, outer, "app", f"{method} /items/{n}", t + 1_000, **{
            "http.request.method": method,
            "url.path": f"/items/{n}",
            "server.address": "backend",
            "http.request.headers": headers(rng, n),
        }),
        point(app_span, "response.start", t + 2_000, status=status),
    ]  # fmt: skip
    if rng.random() < 0.3:
        user = next(ids)
        app.append(start(user, app_span, "app", "db", t + 1_200, **{"span.kind": "user"}))
        app.append(end(user, t + 1_800, error=rng.random() < 0.3))
    end_attrs: dict[str, Any] = {"http.response.headers": [["Content-Type", "text/plain"]]}
    if status is not None:
        end_attrs["http.response.status_code"] = status
    if rng.random() < 0.5:
        end_attrs["http.route"] = "/items/{n}"
    if rng.random() < 0.5:
        end_attrs["http.request.body"] = body(rng, n)
    if rng.random() < 0.5:
        end_attrs["http.response.body"] = body(rng, n + 1)
    app.append(end(app_span, t + 3_000 + rng.randrange(5_000), **end_attrs))
    exception = point(app_span, "exception", t + 4_000, **{"exception.type": "E"})
    if rng.random() < 0.2:
        app.append(exception)
    if proxied and outer is not None:
        # The proxy ends its span when the response is out; the app's process reports
        # later, sometimes.
        closing = end(outer, t + 9_000, **{"http.response.status_code": 200})
        if rng.random() < 0.5:
            early += [closing]
            late += app
        else:
            early += [*app, closing]
    else:
        early += app
    if rng.random() < 0.1:
        late.append(exception)  # an exception reported after its span ended
    return early, late


def write_generated(path: Path, requests: int, seed: int, **options: Any) -> list[Event]:
    """Write generated traces through the writer, late events after the summaries of
    their traces went out; returns every event written."""
    rng = random.Random(seed)
    clock = Clock()
    writer = TraceFileWriter.create(path, grace=0.5, clock=clock, **options)
    written: list[Event] = []
    pending_late: list[Event] = []
    for n in range(requests):
        early, late = trace_events(rng, n)
        writer.write(early)
        written += early
        pending_late += late
        clock.now += 0.1  # so summaries come a few requests later
        if n % 7 == 6:
            clock.now += 1.0  # past the grace: the traces so far are summed up...
            writer.write([])
            writer.write(pending_late)  # ...and these reopen some of them
            written += pending_late
            pending_late = []
    writer.write(pending_late)
    written += pending_late
    writer.close()
    return written


def scan(path: Path) -> tuple[SummaryScan, dict[str, SummarisedTrace]]:
    summary_scan = SummaryScan(path)
    traces: dict[str, SummarisedTrace] = {}
    for found, _ in summary_scan.chunks():
        for trace, again in found:
            assert again == (trace.trace_id in traces)
            traces[trace.trace_id] = trace
    return summary_scan, traces


def info_fields(info: TraceInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in TraceInfo.__slots__}


def summary_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_bytes().splitlines()
    return [json.loads(line) for line in lines if line.startswith(SUMMARY_PREFIX)]


# -- the summary is what folding says ------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_summaries_equal_the_info_of_the_assembled_traces(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 120, seed)
    assembled = {trace.trace_id: trace for trace in load(path, strict=True)}
    summary_scan, summarised = scan(path)
    assert summary_scan.complete
    assert summarised.keys() == assembled.keys()
    lines = summary_lines(path)
    assert len(lines) > len(assembled)  # late events made newer summaries
    for trace_id, trace in assembled.items():
        lazy = summarised[trace_id]
        assert info_fields(lazy.info) == info_fields(TraceInfo(trace)), trace_id
        again = TraceInfo.from_summary(TraceInfo(trace).summary())
        assert info_fields(again) == info_fields(lazy.info)
        assert not lazy.loaded
        assert lazy.spans == trace.spans  # read back from its lines on demand
        assert lazy.loaded and lazy.latest_ts() == trace.latest_ts()


@pytest.mark.parametrize("block", [64, 700, 4096])
def test_the_scan_reads_alike_whatever_its_block_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # Blocks smaller than a line (read again, twice as big), summary lines first in a
    # block or cut by its end: the same traces, and the file still found complete.
    path = tmp_path / "t.jsonl"
    write_generated(path, 40, 5)
    expected_scan, expected = scan(path)
    monkeypatch.setattr(tracefile, "_SCAN_BYTES", block)
    summary_scan, found = scan(path)
    assert summary_scan.complete and expected_scan.complete
    assert summary_scan.summaries == expected_scan.summaries > 40
    assert found.keys() == expected.keys()
    for trace_id, trace in expected.items():
        assert info_fields(found[trace_id].info) == info_fields(trace.info)
        assert found[trace_id].outline() == trace.outline()
        assert found[trace_id].latest_ts() == trace.latest_ts()


def test_summary_lines_written_otherwise_are_read_the_slow_way(tmp_path: Path) -> None:
    # The fast path decodes only the array after '{"kind":"summary","trace":'; a line
    # with its keys in another order (a tool rewrote the file) is decoded whole.
    path = tmp_path / "t.jsonl"
    write_generated(path, 20, 6)
    _, expected = scan(path)
    outlines = {trace_id: trace.outline() for trace_id, trace in expected.items()}
    lines = path.read_bytes().splitlines(keepends=True)
    rewritten = []
    for n, line in enumerate(lines):
        if line.startswith(SUMMARY_PREFIX) and n % 2:
            summary = json.loads(line)
            reordered = {
                "kind": "summary",
                "outline": summary["outline"],
                "detail": summary["detail"],
                "trace": summary["trace"],
            }
            line = json.dumps(reordered, separators=(",", ":")).encode() + b"\n"
        rewritten.append(line)
    assert len(b"".join(rewritten)) == len(b"".join(lines))  # the same bytes, reordered
    path.write_bytes(b"".join(rewritten))
    summary_scan, found = scan(path)
    assert summary_scan.complete and not summary_scan.report.malformed_lines
    assert found.keys() == expected.keys()
    for trace_id, trace in expected.items():
        assert info_fields(found[trace_id].info) == info_fields(trace.info)
        assert found[trace_id].outline() == outlines[trace_id]
        assert not found[trace_id].loaded
        assert found[trace_id].spans == trace.spans


@pytest.mark.parametrize(
    "change",
    [
        lambda row: row[:-1],  # a field short
        lambda row: [*row[:4], str(row[4]), *row[5:]],  # a start that is not a number
        lambda row: [*row[:3], "80,100", *row[4:]],  # byte ranges that are not a list
    ],
)
def test_a_malformed_summary_is_skipped_and_the_file_folded(
    tmp_path: Path, change: Callable[[list[Any]], list[Any]]
) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 10, 7)
    lines = path.read_bytes().splitlines(keepends=True)
    at = max(n for n, line in enumerate(lines) if line.startswith(SUMMARY_PREFIX))
    summary = json.loads(lines[at])
    summary["trace"] = change(summary["trace"])
    lines[at] = json.dumps(summary, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    summary_scan, _ = scan(path)
    assert summary_scan.report.malformed_lines == [-1]
    assert not summary_scan.complete  # that trace's lines are covered by no summary now


def test_the_generated_traces_cover_the_odd_cases(tmp_path: Path) -> None:
    """The equality above is only worth something if the traces are varied."""
    path = tmp_path / "t.jsonl"
    write_generated(path, 120, 0)
    infos = [trace.info for trace in load(path)]
    assert any(info.odd_headers is not None for info in infos)
    assert any(info.longest(QUEUE)[0] for info in infos)
    assert any(info.failed for info in infos)
    assert any(info.error for info in infos)
    assert any(type(info.status) is str for info in infos)
    assert any(info.bodies for info in infos)
    assert "api0.example.com" in {info.host for info in infos}  # the port left out


def test_a_late_event_makes_a_newer_summary_that_wins(tmp_path: Path) -> None:
    rng = random.Random(3)
    early, _ = trace_events(rng, 0)
    clock = Clock()
    path = tmp_path / "t.jsonl"
    writer = TraceFileWriter.create(path, grace=0.5, clock=clock)
    writer.write(early)
    assert summary_lines(path) == []  # finished, but within the grace
    clock.now = 1.0
    writer.write([])
    first = summary_lines(path)
    assert len(first) == 1 and first[0]["trace"][13] is False  # failed
    trace_id = early[0]["trace_id"]
    span_id = next(e["span_id"] for e in early if e["kind"] == "span_start")
    exception = {
        "kind": "event",
        "ts": T0 + 10**9,
        "trace_id": trace_id,
        "span_id": span_id,
        "name": "exception",
        "attrs": {},
    }
    writer.write([exception])
    clock.now = 2.0
    writer.close()
    second = summary_lines(path)
    assert len(second) == 2 and second[1]["trace"][2] == first[0]["trace"][2] + 1  # lines
    summary_scan, traces = scan(path)
    assert summary_scan.complete
    assert traces[trace_id].info.error and traces[trace_id].latest_ts() == T0 + 10**9


def test_the_writer_holds_a_bounded_number_of_traces(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = TraceFileWriter.create(path, max_open=10, keep=5)
    for n in range(50):
        event = {
            "kind": "span_start",
            "ts": T0 + n,
            "trace_id": f"{n + 1:032x}",
            "span_id": "1",
            "parent_id": None,
            "hop": "app",
            "name": "GET /",
            "attrs": {},
        }
        writer.write([event])  # never ends
        assert writer.open_traces <= 10
    assert len(writer._done) <= 5
    writer.close()
    assert len(load(path)) == 50
    summary_scan, traces = scan(path)
    assert summary_scan.complete and len(traces) == 50
    assert all(not trace.finished for trace in traces.values())


# -- the writers -------------------------------------------------------------------------


def sample_events(requests: int = 20, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    for n in range(requests):
        early, late = trace_events(rng, n)
        events += early + late
    return events


def test_every_writer_writes_summaries(tmp_path: Path) -> None:
    events = sample_events()
    expected = load_events(tmp_path / "plain.jsonl", events)

    saved = tmp_path / "saved.jsonl"
    assert write_trace_file(str(saved), events) == len(events)

    collected = tmp_path / "collected.jsonl"
    writer = EventWriter(collected)
    for start in range(0, len(events), 7):
        writer.write(events[start : start + 7])
    writer.close()

    for path in (saved, collected):
        assert path.stat().st_mode & 0o777 == 0o600
        summary_scan, traces = scan(path)
        assert summary_scan.complete, path
        assert {t: info_fields(x.info) for t, x in traces.items()} == expected


def load_events(path: Path, events: list[Event]) -> dict[str, dict[str, Any]]:
    """The info of each trace ``events`` assemble into, through a file without summaries."""
    with path.open("w") as handle:
        handle.write('{"format":"hopscope","version":"1.0"}\n')
        for event in events:
            handle.write(json.dumps(event) + "\n")
    return {trace.trace_id: info_fields(TraceInfo(trace)) for trace in load(path)}


def test_file_sink_writes_summaries_unless_told_not_to(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    sink = FileSink(plain, summaries=False)
    sink.emit(("c", 1, 2, 7, 8, 0, "app", "GET /", 1, {"url.path": "/"}))
    sink.close()
    assert b'"summary"' not in plain.read_bytes()
    assert [len(t.spans) for t in load(plain, strict=True)] == [1]
    summarised = tmp_path / "summarised.jsonl"
    sink = FileSink(summarised)
    sink.emit(("c", 1, 2, 7, 8, 0, "app", "GET /", 1, {"url.path": "/"}))
    sink.close()
    summary_scan, traces = scan(summarised)
    assert summary_scan.complete and len(traces) == 1


def test_file_sink_writes_summaries_for_real_requests(tmp_path: Path) -> None:
    from hopscope.tracing.records import new_span_id, new_trace_id

    path = tmp_path / "sink.jsonl"
    sink = FileSink(path)  # (summaries by default)
    for n in range(30):
        trace, span = new_trace_id(), new_span_id()
        start = time.time_ns()
        sink.emit(("s", start, trace, span, 0, "app", f"GET /{n}", 1, {"url.path": f"/{n}"}))
        sink.emit(("p", start + 5, trace, span, "response.start", {"status": 200}))
        sink.emit(("e", start + 10, trace, span, {"http.response.status_code": 200 + n}))
    sink.close()
    summary_scan, traces = scan(path)
    assert summary_scan.complete and len(traces) == 30
    assembled = {trace.trace_id: trace for trace in load(path, strict=True)}
    assert {t: info_fields(x.info) for t, x in traces.items()} == {
        t: info_fields(TraceInfo(x)) for t, x in assembled.items()
    }


# -- reading files a summary does not cover ------------------------------------------------


def open_in_store(path: Path) -> tuple[RequestStore, FileSource, list[Event]]:
    """What ``hopscope view`` ends up holding, without a UI: the source run to its end."""
    source = FileSource(path)
    batches: list[list[Event]] = []
    source.start(batches.append)
    assert source.done.wait(WAIT)
    store = RequestStore(100_000)
    notices: list[Event] = []
    for batch in batches:
        notices += store.ingest(batch).notices
    return store, source, notices


def held(store: RequestStore) -> dict[str, dict[str, Any]]:
    return {row.trace.trace_id: info_fields(TraceInfo(row.trace)) for row in store.rows.values()}


def test_a_summarised_file_opens_from_its_summaries(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 60, 4)
    store, source, notices = open_in_store(path)
    assert all(isinstance(row.trace, SummarisedTrace) for row in store.rows.values())
    assert not any(row.trace.loaded for row in store.rows.values())  # type: ignore[attr-defined]
    expected = {trace.trace_id: info_fields(TraceInfo(trace)) for trace in load(path)}
    assert held(store) == expected
    assert source.requests == 60 and "read" in notices[-1]["message"]
    finished = sum(1 for info in expected.values() if info["end"] is not None)
    assert sum(store.counts.values()) == finished


def test_an_old_format_file_opens_the_old_way(tmp_path: Path) -> None:
    events = sample_events(30)
    path = tmp_path / "old.jsonl"
    expected = load_events(path, events)
    store, _, _ = open_in_store(path)
    assert not any(isinstance(row.trace, SummarisedTrace) for row in store.rows.values())
    assert held(store) == expected


@pytest.mark.parametrize("damage", ["cut_summary", "cut_event", "foreign_line", "no_summaries"])
def test_a_file_summaries_do_not_cover_is_folded(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 40, 2)
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "cut_summary":  # the writer died writing its last summary
        assert lines[-1].startswith(SUMMARY_PREFIX)
        data = b"".join(lines[:-1]) + lines[-1][:40]
    elif damage == "cut_event":  # ...or an event, before summing up
        events = [line for line in lines if not line.startswith(SUMMARY_PREFIX)]
        data = b"".join(events[:-1]) + events[-1][:30]
    elif damage == "foreign_line":  # an event no summary covers
        extra = sample_events(1, seed=99)[0] | {"trace_id": "f" * 32}
        data = b"".join(lines[:5]) + json.dumps(extra).encode() + b"\n" + b"".join(lines[5:])
    else:  # a 1.1 file cut off before any summary
        data = b"".join(line for line in lines if not line.startswith(SUMMARY_PREFIX))
    path.write_bytes(data)
    summary_scan, _ = scan(path)
    assert not summary_scan.complete
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {trace.trace_id: info_fields(TraceInfo(trace)) for trace in load(path)}
    store, _, notices = open_in_store(path)
    assert held(store) == expected
    assert not any(isinstance(row.trace, SummarisedTrace) for row in store.rows.values())
    if damage.startswith("cut"):
        assert "cut off" in notices[-1]["message"]


def test_readers_of_events_skip_summary_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    written = write_generated(path, 20, 5)
    report = LoadReport()
    events = list(read_events(path, report))
    assert events == written  # every event, in order, no summary
    assert report.skipped == len(summary_lines(path)) > 0
    assert not report.malformed_lines


# -- the UI ----------------------------------------------------------------------------------


def one_request(n: int) -> list[Event]:
    trace_id, span_id = f"{n + 1:032x}", f"{n + 1:016x}"
    request_body = base64.b64encode(b'{"name": "item %d"}' % n).decode()
    return [
        {
            "kind": "span_start",
            "ts": T0 + n * 1_000_000,
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_id": None,
            "hop": "app",
            "name": f"POST /items/{n}",
            "attrs": {
                "http.request.method": "POST",
                "url.scheme": "http",
                "url.path": f"/items/{n}",
                "url.query": f"n={n}",
                "server.address": "testserver",
                "http.request.headers": [["host", "testserver"], ["x-item", f"number-{n}"]],
            },
        },
        {
            "kind": "span_end",
            "ts": T0 + n * 1_000_000 + 500_000,
            "trace_id": trace_id,
            "span_id": span_id,
            "attrs": {
                "http.response.status_code": 500 if n % 5 == 0 else 201,
                "http.request.body": request_body,
                "http.request.body.size": 18,
                "http.response.body.size": 1000 + n,
            },
        },
    ]


def test_the_view_shows_a_summarised_request_in_full_and_filters_it_alike(
    tmp_path: Path,
) -> None:
    events = [event for n in range(40) for event in one_request(n)]
    summarised = tmp_path / "new.jsonl"
    write_trace_file(str(summarised), events)
    old = tmp_path / "old.jsonl"
    load_events(old, events)
    filters = [
        "status:5xx",
        "header:x-item=number-1*",
        'body:"item 2"',
        "not status:201",
        "hop:app>=0ms and not path:/items/3*",
    ]

    async def run(path: Path) -> list[list[str]]:
        app = HopscopeApp(FileSource(path), max_requests=1_000)
        results: list[list[str]] = []
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: len(app.store.rows) == 40, "every request")
            await pilot.pause(0.3)
            # The rows as drawn (bars, sizes, statuses): the same from summaries.
            results.append(list_lines(app))
            assert any("/items/39?n=39" in line for line in results[-1])
            for text in filters:
                assert app.apply_filter(text), text
                results.append([row.trace.trace_id for row in app.store.view])
            assert app.apply_filter("")
            if path == summarised:
                assert not any(row.trace.loaded for row in app.store.rows.values())
            await pilot.press("up", "up")
            await wait_for(pilot, lambda: app.selected_trace is not None, "a selection")
            selected = app.selected_trace
            assert isinstance(selected, SummarisedTrace) or path == old
            assert selected is not None and selected.path is not None
            n = selected.path.rsplit("/", 1)[1]
            await pilot.press("2")
            await wait_for(
                pilot, lambda: f"number-{n}" in static_text(app, "#request-view"), "headers"
            )
            request = static_text(app, "#request-view")
            assert "POST" in request and f'"name": "item {n}"' in request
        return results

    new_results = asyncio.run(run(summarised))
    old_results = asyncio.run(run(old))
    assert new_results == old_results
    assert all(new_results) and all(len(r) < 40 for r in new_results[1:])


def test_the_outline_draws_rows_without_reading_events(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 60, 6)
    assembled = {trace.trace_id: trace for trace in load(path)}
    _, traces = scan(path)
    keys = ("span.kind", "network.protocol.name", "url.query", "http.response.body.size")
    for trace_id, lazy in traces.items():
        outline = [(s.hop, s.name, s.attrs, s.start, s.end) for s in lazy.outline()]
        assert not lazy.loaded
        expected = [
            (s.hop, s.name, {k: s.attrs[k] for k in keys if k in s.attrs}, s.start, s.end)
            for s in assembled[trace_id].spans.values()
        ]
        assert outline == expected


# -- 1.2: what only filters read stays undecoded until they do ---------------------------------


def as_format_1_1(path: Path) -> None:
    """Rewrite a file as a 1.1 writer wrote it: ``detail`` back inside the ``trace``
    array, and every byte range moved to where its lines are now (a summary comes after
    the lines it covers, so those moved already)."""
    lines = path.read_bytes().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["version"] = "1.1"
    out = [json.dumps(header, separators=(",", ":")).encode() + b"\n"]
    moved: dict[int, int] = {}  # where each line started, to where it starts now
    old, new = len(lines[0]), len(out[0])
    for line in lines[1:]:
        moved[old] = new
        old += len(line)
        if line.startswith(SUMMARY_PREFIX):
            summary = json.loads(line)
            fields = summary["trace"]
            runs = fields[3]
            for i in range(0, len(runs), 2):
                start, end = runs[i], runs[i] + runs[i + 1]
                runs[i], runs[i + 1] = moved[start], moved[end] - moved[start]
            fields = [*fields, *summary["detail"]]
            text = json.dumps(fields, separators=(",", ":"))
            outline = json.dumps(summary["outline"])
            line = f'{{"kind":"summary","trace":{text},"outline":{outline}}}\n'.encode()
        out.append(line)
        new += len(line)
    path.write_bytes(b"".join(out))


def test_a_1_1_file_still_opens_from_its_summaries(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 60, 8)
    expected = {trace.trace_id: trace for trace in load(path, strict=True)}
    _, before = scan(path)
    outlines = {trace_id: trace.outline() for trace_id, trace in before.items()}
    as_format_1_1(path)
    data = path.read_bytes()
    assert b'"version":"1.1"' in data and b'"detail"' not in data
    assert {trace.trace_id: trace for trace in load(path, strict=True)} == expected
    summary_scan, found = scan(path)
    assert summary_scan.complete and not summary_scan.report.malformed_lines
    assert found.keys() == expected.keys()
    for trace_id, trace in expected.items():
        info = found[trace_id].info
        assert type(info) is TraceInfo  # decoded at once, as before
        assert info_fields(info) == info_fields(TraceInfo(trace))
        assert found[trace_id].outline() == outlines[trace_id]  # from the summary
        assert not found[trace_id].loaded
        assert found[trace_id].spans == trace.spans


def undecoded(info: TraceInfo) -> bool:
    return getattr(info, "_detail", None) is not None


def test_header_text_and_bodies_are_decoded_when_first_read(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 80, 9)
    assert all("detail" in line for line in summary_lines(path))
    folded = {trace.trace_id: TraceInfo(trace) for trace in load(path, strict=True)}
    _, found = scan(path)
    infos = {trace_id: trace.info for trace_id, trace in found.items()}
    assert all(undecoded(info) for info in infos.values())
    # One by one, as any reader reads them...
    some = list(infos)[:40]
    for trace_id in some:
        info = infos[trace_id]
        assert info.headers == folded[trace_id].headers
        assert not undecoded(info)
    # ...or all the others at once, before a filter reads them.
    tracefile.decode_details(infos.values())
    assert not any(undecoded(info) for info in infos.values())
    for trace_id, info in infos.items():
        assert info_fields(info) == info_fields(folded[trace_id]), trace_id
    assert any(info.odd_headers for info in infos.values())
    assert any(info.bodies for info in infos.values())


def test_a_malformed_detail_reads_as_no_headers_nor_bodies(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_generated(path, 10, 3)
    data = path.read_bytes()
    at = data.index(b',"detail":[') + len(b',"detail":[')
    path.write_bytes(data[:at] + b"7" + data[at + 1 :])  # the header text is not a string
    summary_scan, found = scan(path)
    assert summary_scan.complete
    infos = [trace.info for trace in found.values()]
    tracefile.decode_details(infos)
    bad = [info for info in infos if info.header_text == "\n" and not info.bodies]
    assert len(bad) >= 1 and all(info.odd_headers is None for info in bad)
    assert not any(undecoded(info) for info in infos)


FILTERS = (
    "header:x-n=7",
    "header:host=api1*",
    "header:x-odd",
    'body:"n"',
    "status:5xx or header:x-nul",
)


@pytest.mark.parametrize("when", ["after", "before"])
def test_filters_over_undecoded_rows_match_as_over_folded_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # A filter set after the file opened decodes every row at once (set_filter); one set
    # before decodes each batch as it is filed.  Either way: what folding says.
    from hopscope.tracing.filters import parse
    from hopscope.tui import source as source_module

    monkeypatch.setattr(source_module, "DETAILS_AFTER", 60.0)  # not in the background
    path = tmp_path / "t.jsonl"
    write_generated(path, 150, 10)
    folded = load(path, strict=True)
    for text in FILTERS:
        source = FileSource(path)
        batches: list[list[Event]] = []
        source.start(batches.append)
        assert source.done.wait(WAIT)
        predicate = parse(text).test
        expected = [trace.trace_id for trace in folded if predicate(trace)]
        assert 0 < len(expected) < len(folded), text
        store = RequestStore(100_000)
        if when == "before":
            store.set_filter(predicate, text)
        for batch in batches:
            store.ingest(batch)
        if when == "after":
            assert any(undecoded(row.trace.info) for row in store.rows.values())
            store.set_filter(predicate, text)
            assert not any(undecoded(row.trace.info) for row in store.rows.values())
        assert [row.trace.trace_id for row in store.view] == expected, text
        source.stop()


def test_the_source_decodes_the_details_once_all_rows_are_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hopscope.tui import source as source_module

    monkeypatch.setattr(source_module, "DETAILS_AFTER", 0.0)
    path = tmp_path / "t.jsonl"
    write_generated(path, 50, 11)
    source = FileSource(path)
    batches: list[list[Event]] = []
    source.start(batches.append)
    assert source.done.wait(WAIT)
    assert source._thread is not None
    source._thread.join(WAIT)
    traces = [event for batch in batches for event in batch if isinstance(event, SummarisedTrace)]
    assert len(traces) == 50  # handed over bare (see RequestStore.ingest)
    assert not any(undecoded(trace.info) for trace in traces)


def test_the_view_decodes_the_details_once_every_row_is_filed(tmp_path: Path) -> None:
    # Not before: decoding them meanwhile took the GIL from the UI filing the rows.
    path = tmp_path / "t.jsonl"
    write_generated(path, 60, 12)

    async def main() -> None:
        source = FileSource(path)
        app = HopscopeApp(source, max_requests=1_000)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: len(app.store.rows) == 60, "every request")
            deadline = time.monotonic() + WAIT
            while any(undecoded(row.trace.info) for row in app.store.rows.values()):
                assert time.monotonic() < deadline, "the details were never decoded"
                await pilot.pause(0.05)
            assert app.inbox.pending == 0 and source.done.is_set()

    asyncio.run(main())


def test_lines_a_later_writer_appended_to_a_1_1_file_are_read_too(tmp_path: Path) -> None:
    # A 1.1 file's header says 1.1 whatever a 1.2 writer appends to it (append=True).
    path = tmp_path / "t.jsonl"
    write_generated(path, 30, 13)
    expected = {trace.trace_id: TraceInfo(trace) for trace in load(path, strict=True)}
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"version":"1.2"', b'"version":"1.1"', 1))
    summary_scan, found = scan(path)
    assert summary_scan.complete and not summary_scan.report.malformed_lines
    assert found.keys() == expected.keys()
    for trace_id, info in expected.items():
        assert info_fields(found[trace_id].info) == info_fields(info)
