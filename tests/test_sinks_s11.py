"""Session 11: drops nobody hears of at close and exit; strict JSON for non-finite floats.

1. A :class:`SocketSink` whose collector stopped reading (or went away) before the app
   closed the sink: the frames still waiting when ``close()`` gave up after its 5 s, and
   the records still queued, were not counted as dropped, so records received plus
   drops counted fell short of what the app recorded.  The collectors here are real
   processes on real sockets (:class:`frames.ProcessCollector`).
2. A span attribute that is ``nan`` or ``inf`` was written as ``NaN``/``Infinity``, which
   hopscope reads back but strict JSON readers (jq, a browser's ``JSON.parse``) refuse.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from frames import PAD, ProcessCollector, fill, record
from hopscope.tracing import FileSink, SocketSink, load
from hopscope.tracing.tracefile import (
    SummarisedTrace,
    SummaryScan,
    TraceFileWriter,
    read_events,
)

#: Records before the socket's buffers are full, at most (some 80 MB): a bound only.


def _where(family: str, short_dir: Path) -> str:
    return "0" if family == "tcp" else f"unix:{short_dir}/c.sock"


# -- 1. what close() leaves undelivered is counted ----------------------------------------


def test_frames_still_waiting_when_close_gives_up_are_counted_as_dropped(
    short_dir: Path,
) -> None:
    """The collector holds the connection open and reads nothing: ``close()`` waits its
    5 s for the socket, gives up, and closes it.  The frames it gave up on never reach
    the collector whole, and were not counted: ``dropped`` said 0."""
    # A Unix socket: its buffers do not grow while nobody reads (TCP's may take it all
    # within the 5 s on loopback).
    collector = ProcessCollector("hold", _where("unix", short_dir))
    sink = SocketSink(collector.url, interval=60, flush_at=1)
    try:
        emitted = fill(sink)
        for _ in range(50):  # past what the socket's buffers hold: these wait
            sink.emit(record(emitted, PAD))
            emitted += 1
        sink.close()  # gives up after its 5 s: the collector still reads nothing
        report = collector.report()  # reads what the kernel took, to the end
    finally:
        sink.close()
        collector.kill()
    assert report["dropped"] == 0
    assert sink.dropped > 0
    assert len(report["ids"]) + sink.dropped == emitted  # nothing vanished uncounted
    assert sink.unreported == sink.dropped  # and no collector heard of them


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_records_queued_when_the_collector_is_gone_at_close_are_counted(
    family: str, short_dir: Path
) -> None:
    """The collector was killed: what waited was counted when the sink noticed, but the
    records queued after that (waiting for a reconnection that close() does not make)
    were not."""
    collector = ProcessCollector("hold", _where(family, short_dir))
    sink = SocketSink(collector.url, interval=60, flush_at=1, max_queue=1000)
    try:
        emitted = fill(sink)
        report = collector.report()
        collector.kill()
        for _ in range(20):  # the first finds the connection gone; the rest wait
            sink.emit(record(emitted))
            emitted += 1
        assert len(sink._queue) >= 19
        sink.close()
    finally:
        sink.close()
        collector.kill()
    assert report["dropped"] == 0
    assert len(report["ids"]) + sink.dropped == emitted
    assert sink.unreported == sink.dropped
    assert not sink._queue and not sink._pending


#: An app that records until frames wait, says how many it recorded, and exits (without
#: closing its sink) when told: the sink is closed at exit.
APP = r"""
import sys, time
from hopscope.tracing import SocketSink

sink = SocketSink(sys.argv[1], interval=60, flush_at=1, max_queue=1000)
sink.emit(("p", 0, 1, 1, "tick", None))
deadline = time.monotonic() + 10
while sink.connects == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
emitted = 1
while not sink._pending and emitted < 20_000:
    sink.emit(("p", emitted, 1, 1, "tick", {"pad": "x" * 4000}))
    emitted += 1
print(emitted, flush=True)
sys.stdin.readline()  # the collector is killed meanwhile
for _ in range(20):
    sink.emit(("p", emitted, 1, 1, "tick", None))
    emitted += 1
print(emitted, flush=True)
"""


def test_at_exit_drops_no_collector_heard_of_are_said_on_stderr(short_dir: Path) -> None:
    """At exit nobody can read ``sink.dropped``: the app's process says in one line how
    many records the collector it had found never heard of.  It said nothing, and did
    not even count the records still queued."""
    collector = ProcessCollector("hold", _where("unix", short_dir))
    app = subprocess.Popen(
        [sys.executable, "-c", APP, collector.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None and app.stdin is not None
        int(app.stdout.readline())
        report = collector.report()
        collector.kill()
        out, err = app.communicate("\n", timeout=30)
    finally:
        if app.poll() is None:
            app.kill()
            app.communicate()
        collector.kill()
    assert app.returncode == 0, err
    emitted = int(out.split()[-1])
    lines = err.splitlines()
    assert len(lines) == 1, err
    said = re.fullmatch(
        r"hopscope: (\d+) record\(s\) were dropped that the collector at (\S+) never heard "
        r"of \(it went away or stopped reading before exit\)",
        lines[0],
    )
    assert said is not None, lines[0]
    assert said.group(2) == collector.url
    heard = len(report["ids"]) + report["dropped"]
    assert heard + int(said.group(1)) == emitted, (report, lines, out)


def test_nothing_is_said_at_exit_when_no_collector_was_ever_found(short_dir: Path) -> None:
    """No viewer running is the ordinary case of an app that was not asked to show its
    requests: it stays silent (its drops are in ``dropped``)."""
    app = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from hopscope.tracing import SocketSink\n"
            "sink = SocketSink(sys.argv[1])\n"
            "sink.emit(('p', 1, 1, 1, 'tick', None))\n",
            f"unix:{short_dir}/nobody.sock",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert app.returncode == 0 and app.stderr == ""


# -- 2. strict JSON for non-finite floats --------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _strict_loads(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _odd_attrs() -> dict[str, Any]:
    return {
        "ratio": NAN,
        "high": INF,
        "low": -INF,
        "series": [1.5, -INF, NAN],
        "nested": {"x": INF, "t": (NAN, 2)},
        "said": "NaN",  # a string the app set: stays a string
        "text": "Infinity",
        "fine": 0.25,
    }


def _check_odd(attrs: dict[str, Any]) -> None:
    assert math.isnan(attrs["ratio"]) and type(attrs["ratio"]) is float
    assert attrs["high"] == INF and attrs["low"] == -INF
    assert attrs["series"][:2] == [1.5, -INF] and math.isnan(attrs["series"][2])
    assert attrs["nested"]["x"] == INF and math.isnan(attrs["nested"]["t"][0])
    assert attrs["nested"]["t"][1] == 2
    assert attrs["said"] == "NaN" and attrs["text"] == "Infinity"
    assert attrs["fine"] == 0.25


def _write_odd(path: Path) -> None:
    sink = FileSink(path)
    sink.emit(("s", 1, 7, 8, 0, "app", "GET /", 1, {"url.path": "/", "start": NAN}))
    sink.emit(("p", 2, 7, 8, "score", _odd_attrs()))
    sink.emit(("e", 3, 7, 8, {"http.response.status_code": 200, "end": -INF}))
    sink.emit(("c", 2, 3, 7, 9, 8, "app", "db", 1, {"span.kind": "user", **_odd_attrs()}))
    sink.close()


def test_file_sink_writes_strict_json_and_load_reads_the_floats_back(tmp_path: Path) -> None:
    """Every line is strict JSON (it was ``NaN``/``Infinity``), and ``load`` gives the
    floats back where they were floats, strings where the app set strings."""
    path = tmp_path / "t.jsonl"
    _write_odd(path)
    text = path.read_text()
    lines = [_strict_loads(line) for line in text.splitlines()]
    assert "NaN," not in text and "Infinity," not in text
    score = next(line for line in lines if line.get("name") == "score")
    assert score["attrs"]["ratio"] == "NaN" and score["attrs"]["high"] == "Infinity"
    assert ["attrs", "ratio"] in score["nonfinite"]
    assert ["attrs", "said"] not in score["nonfinite"]
    [trace] = load(path, strict=True)
    app, db = sorted(trace.spans.values(), key=lambda s: s.name)
    assert math.isnan(app.attrs["start"]) and app.attrs["end"] == -INF
    [event] = [e for e in app.events if e.name == "score"]
    _check_odd(event.attrs)
    _check_odd(db.attrs)
    for event_dict in read_events(path):
        assert "nonfinite" not in event_dict  # the marker is the file's, not the event's


def test_a_viewer_reading_summaries_gets_the_floats_back_too(tmp_path: Path) -> None:
    """A viewer reads the summaries, and a trace's lines only when it is opened: the
    same floats come back there.  The late event makes the writer fold the lines it
    kept for the trace (read back as a reader does)."""
    path = tmp_path / "t.jsonl"
    clock = [0.0]
    writer = TraceFileWriter.create(path, clock=lambda: clock[0])
    trace_id, span_id = "7" * 32, "8" * 16
    writer.write(
        [
            {"kind": "span_start", "ts": 1, "trace_id": trace_id, "span_id": span_id,
             "parent_id": None, "hop": "app", "name": "GET /",
             "attrs": {"http.response.body.size": NAN, **_odd_attrs()}},
            {"kind": "span_end", "ts": 3, "trace_id": trace_id, "span_id": span_id,
             "attrs": {"end": INF}},
        ]
    )  # fmt: skip
    writer.write(
        [
            {"kind": "event", "ts": 2, "trace_id": trace_id, "span_id": span_id,
             "name": "late", "attrs": {"v": -INF}},
        ]
    )  # fmt: skip
    writer.close()
    for line in path.read_text().splitlines():
        _strict_loads(line)  # the summary lines too (an outline attribute was nan)
    scan = SummaryScan(path)
    found = [trace for chunk, _ in scan.chunks() for trace, _ in chunk]
    assert scan.complete and found
    lazy = found[-1]
    assert isinstance(lazy, SummarisedTrace) and not lazy.loaded
    [span] = lazy.spans.values()
    _check_odd(span.attrs)
    assert math.isnan(span.attrs["http.response.body.size"]) and span.attrs["end"] == INF
    assert [e.attrs for e in span.events] == [{"v": -INF}]


def test_files_written_with_nan_literals_still_load(tmp_path: Path) -> None:
    """Files written before (Python's JSON dialect) keep loading, floats and all."""
    path = tmp_path / "old.jsonl"
    trace_id, span_id = "7" * 32, "8" * 16
    path.write_text(
        '{"format":"hopscope","version":"1.2","created":1,"pid":1}\n'
        f'{{"kind":"span_start","ts":1,"trace_id":"{trace_id}","span_id":"{span_id}",'
        '"parent_id":null,"hop":"app","name":"x","attrs":{"a":NaN,"b":[Infinity,-Infinity]}}\n'
    )
    [trace] = load(path, strict=True)
    [span] = trace.spans.values()
    assert math.isnan(span.attrs["a"]) and span.attrs["b"] == [INF, -INF]


def test_a_marker_that_points_nowhere_is_ignored(tmp_path: Path) -> None:
    """Files are input: a ``nonfinite`` list pointing at missing keys, at values that
    are no such string, or that is no list, changes nothing and raises nothing."""
    path = tmp_path / "odd.jsonl"
    trace_id, span_id = "7" * 32, "8" * 16
    start = (
        f'"kind":"span_start","ts":1,"trace_id":"{trace_id}","span_id":"{span_id}",'
        '"parent_id":null,"hop":"app","name":"x"'
    )
    path.write_text(
        '{"format":"hopscope","version":"1.2","created":1,"pid":1}\n'
        f'{{{start},"attrs":{{"a":"NaN","b":"x","c":[1]}},'
        '"nonfinite":[["attrs","zz"],["attrs","b"],["attrs","c",5],[],"no",["attrs","a"]]}\n'
        f'{{"kind":"event","ts":2,"trace_id":"{trace_id}","span_id":"{span_id}",'
        '"name":"e","attrs":{"v":"NaN"},"nonfinite":{"not":"a list"}}\n'
    )
    [trace] = load(path, strict=True)
    [span] = trace.spans.values()
    assert math.isnan(span.attrs["a"])
    assert span.attrs["b"] == "x" and span.attrs["c"] == [1]
    assert span.events[0].attrs == {"v": "NaN"}


@pytest.mark.parametrize("form", ["har", "otlp"])
def test_exports_of_a_trace_with_non_finite_floats_are_strict_json(
    tmp_path: Path, form: str
) -> None:
    path = tmp_path / "t.jsonl"
    _write_odd(path)
    out = tmp_path / f"out.{form}"
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "export", str(path), f"--{form}", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    _strict_loads(out.read_text())
