"""Trace files: what FileSink writes, load() reads back, and what it refuses or skips."""

from __future__ import annotations

import base64
import gc
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
from hopscope.tracing import tracefile
from hopscope.tracing.model import Trace
from hopscope.tracing.records import BODY_LIMIT, Record
from hopscope.tracing.sinks import FileSink, MemorySink
from hopscope.tracing.tracefile import (
    FORMAT_VERSION,
    LoadReport,
    TraceFileError,
    TraceFileWarning,
    header_line,
    load,
    read_events,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# -- strategies ---------------------------------------------------------------------

# Every code point, lone surrogates included: JSON escapes them, so they must survive.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
TRACE_IDS = st.sampled_from([1, 0xABC, 2**128 - 1, 0x4BF92F3577B34DA6A3CE929D0E0E4736])
SPAN_IDS = st.sampled_from([1, 2, 3, 0xFFFF, 2**64 - 1])
PARENTS = st.one_of(st.just(0), SPAN_IDS)
TS = st.integers(0, 2**63 - 1)
TID = st.integers(0, 2**64)

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),  # NaN != NaN: everything else round-trips exactly
    TEXT,
    st.binary(max_size=16),
)
NESTED = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(TEXT, inner, max_size=3),
    ),
    max_leaves=10,
)
HEADER_PAIRS = st.lists(
    st.tuples(st.binary(max_size=10), st.binary(max_size=20)) | st.tuples(TEXT, TEXT),
    max_size=4,
)
BODIES = st.binary(max_size=64) | st.lists(st.binary(max_size=32), max_size=4)
PLAIN_KEYS = TEXT.filter(
    lambda k: (
        not k.endswith(".body")
        and k not in {"http.request.headers", "http.response.headers", "http.response.trailers"}
    )
)


@st.composite
def attrs_strategy(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    attrs: dict[str, Any] = draw(st.dictionaries(PLAIN_KEYS, NESTED, max_size=4))
    for key in ("http.request.headers", "http.response.headers", "http.response.trailers"):
        if draw(st.booleans()):
            attrs[key] = draw(HEADER_PAIRS)
    for direction in ("request", "response"):
        if draw(st.booleans()):
            body = draw(BODIES)
            attrs[f"http.{direction}.body"] = body
            size = len(body) if isinstance(body, bytes) else sum(map(len, body))
            attrs[f"http.{direction}.body.size"] = size
            attrs[f"http.{direction}.body.truncated"] = False
    return attrs


@st.composite
def records_strategy(draw: st.DrawFn) -> Record:
    shape = draw(st.sampled_from("sepc"))
    trace_id, span_id, attrs = draw(TRACE_IDS), draw(SPAN_IDS), draw(attrs_strategy())
    if shape == "s":
        hop_name_tid = (draw(TEXT), draw(TEXT), draw(TID))
        return ("s", draw(TS), trace_id, span_id, draw(PARENTS), *hop_name_tid, attrs)
    if shape == "e":
        return ("e", draw(TS), trace_id, span_id, attrs)
    if shape == "p":
        return ("p", draw(TS), trace_id, span_id, draw(TEXT), attrs)
    start, end, parent = draw(TS), draw(TS), draw(PARENTS)
    hop_name_tid = (draw(TEXT), draw(TEXT), draw(TID))
    return ("c", start, end, trace_id, span_id, parent, *hop_name_tid, attrs)


# -- helpers ------------------------------------------------------------------------


def write_records(path: Path, records: list[Record]) -> None:
    sink = FileSink(path, interval=0.01)
    for record in records:
        sink.emit(record)
    sink.flush()
    sink.close()
    assert sink.dropped == 0


def load_quietly(path: Path) -> list[Trace]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file must load without a warning
        return load(path)


def memory_traces(records: list[Record]) -> tuple[list[dict[str, Any]], list[Trace]]:
    memory = MemorySink()
    for record in records:
        memory.emit(record)
    return memory.events(), memory.traces()


def span_record(trace_id: int, span_id: int, i: int) -> list[Record]:
    return [
        ("s", 1000 + i, trace_id, span_id, 0, "app", f"GET /{i}", 7, {"url.path": f"/{i}"}),
        ("p", 1001 + i, trace_id, span_id, "response.start", {"status": 200}),
        ("e", 1002 + i, trace_id, span_id, {"http.response.status_code": 200}),
    ]


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, list[Trace]]:
    """A clean file of three traces, and what it loads as."""
    path = tmp_path / "sample.jsonl"
    records = [r for i in range(3) for r in span_record(i + 1, 100 + i, i)]
    write_records(path, records)
    return path, load_quietly(path)


def lines_of(path: Path) -> list[bytes]:
    """The header and event lines (summary lines left out: these tests damage events;
    tests/test_tracefile_summary.py covers summaries)."""
    lines = path.read_bytes().splitlines(keepends=True)
    return [line for line in lines if not line.startswith(b'{"kind":"summary"')]


# -- round trip ---------------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(records_strategy(), max_size=12))
def test_file_round_trip_equals_memory(records: list[Record]) -> None:
    expected_events, expected_traces = memory_traces(records)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.jsonl"
        write_records(path, records)
        assert list(read_events(path)) == expected_events
        assert load_quietly(path) == expected_traces


def test_wire_events_are_normalised(tmp_path: Path) -> None:
    trace_id, span_id, parent = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 0x1
    path = tmp_path / "t.jsonl"
    headers = [(b"host", b"example.com"), (b"x-dup", b"1"), (b"x-dup", b"\xff")]
    start_attrs = {"http.request.headers": headers, "raw": b"\xe9t\xe9", "gone": None}
    records: list[Record] = [
        ("s", 10, trace_id, span_id, parent, "app", "GET /", 42, start_attrs),
        ("p", 11, trace_id, span_id, "request.body", {"size": 3, "more": False}),
        ("e", 12, trace_id, span_id, {"http.request.body": [b"ab", b"c"]}),
        ("c", 13, 14, trace_id, 2, span_id, "app", "background", 42, {"ok": (1, 2)}),
    ]
    write_records(path, records)
    header = json.loads(lines_of(path)[0])
    assert header["format"] == "hopscope" and header["version"] == FORMAT_VERSION
    assert header["pid"] == os.getpid() and isinstance(header["created"], int)

    start, event, end, c_start, c_end = read_events(path)
    assert start["kind"] == "span_start" and start["ts"] == 10
    assert start["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert start["span_id"] == "00f067aa0ba902b7" and start["parent_id"] == "0000000000000001"
    assert (start["hop"], start["name"]) == ("app", "GET /")
    attrs = start["attrs"]
    assert attrs["http.request.headers"] == [
        ["host", "example.com"],
        ["x-dup", "1"],
        ["x-dup", "\xff"],  # latin-1: every byte survives
    ]
    assert attrs["raw"] == "\xe9t\xe9" and "gone" not in attrs
    assert attrs["thread.id"] == 42 and attrs["process.pid"] == os.getpid()
    assert event == {
        "kind": "event",
        "ts": 11,
        "trace_id": start["trace_id"],
        "span_id": start["span_id"],
        "name": "request.body",
        "attrs": {"size": 3, "more": False},
    }
    assert end["kind"] == "span_end" and end["ts"] == 12
    assert base64.b64decode(end["attrs"]["http.request.body"]) == b"abc"
    # A whole span: a start without attrs (but with process info) and an end with them.
    assert c_start["kind"] == "span_start" and c_start["parent_id"] == start["span_id"]
    assert "ok" not in c_start["attrs"] and c_start["attrs"]["process.pid"] == os.getpid()
    assert c_end == {
        "kind": "span_end",
        "ts": 14,
        "trace_id": start["trace_id"],
        "span_id": "0000000000000002",
        "attrs": {"ok": [1, 2]},
    }
    (trace,) = load_quietly(path)
    root = trace.root
    assert root is not None and root.body("request") == b"abc"
    assert [child.name for child in trace.children(root)] == ["background"]


def test_root_span_has_no_parent_id(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_records(path, [("s", 1, 5, 6, 0, "app", "x", 1, None)])
    (event,) = read_events(path)
    assert event["parent_id"] is None and event["trace_id"] == f"{5:032x}"


def test_bodies_are_written_as_the_recorder_cut_them(tmp_path: Path) -> None:
    """The middleware cuts a body to its own ``body_limit``; the encoder keeps what it got
    (a limit above the 64 KiB default must reach the file whole)."""
    path = tmp_path / "t.jsonl"
    body = bytes(range(256)) * (BODY_LIMIT // 256 + 40)
    kept = body[: BODY_LIMIT + 5000]
    chunks = [kept[i : i + 1000] for i in range(0, len(kept), 1000)]
    attrs = {
        "http.response.body": chunks,
        "http.response.body.size": len(body),
        "http.response.body.truncated": True,
    }
    write_records(path, [("c", 1, 2, 9, 9, 0, "app", "GET /big", 1, attrs)])
    (trace,) = load_quietly(path)
    span = trace.spans[f"{9:016x}"]
    assert span.body("response") == kept
    assert span.attrs["http.response.body.size"] == len(body)
    assert span.attrs["http.response.body.truncated"] is True


def test_dropped_records_are_written_as_a_dropped_event(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    # A long interval: nothing drains before close(), so the queue fills and drops.
    sink = FileSink(path, max_queue=3, interval=60)
    for i in range(10):
        sink.emit(("p", i, 1, 1, "tick", {"i": i}))
    assert sink.dropped == 7
    sink.close()
    events = list(read_events(path))
    dropped = [e for e in events if e["kind"] == "dropped"]
    assert [e["count"] for e in dropped] == [7]
    assert dropped[0]["attrs"]["process.pid"] == os.getpid()
    assert [e["attrs"]["i"] for e in events if e["kind"] == "event"] == [0, 1, 2]
    assert sink.dropped == 7  # emit after close is dropped and counted
    sink.emit(("p", 99, 1, 1, "late", None))
    assert sink.dropped == 8


# -- file permissions ---------------------------------------------------------------


def test_file_is_private_even_if_it_existed(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("old content that must go\n" * 10)
    os.chmod(path, 0o644)
    sink = FileSink(path)
    sink.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert lines_of(path) == [lines_of(path)[0]]  # truncated: only the new header
    assert json.loads(lines_of(path)[0])["format"] == "hopscope"


def test_new_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    old = os.umask(0)  # even a permissive umask must not widen it
    try:
        FileSink(path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- refusing files -----------------------------------------------------------------


def assert_one_line_error(path: Path, *fragments: str) -> str:
    with pytest.raises(TraceFileError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message
    return message


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert_one_line_error(path, "not a hopscope trace file", str(path))


def test_file_without_header_is_refused(tmp_path: Path, sample: tuple[Path, list[Trace]]) -> None:
    path = tmp_path / "headless.jsonl"
    path.write_bytes(b"".join(lines_of(sample[0])[1:]))
    assert_one_line_error(path, "not a hopscope trace file")


@pytest.mark.parametrize(
    "first_line",
    [
        b'{"format": "otlp", "version": "1.0"}\n',
        b'{"version": "1.0"}\n',
        b'["hopscope", "1.0"]\n',
        b"hopscope 1.0\n",
        b"\x89PNG\r\n",
    ],
)
def test_header_of_another_format_is_refused(tmp_path: Path, first_line: bytes) -> None:
    path = tmp_path / "other.jsonl"
    path.write_bytes(first_line + b'{"kind": "dropped", "ts": 1, "count": 1}\n')
    assert_one_line_error(path, "not a hopscope trace file")


def test_newer_major_version_is_refused(tmp_path: Path, sample: tuple[Path, list[Trace]]) -> None:
    path = tmp_path / "future.jsonl"
    header = {"format": "hopscope", "version": "2.0", "created": 1, "pid": 1}
    path.write_bytes(json.dumps(header).encode() + b"\n" + b"".join(lines_of(sample[0])[1:]))
    message = assert_one_line_error(path, "2.0", "newer", "upgrade hopscope")
    assert message.startswith(str(path))


def test_newer_minor_version_is_read(tmp_path: Path, sample: tuple[Path, list[Trace]]) -> None:
    path = tmp_path / "minor.jsonl"
    header = {"format": "hopscope", "version": "1.7", "future_field": [1]}
    path.write_bytes(json.dumps(header).encode() + b"\n" + b"".join(lines_of(sample[0])[1:]))
    assert load_quietly(path) == sample[1]


@pytest.mark.parametrize("version", ["0.9", "-1.0", "banana", None])
def test_unconvertible_version_is_refused(tmp_path: Path, version: str | None) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"format": "hopscope", "version": version}) + "\n")
    assert_one_line_error(path, str(path))


def test_older_major_versions_go_through_upgrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample: tuple[Path, list[Trace]]
) -> None:
    # Pretend this hopscope reads format 2, whose events carry a "v2" marker.
    def upgrade(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "attrs": {**event.get("attrs", {}), "v2": True}}

    monkeypatch.setattr(tracefile, "FORMAT_VERSION", "2.0")
    monkeypatch.setitem(tracefile.UPGRADES, 1, upgrade)
    events = list(read_events(sample[0]))
    assert events and all(e["attrs"]["v2"] is True for e in events)
    monkeypatch.delitem(tracefile.UPGRADES, 1)
    assert_one_line_error(sample[0], "cannot convert")


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "nope.jsonl", "cannot open", "nope.jsonl")
    assert_one_line_error(tmp_path, "cannot open")  # a directory


# -- damaged files ------------------------------------------------------------------


def load_with_warning(path: Path, *fragments: str) -> list[Trace]:
    with pytest.warns(TraceFileWarning) as caught:
        traces = load(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(TraceFileError):
        load(path, strict=True)
    return traces


def test_cut_off_last_line_keeps_everything_before(
    tmp_path: Path, sample: tuple[Path, list[Trace]]
) -> None:
    source, expected = sample
    path = tmp_path / "crashed.jsonl"
    lines = lines_of(source)
    last = lines[-1]
    # The cut-off line is the last span_end: without it the last span is unfinished.
    path.write_bytes(b"".join(lines[:-1]) + last[: len(last) // 2])
    traces = load_with_warning(path, "last line was cut off", f"kept {len(lines) - 2} events")
    assert traces[:-1] == expected[:-1]
    assert not traces[-1].finished and expected[-1].finished
    report = LoadReport()
    list(read_events(path, report))
    assert report.truncated_last_line and not report.malformed_lines


def test_complete_last_line_without_newline_is_kept(
    tmp_path: Path, sample: tuple[Path, list[Trace]]
) -> None:
    path = tmp_path / "no-newline.jsonl"
    path.write_bytes(sample[0].read_bytes().rstrip(b"\n"))
    assert load_quietly(path) == sample[1]


@pytest.mark.parametrize("chunk", [1 << 20, 300, 1])
def test_malformed_middle_lines_are_skipped_and_counted(
    tmp_path: Path, sample: tuple[Path, list[Trace]], chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lines are decoded a chunk at a time; wherever a chunk ends, the result is the same.
    monkeypatch.setattr(tracefile, "_CHUNK_BYTES", chunk)
    source, expected = sample
    path = tmp_path / "damaged.jsonl"
    lines = lines_of(source)
    garbage = [
        b"not json at all\n",
        b"[1, 2, 3]\n",  # JSON, but not an object
        b"42\n",
        b'"a string"\n',
        b"null\n",
        b'{"no": "kind"}\n',
        b'{"kind": "span_start", "trace_id": "ab", "span_id": "cd"}\n',  # no ts
        b'{"kind": 7, "ts": 1, "trace_id": "ab", "span_id": "cd"}\n',
        b'{"kind": "event", "ts": 1, "trace_id": "ab", "span_id": "cd", "attrs": [1]}\n',
        b'{"kind": "span_end", "ts": "soon", "trace_id": "ab", "span_id": "cd"}\n',
        b'{"kind": "event", "ts": 1, "trace_id": 5, "span_id": "cd"}\n',
        b"\xff\xfe\x00 bad utf-16\n",
        b'{"kind": "\xff"}\n',  # not UTF-8
        b"[" * 200_000 + b"\n",  # nested past the recursion limit
        b'{"kind": "span_start", "ts": 1\n',  # cut off, but not the last line
        # Two broken halves that make one event when glued: each line is its own event.
        b'{"kind": "event", "ts": 1, "trace_id": "ab", "span_id": "cd", "attrs": {"x": [1\n',
        b"2]}}\n",
    ]
    # A kind this reader does not know (a newer minor version's) is skipped, not an error.
    unknown = b'{"kind": "teleport", "ts": 1, "trace_id": "ab", "span_id": "cd"}\n'
    mixed = lines[:2] + garbage + [unknown] + lines[2:]
    path.write_bytes(b"".join(mixed))
    traces = load_with_warning(
        path, f"skipped {len(garbage)} malformed line(s)", f"kept {len(lines) - 1} events"
    )
    assert traces == expected  # and no phantom trace "ab" from the bad events
    report = LoadReport()
    events = list(read_events(path, report))
    assert len(events) == len(lines) - 1 + 5  # five bad events parse, the model rejects them
    # Line numbers are 1-based file lines: the header is line 1.
    assert report.malformed_lines[:6] == [3, 4, 5, 6, 7, 8]
    assert not report.truncated_last_line
    assert report.skipped == 1


def test_header_line_is_one_json_object_per_line() -> None:
    line = header_line()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line)["version"] == FORMAT_VERSION


def test_load_leaves_the_garbage_collector_as_it_found_it(
    sample: tuple[Path, list[Trace]],
) -> None:
    assert gc.isenabled()
    assert load_quietly(sample[0]) == sample[1]
    assert gc.isenabled()
    gc.disable()
    try:
        assert load_quietly(sample[0]) == sample[1]
        assert not gc.isenabled()
    finally:
        gc.enable()
