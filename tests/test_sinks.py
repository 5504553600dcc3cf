"""Sinks, the collector wire protocol, and user spans."""

from __future__ import annotations

import asyncio
import http
import io
import marshal
import os
import socket
import struct
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from frames import ThreadCollector, Unrecordable, listener, url_of
from hopscope.tracing import sinks
from hopscope.tracing.context import SpanContext, current, span
from hopscope.tracing.exceptions import exception_event
from hopscope.tracing.records import Record
from hopscope.tracing.sinks import (
    WIRE_MAGIC,
    FileSink,
    MemorySink,
    Recording,
    Sink,
    SocketSink,
    decode_frame,
    default_sink,
    encode_frame,
    parse_address,
    sink_from_url,
)
from hopscope.tracing.tracefile import read_events

# -- MemorySink ---------------------------------------------------------------------


def test_memory_sink_is_bounded_and_counts_drops() -> None:
    sink = MemorySink(max_records=5)
    records = [("p", i, 1, 1, "tick", {"i": i}) for i in range(8)]
    for record in records:
        sink.emit(record)
    assert sink.records() == records[:5]  # the oldest are kept, the newest dropped
    assert sink.dropped == 3
    sink.clear()
    assert sink.records() == [] and sink.dropped == 0
    sink.emit(records[7])
    assert sink.records() == [records[7]]


def test_memory_sink_assembles_traces() -> None:
    sink = MemorySink()
    sink.emit(("s", 1, 0xAB, 0xCD, 0, "app", "GET /", 3, {"url.path": "/"}))
    sink.emit(("p", 2, 0xAB, 0xCD, "response.start", {"status": 201}))
    sink.emit(("e", 3, 0xAB, 0xCD, {"http.response.status_code": 201}))
    (trace,) = sink.traces()
    assert trace.trace_id == f"{0xAB:032x}" and trace.finished and trace.status == 201
    root = trace.root
    assert root is not None and root.duration_ns == 2
    assert root.attrs["process.pid"] == os.getpid()
    event = root.event("response.start")
    assert event is not None and event.attrs == {"status": 201}


# -- FileSink -----------------------------------------------------------------------


def test_file_sink_batches_records_from_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "threads.jsonl"
    sink = FileSink(path, interval=0.001)
    threads_n, per_thread = 8, 1500
    barrier = threading.Barrier(threads_n)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            sink.emit(("p", i, n + 1, 1, "tick", {"n": n, "i": i}))
            if i % 500 == 0:
                sink.flush()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    sink.close()
    assert sink.dropped == 0
    seen = Counter((e["attrs"]["n"], e["attrs"]["i"]) for e in read_events(path))
    assert len(seen) == threads_n * per_thread
    assert set(seen.values()) == {1}


def test_flush_waits_for_the_batch_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "flush.jsonl"
    sink = FileSink(path, interval=0.001)
    written = 0
    for round_ in range(40):
        for i in range(1000):
            sink.emit(("p", i, 1, 1, "tick", {"round": round_, "pad": "x" * 100}))
        written += 1000
        sink.flush()
        assert len(path.read_bytes().splitlines()) == written + 1  # + header
    sink.close()


def _fork_child(sink: Sink) -> None:
    """Runs in the forked child: never returns."""
    code = 1
    try:
        for i in range(50):
            sink.emit(("s", i, 2, 1000 + i, 0, "app", "child", 1, {"i": i}))
        sink.close()
        code = 0
    finally:
        os._exit(code)


def test_fork_child_and_parent_records_each_appear_once(tmp_path: Path) -> None:
    path = tmp_path / "fork.jsonl"
    # A long interval keeps the parent's records queued at fork time: the child
    # must not write them a second time.
    sink = FileSink(path, interval=60)
    for i in range(50):
        sink.emit(("s", i, 1, 1 + i, 0, "app", "before", 1, {"i": i}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:
        _fork_child(sink)
    for i in range(50):
        sink.emit(("s", i, 3, 2000 + i, 0, "app", "after", 1, {"i": i}))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.close()
    events = [e for e in read_events(path) if e["kind"] == "span_start"]
    counts = Counter((e["name"], e["attrs"]["i"]) for e in events)
    assert set(counts.values()) == {1} and len(counts) == 150
    pids = {e["name"]: set() for e in events}
    for event in events:
        pids[event["name"]].add(event["attrs"]["process.pid"])
    assert pids == {"before": {os.getpid()}, "after": {os.getpid()}, "child": {pid}}


# -- SocketSink ---------------------------------------------------------------------


def _listener(family: str, where: Path) -> tuple[socket.socket, str]:
    sock = listener("0" if family == "tcp" else f"unix:{where / 'c.sock'}")
    return sock, url_of(sock)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_socket_sink_delivers_frames(family: str, short_dir: Path) -> None:
    listener, url = _listener(family, short_dir)
    collector = ThreadCollector(listener)
    sink = SocketSink(url, interval=0.005)
    records: list[Record] = [
        ("s", 1, 7, 8, 0, "app", "GET /", 1, {"http.request.headers": [(b"a", b"b")]}),
        ("p", 2, 7, 8, "request.body", {"size": 3, "more": False}),
        ("e", 3, 7, 8, {"http.request.body": [b"abc"], "status": http.HTTPStatus.OK}),
        ("c", 4, 5, 7, 9, 8, "app", "background", 1, {"odd": object()}),
    ]
    for record in records:
        sink.emit(record)
    sink.flush()
    collector.wait_for(lambda: len(collector.records) >= len(records))
    sink.close()
    collector.stop()
    assert collector.magics == [WIRE_MAGIC]
    ended = ("e", 3, 7, 8, {"http.request.body": [b"abc"], "status": 200})
    assert collector.records[:3] == [*records[:2], ended]  # HTTPStatus travels as int
    background = collector.records[3]
    assert background[:9] == records[3][:9]
    assert background[9]["odd"].startswith("<object object")  # repr: objects do not travel
    info = collector.frames[0][0]
    assert info["process.pid"] == os.getpid()
    assert collector.dropped == 0 and sink.connects == 1


def test_socket_sink_never_blocks_and_reconnects(short_dir: Path) -> None:
    # Bound but not listening: connecting is refused until listen() below.
    listener, url = _listener("tcp", short_dir)
    max_queue, emitted = 1000, 200_000
    sink = SocketSink(url, max_queue=max_queue, interval=0.005)
    queue = sink._queue
    longest = 0
    for i in range(emitted):
        sink.emit(("p", i, 1, 1, "tick", None))
        if i % 64 == 0:
            longest = max(longest, len(queue))
    queued = len(queue)
    assert longest <= max_queue and queued == max_queue
    assert sink.dropped == emitted - queued
    assert sink.connects == 0

    collector = ThreadCollector(listener)  # listening from now
    collector.wait_for(lambda: len(collector.records) >= queued)
    sink.emit(("p", -1, 1, 1, "after", None))
    collector.wait_for(lambda: len(collector.records) >= queued + 1)
    sink.close()
    collector.stop()
    assert sink.connects == 1
    assert [r[1] for r in collector.records] == [*range(queued), -1]  # the oldest were kept
    assert collector.dropped == emitted - queued  # the drop count reaches the collector


def test_socket_sink_close_without_server_returns(short_dir: Path) -> None:
    listener, url = _listener("tcp", short_dir)
    try:
        sink = SocketSink(url, interval=0.005)
        sink.emit(("p", 1, 1, 1, "x", None))
        sink.flush(timeout=0.2)
        sink.close()
        sink.emit(("p", 2, 1, 1, "x", None))  # after close: dropped, counted
        assert sink.dropped >= 1
    finally:
        listener.close()


# -- addresses and URLs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:7401", ("tcp", ("127.0.0.1", 7401))),
        ("localhost:80", ("tcp", ("localhost", 80))),
        (":9000", ("tcp", ("127.0.0.1", 9000))),
        ("tcp://:0", ("tcp", ("127.0.0.1", 0))),
        ("tcp://[::1]:7401", ("tcp", ("::1", 7401))),
        ("unix:/tmp/hs.sock", ("unix", "/tmp/hs.sock")),
        ("unix:///tmp/hs.sock", ("unix", "/tmp/hs.sock")),
        ("unix:relative.sock", ("unix", "relative.sock")),
    ],
)
def test_parse_address_accepts(address: str, expected: tuple[str, Any]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "tcp://",
        "tcp://host",
        "host:",
        "host:http",
        "host:-1",
        "host:65536",
        "host:²",  # a digit to str.isdigit, not to int()
        "http://host:80",
        "tcp://host:80/path",
        "unix:",
        "unix://",
    ],
)
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(address)
    message = str(info.value)
    assert repr(address) in message and "\n" not in message


def test_sink_from_url(tmp_path: Path) -> None:
    assert isinstance(sink_from_url("memory:"), MemorySink)
    for url in (f"file:{tmp_path}/a.jsonl", f"file://{tmp_path}/b.jsonl"):
        file_sink = sink_from_url(url)
        assert isinstance(file_sink, FileSink)
        file_sink.close()
    assert (tmp_path / "a.jsonl").exists() and (tmp_path / "b.jsonl").exists()
    for url, family in (("tcp://127.0.0.1:9", "tcp"), ("unix:/tmp/none.sock", "unix")):
        socket_sink = sink_from_url(url)
        assert isinstance(socket_sink, SocketSink) and socket_sink.family == family
        socket_sink.close()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "HOPSCOPE_SINK must be"),
        ("stdout", "HOPSCOPE_SINK must be"),
        ("http://127.0.0.1:80", "HOPSCOPE_SINK must be"),
        ("memory", "HOPSCOPE_SINK must be"),
        ("file:", "needs a path"),
        ("tcp://nohost", "expected HOST:PORT"),
        ("unix:", "no socket path"),
    ],
)
def test_sink_from_url_rejects(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        sink_from_url(url)
    assert "\n" not in str(info.value)


def test_default_sink_follows_hopscope_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "_default", None)
    monkeypatch.setenv("HOPSCOPE_SINK", "memory:")
    first = default_sink()
    assert isinstance(first, MemorySink) and default_sink() is first

    monkeypatch.setattr(sinks, "_default", None)
    monkeypatch.delenv("HOPSCOPE_SINK")
    collector = default_sink()
    assert isinstance(collector, SocketSink)
    assert (collector.family, collector.address) == ("tcp", ("127.0.0.1", 7401))
    collector.close()


# -- frames -------------------------------------------------------------------------


def test_encode_and_decode_frame_round_trip() -> None:
    batch: list[Record] = [
        ("s", 1, 2**127, 3, 0, "app", "GET /é", 9, {"h": [(b"k", b"v")], "n": None}),
        ("e", 2, 2**127, 3, None),
        ("p", 3, 2**127, 3, "x", {"nested": {"a": [1, 2.5, True]}}),
        ("c", 4, 5, 2**127, 4, 3, "app", "background", 9, {}),
        ("r", 1, 2**127, 3, 0, 9, "asgi", ("GET", None), 1, (2, 200), [(2, 1, 200, []), None]),
    ]
    frame = encode_frame(batch, 12, {"process.pid": 42})
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    assert decode_frame(frame[4:]) == ({"process.pid": 42}, 12, batch)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00garbage", id="not-marshal"),
        pytest.param(marshal.dumps([1, {}, 0, []]), id="list-not-tuple"),
        pytest.param(marshal.dumps((1, {}, 0)), id="too-short"),
        pytest.param(marshal.dumps((2, {}, 0, [])), id="other-version"),
        pytest.param(marshal.dumps((1, [], 0, [])), id="info-not-dict"),
        pytest.param(marshal.dumps((1, {}, "0", [])), id="dropped-not-int"),
        pytest.param(marshal.dumps((1, {}, 0, ())), id="batch-not-list"),
    ],
)
def test_decode_frame_rejects_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(ValueError, match=r"hopscope batch|malformed record"):
        decode_frame(payload)


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(["p", 1, 1, 1, "x", None], id="list-record"),
        pytest.param((), id="empty-record"),
        pytest.param(("x", 1), id="unknown-shape"),
        pytest.param((["s"], 1), id="unhashable-shape"),
        pytest.param(("s", 1, 2, 3), id="short-record"),
        pytest.param(("p", 1, 1, 1, "x", None, 0), id="long-record"),
        pytest.param(("r", 1, 2, 3, 0, 9, "asgi"), id="short-r"),
    ],
)
def test_decode_frame_leaves_out_and_counts_a_record_of_no_known_shape(record: Any) -> None:
    # One such record costs itself, not the batch of other requests it came with.
    good = ("p", 3, 2**127, 3, "x", {})
    payload = marshal.dumps((1, {}, 2, [good, record, good]))
    assert decode_frame(payload) == ({}, 3, [good, good])


# -- user spans ---------------------------------------------------------------------


@pytest.fixture
def request_context() -> Iterator[tuple[MemorySink, SpanContext]]:
    """What a middleware does at the start of a request, set by hand."""
    sink = MemorySink()
    context = SpanContext(sink, 0xAA, 0xBB)
    token = current.set(context)
    try:
        yield sink, context
    finally:
        current.reset(token)
    assert current.get() is None


def test_span_outside_a_request_records_nothing() -> None:
    assert current.get() is None
    with span("lonely", key="value") as timed:
        assert current.get() is None
    assert isinstance(timed, span)


def test_span_records_start_and_end_under_the_request(
    request_context: tuple[MemorySink, SpanContext],
) -> None:
    sink, context = request_context
    with span("db", table="users"):
        inner = current.get()
        assert inner is not None and inner.span_id != context.span_id
        assert (inner.sink, inner.trace_id) == (sink, context.trace_id)
    assert current.get() is context
    start, end = sink.records()
    assert start[0] == "s" and end[0] == "e"
    _, t0, trace_id, span_id, parent_id, hop, name, thread_id, attrs = start
    assert (trace_id, parent_id, hop, name) == (0xAA, 0xBB, "app", "db")
    assert span_id == inner.span_id and thread_id == threading.get_ident()
    assert attrs == {"span.kind": "user", "table": "users"}
    assert end[2:4] == (0xAA, span_id) and end[4] is None and end[1] >= t0


def test_nested_spans_nest(request_context: tuple[MemorySink, SpanContext]) -> None:
    sink, context = request_context
    with span("outer"):
        with span("inner"):
            pass
        with span("sibling"):
            pass
    assert current.get() is context
    spans = {s.name: s for s in sink.traces()[0].spans.values()}
    outer = spans["outer"]
    assert outer.parent_id == f"{0xBB:016x}"
    assert spans["inner"].parent_id == outer.span_id == spans["sibling"].parent_id
    assert all(s.finished for s in spans.values())


def test_span_records_exceptions_and_lets_them_propagate(
    request_context: tuple[MemorySink, SpanContext],
) -> None:
    sink, context = request_context
    with pytest.raises(KeyError, match="missing"):
        with span("lookup"):
            raise KeyError("missing")
    assert current.get() is context
    (trace,) = sink.traces()
    (failed,) = trace.spans.values()
    assert failed.finished and failed.attrs["error"] is True
    assert failed.attrs["exception.type"] == "KeyError"
    event = failed.event("exception")
    assert event is not None
    assert event.attrs["exception.type"] == "builtins.KeyError"
    assert "missing" in event.attrs["exception.message"]
    assert "Traceback" in event.attrs["exception.stacktrace"]


def test_async_spans(request_context: tuple[MemorySink, SpanContext]) -> None:
    sink, context = request_context

    async def step(name: str) -> None:
        async with span(name):
            await asyncio.sleep(0.001)
            assert current.get() is not None

    async def handler() -> None:
        async with span("handler"):
            # Concurrent tasks each nest under "handler", never under each other.
            await asyncio.gather(step("a"), step("b"))
            with pytest.raises(RuntimeError):
                async with span("boom"):
                    raise RuntimeError("x")
        assert current.get() is context

    asyncio.run(handler())
    assert current.get() is context
    spans = {s.name: s for s in sink.traces()[0].spans.values()}
    handler_span = spans["handler"]
    assert handler_span.parent_id == f"{0xBB:016x}"
    assert {spans[n].parent_id for n in "ab"} == {handler_span.span_id}
    assert spans["boom"].attrs["error"] is True and spans["boom"].event("exception")
    assert all(s.finished for s in spans.values())


def test_exception_event_shape() -> None:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        record = exception_event(1, 2, exc, phase="before_response")
    shape, ts, trace_id, span_id, name, attrs = record
    assert (shape, trace_id, span_id, name) == ("p", 1, 2, "exception") and ts > 0
    assert attrs["exception.type"] == "builtins.ValueError"
    assert attrs["exception.message"] == "bad value" and attrs["phase"] == "before_response"
    assert "raise ValueError" in attrs["exception.stacktrace"]
    marshal.dumps(record)  # it must be able to travel to a collector


def test_env_file_sinks_of_several_workers_append_to_one_trace(tmp_path: Path) -> None:
    """Each worker of a multi-process server makes its own sink from HOPSCOPE_SINK: the
    second must not wipe what the first wrote, and the header is written once."""
    path = tmp_path / "shared.jsonl"
    first = sink_from_url(f"file:{path}")
    first.emit(("c", 1, 2, 7, 1, 0, "app", "one", 0, None))
    first.close()
    second = sink_from_url(f"file:{path}")
    second.emit(("c", 3, 4, 8, 1, 0, "app", "two", 0, None))
    second.close()
    lines = path.read_text().splitlines()
    assert sum('"format":"hopscope"' in line for line in lines) == 1
    names = [e["name"] for e in read_events(path) if e["kind"] == "span_start"]
    assert names == ["one", "two"]
    # An explicit FileSink (hopscope's -o) starts a fresh trace.
    FileSink(path).close()
    assert list(read_events(path)) == []


# -- recordings (requests handed over whole) ------------------------------------------


def test_a_request_that_cannot_be_recorded_is_counted_and_the_drain_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "odd.jsonl"
    sink = FileSink(path, interval=0.01)
    assert sink.start_live(Unrecordable())
    sink.emit(("p", 5, 6, 7, "tick", None))
    sink.flush()
    assert [e["name"] for e in read_events(path) if e["kind"] == "event"] == ["tick"]
    sink.emit(("p", 8, 6, 7, "tock", None))
    sink.close()
    assert sink.dropped == 1
    events = list(read_events(path))
    assert [e["name"] for e in events if e["kind"] == "event"] == ["tick", "tock"]
    assert [e["count"] for e in events if e["kind"] == "dropped"] == [1]


def test_responses_never_closed_do_not_grow_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WSGI body nobody closes never ends its request; the sink follows only so many."""
    from hopscope.tracing import wrap

    monkeypatch.setattr(sinks, "MAX_INFLIGHT", 5)
    sink = FileSink(tmp_path / "open.jsonl")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"never closed"]

    wrapped = wrap(app, sink=sink)
    kept = []
    for n in range(12):
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": f"/{n}",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
        }
        kept.append(wrapped(environ, lambda status, headers, exc_info=None: None))
        sink.flush()
    assert len(sink._inflight) == 5
    assert sink.dropped == 7
    sink.close()
    starts = [e for e in read_events(tmp_path / "open.jsonl") if e["kind"] == "span_start"]
    assert len(starts) == 12  # what each request recorded before it was let go was kept


class _Finished(Recording):
    """A request as a middleware leaves it: its items, an end, maybe a seal."""

    interface = "asgi"

    def __init__(self, items: list[Any], end_at: int, done: bool) -> None:
        self.sink = MemorySink()
        self.start, self.trace_id, self.span_id, self.parent_id, self.thread_id = 1, 2, 3, 0, 4
        self.request = ("GET", "http", "1.1", "/", b"", None, None, [], "")
        self.end = (9, 200, None, None, 0, None, False, 0, None, False, None)
        self.items = items
        self.end_at = end_at
        self.done = done
        self._state = -1


def test_take_makes_what_a_snapshot_makes() -> None:
    """take's shortcut for a request over before its first take (one "r" record) and
    its general path (a seal not at the end, a request still running) agree with
    snapshot(); once it said all was sent, the sink lets the recording go."""
    event = ("p", 5, 2, 3, "log", None)
    cases = [
        ([event, None], 1, True),  # ended, then sealed: the shortcut
        ([None], 0, True),
        ([event, None], -1, True),  # sealed without an end
        ([event, None, ("p", 6, 2, 3, "late", None)], 1, True),  # a record after the seal
        ([event], 1, False),  # still running
    ]
    for items, end_at, done in cases:
        recording = _Finished(list(items), end_at, done)
        expected = recording.snapshot()
        out: list[Record] = []
        finished = recording.take(out)
        assert out == expected and finished is done
    (record,) = _Finished([event, None], 1, True).snapshot()
    assert record[0] == "r" and record[8] == 1 and record[9][0] == 9
