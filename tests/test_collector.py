"""The collector, fed by real SocketSinks (and by peers that misbehave on purpose)."""

from __future__ import annotations

import io
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.app.collector import BackgroundCollector, CollectorError
from hopscope.app.tail import Tail
from hopscope.tracing import SocketSink, load, wrap
from hopscope.tracing.records import new_span_id, new_trace_id
from hopscope.tracing.sinks import WIRE_MAGIC, encode_frame
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

Serve = Callable[[Any], AbstractContextManager[str]]


class Inbox:
    """A consumer that keeps every event and lets the test wait for some."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.batches = 0
        self._cond = threading.Condition()

    def __call__(self, events: list[dict[str, Any]]) -> None:
        with self._cond:
            self.events.extend(events)
            self.batches += 1
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
    ) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def spans_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == "span_start" and e["name"] == name]


def request_records(name: str = "GET /x", status: int = 200) -> list[tuple[Any, ...]]:
    trace_id, span_id = new_trace_id(), new_span_id()
    start = time.time_ns()
    attrs = {
        "interface": "asgi",
        "http.request.method": "GET",
        "url.path": "/x",
        "http.request.headers": [(b"host", b"example"), (b"x-dup", b"1"), (b"x-dup", b"2")],
    }
    return [
        ("s", start, trace_id, span_id, 0, "app", name, 1, attrs),
        ("p", start + 10, trace_id, span_id, "response.start", {"status": status}),
        ("e", start + 20, trace_id, span_id, {"http.response.status_code": status}),
    ]


def has_span(name: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e.get("name") == name for e in events)


def test_collector_receives_socket_sink_batches() -> None:
    inbox = Inbox()
    with BackgroundCollector("127.0.0.1:0", inbox) as collector:
        assert collector.url.startswith("tcp://127.0.0.1:")
        sink = SocketSink(collector.url)
        try:
            for record in request_records("GET /one"):
                sink.emit(record)
            assert inbox.wait_for(lambda ev: len(ev) >= 3)
        finally:
            sink.close()
    kinds = [e["kind"] for e in inbox.events]
    assert kinds == ["span_start", "event", "span_end"]
    start = inbox.events[0]
    # Normalised by the collector, not by the app: header bytes became text pairs.
    assert start["attrs"]["http.request.headers"] == [
        ["host", "example"],
        ["x-dup", "1"],
        ["x-dup", "2"],
    ]
    assert start["attrs"]["process.pid"] == os.getpid()
    assert len(start["trace_id"]) == 32
    assert collector.collector.frames >= 1
    assert collector.collector.rejected == 0


def test_a_collector_nobody_reads_counts_without_decoding() -> None:
    with BackgroundCollector("127.0.0.1:0") as collector:
        sink = SocketSink(collector.url)
        try:
            for record in request_records("GET /one"):
                sink.emit(record)
            sink.emit(("c", 1, 2, new_trace_id(), new_span_id(), 0, "app", "bg", 1, None))
            sink.flush()
            deadline = time.monotonic() + 10
            while collector.collector.events < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            sink.close()
    assert collector.collector.events == 5  # what the records would decode to
    assert collector.collector.frames >= 1 and collector.collector.rejected == 0


def test_unix_socket_collector(tmp_path: Path) -> None:
    path = tmp_path / "collector.sock"
    inbox = Inbox()
    with BackgroundCollector(f"unix:{path}", inbox) as collector:
        assert collector.url == f"unix:{path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sink = SocketSink(collector.url)
        try:
            for record in request_records("GET /unix"):
                sink.emit(record)
            assert inbox.wait_for(has_span("GET /unix"))
        finally:
            sink.close()
    assert not path.exists()


def test_stale_unix_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed collector's leftover
    with BackgroundCollector(f"unix:{path}"):
        with pytest.raises(CollectorError, match="already listening"):
            BackgroundCollector(f"unix:{path}").start()


def test_output_file_is_a_private_trace_file(tmp_path: Path) -> None:
    out = tmp_path / "saved.jsonl"
    with BackgroundCollector("127.0.0.1:0", output=out) as collector:
        sink = SocketSink(collector.url)
        try:
            for record in request_records("GET /saved", 201):
                sink.emit(record)
            sink.flush()
            deadline = time.monotonic() + 10
            while collector.collector.events < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            sink.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    (trace,) = load(out, strict=True)
    assert trace.status == 201
    assert trace.root is not None and trace.root.name == "GET /saved"


def _raw_peer(url: str) -> socket.socket:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # wrong magic
        WIRE_MAGIC + struct.pack("!I", 2**31),  # a frame too big
        WIRE_MAGIC + struct.pack("!I", 0),  # an empty frame
        WIRE_MAGIC + struct.pack("!I", 5) + b"\xffjunk",  # not marshal
        WIRE_MAGIC + struct.pack("!I", 4) + b"\xe9\x00\x00\x00",  # marshal, not a batch
    ],
    ids=["magic", "huge", "empty", "garbage", "not-a-batch"],
)
def test_malformed_peers_lose_their_connection_not_the_collector(data: bytes) -> None:
    inbox = Inbox()
    with BackgroundCollector("127.0.0.1:0", inbox, max_frame=1024 * 1024) as collector:
        with _raw_peer(collector.url) as bad:
            bad.sendall(data)
            assert _closed_by_peer(bad)
        assert collector.collector.rejected == 1
        # The collector still serves well-behaved apps.
        sink = SocketSink(collector.url)
        try:
            for record in request_records("GET /after"):
                sink.emit(record)
            assert inbox.wait_for(has_span("GET /after"))
        finally:
            sink.close()


def test_badly_shaped_records_are_counted_as_dropped() -> None:
    inbox = Inbox()
    with BackgroundCollector("127.0.0.1:0", inbox) as collector:
        good = request_records("GET /good")
        frame = encode_frame(
            [("p", "x", "y", "z", "n", None), ("e", "not", "ints", 3, None), *good],
            2,
            {"process.pid": 7},
        )
        with _raw_peer(collector.url) as peer:
            peer.sendall(WIRE_MAGIC + frame)
            assert inbox.wait_for(has_span("GET /good"))
    dropped = [e for e in inbox.events if e["kind"] == "dropped"]
    assert [d["count"] for d in dropped] == [4]  # 2 reported by the app + 2 unreadable
    assert dropped[0]["attrs"]["process.pid"] == 7


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CollectorError) as info:
            BackgroundCollector(f"127.0.0.1:{port}").start()
    message = str(info.value)
    assert "already in use" in message and "\n" not in message


@pytest.mark.parametrize("address", ["0.0.0.0:7401", "192.0.2.1:7401", "example.com:80"])
def test_non_loopback_needs_an_explicit_opt_in(address: str) -> None:
    with pytest.raises(CollectorError, match="non-loopback"):
        BackgroundCollector(address)


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999", "unix:"])
def test_bad_address_is_a_collector_error(address: str) -> None:
    with pytest.raises(CollectorError):
        BackgroundCollector(address)


def test_queue_stays_bounded_while_collector_is_absent_then_drops_are_reported(
    free_port: Callable[[], int],
) -> None:
    port = free_port()
    sink = SocketSink(f"tcp://127.0.0.1:{port}", max_queue=10, interval=0.01)
    inbox = Inbox()
    try:
        for n in range(50):
            sink.emit(("p", time.time_ns(), 1, 1, f"tick{n}", None))
            assert len(sink._queue) <= 10
        assert sink.dropped == 40
        with BackgroundCollector(f"127.0.0.1:{port}", inbox):
            # The sink retries with backoff (at most 2 s apart) and delivers the queue.
            assert inbox.wait_for(lambda ev: sum(e["kind"] == "event" for e in ev) >= 10)
            assert inbox.wait_for(lambda ev: any(e["kind"] == "dropped" for e in ev))
    finally:
        sink.close()
    (dropped,) = [e for e in inbox.events if e["kind"] == "dropped"]
    assert dropped["count"] == 40
    assert [e["name"] for e in inbox.events if e["kind"] == "event"] == [
        f"tick{n}" for n in range(10)
    ]


def test_sink_reconnects_after_the_collector_restarts(free_port: Callable[[], int]) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    first, second = Inbox(), Inbox()
    sink = SocketSink(f"tcp://{address}", interval=0.01)
    try:
        with BackgroundCollector(address, first):
            for record in request_records("GET /before"):
                sink.emit(record)
            assert first.wait_for(has_span("GET /before"))
        # Killed mid-stream: records sent now may be lost (TCP has no receipts) ...
        for record in request_records("GET /while-down"):
            sink.emit(record)
        with BackgroundCollector(address, second):
            # ... but the sink reconnects and later records arrive.
            deadline = time.monotonic() + 15
            n = 0
            while not second.spans_named(f"GET /later{n}") and time.monotonic() < deadline:
                n += 1
                for record in request_records(f"GET /later{n}"):
                    sink.emit(record)
                second.wait_for(has_span(f"GET /later{n}"), timeout=0.5)
            assert second.spans_named(f"GET /later{n}")
    finally:
        sink.close()
    assert sink.connects >= 2


def _hello_app() -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/hello", hello)])


def test_app_keeps_serving_when_no_collector_listens(
    serve_asgi: Serve, free_port: Callable[[], int]
) -> None:
    sink = SocketSink(f"tcp://127.0.0.1:{free_port()}", max_queue=20)
    try:
        with (
            serve_asgi(wrap(_hello_app(), sink=sink)) as base,
            httpx.Client(base_url=base) as client,
        ):
            for _ in range(30):
                response = client.get("/hello")
                assert response.status_code == 200
                assert response.text == "hello"
                assert len(sink._queue) <= 20
        assert sink.dropped > 0
        assert sink.connects == 0
    finally:
        sink.close()


def test_wrapped_app_to_collector_to_tail_lines(serve_asgi: Serve) -> None:
    lines: list[str] = []
    done = threading.Event()
    tail = Tail(color=False, out=open(os.devnull, "w"), hold=0)

    def consume(events: list[dict[str, Any]]) -> None:
        lines.extend(tail.feed(events))
        if len(lines) >= 3:
            done.set()

    try:
        with BackgroundCollector("127.0.0.1:0", consume) as collector:
            sink = SocketSink(collector.url)
            try:
                app = wrap(_hello_app(), sink=sink)
                with serve_asgi(app) as base, httpx.Client(base_url=base) as client:
                    assert client.get("/hello").status_code == 200
                    assert client.get("/nope").status_code == 404
                    assert client.post("/hello").status_code == 405
                    assert done.wait(10)
            finally:
                sink.close()
    finally:
        tail.out.close()
    assert [line.split()[1:4] for line in lines] == [
        ["GET", "/hello", "200"],
        ["GET", "/nope", "404"],
        ["POST", "/hello", "405"],
    ]
    assert all("app=" in line for line in lines)


def test_tail_holds_a_line_until_late_spans_of_other_processes_arrive() -> None:
    """The proxy's client span ends last but may reach the collector first: the line
    waits for the hold, so it names every hop instead of printing half a request."""
    out = io.StringIO()
    tail = Tail(color=False, out=out, hold=0.3, live=False)
    t0 = 1_700_000_000_000_000_000
    trace, client, app = "ab" * 16, "1" * 16, "2" * 16

    def start(span: str, parent: str | None, hop: str, ts: int) -> dict[str, Any]:
        return {"kind": "span_start", "ts": ts, "trace_id": trace, "span_id": span,
                "parent_id": parent, "hop": hop, "name": "GET /x",
                "attrs": {"http.request.method": "GET", "url.path": "/x"}}  # fmt: skip

    def end(span: str, ts: int) -> dict[str, Any]:
        return {"kind": "span_end", "ts": ts, "trace_id": trace, "span_id": span,
                "attrs": {"http.response.status_code": 200}}  # fmt: skip

    assert tail.feed([start(client, None, "client", t0), end(client, t0 + 5_000_000)]) == []
    assert tail.feed([start(app, client, "app", t0 + 1_000_000), end(app, t0 + 4_000_000)]) == []
    # Newer traffic moves time past the hold: now the line is due, with both hops.
    other = {"kind": "span_start", "ts": t0 + 10**9, "trace_id": "cd" * 16, "span_id": "3" * 16,
             "parent_id": None, "hop": "app", "name": "GET /y", "attrs": {}}  # fmt: skip
    (line,) = tail.feed([other])
    assert "client=5.0ms" in line and "app=3.0ms" in line
    assert tail.close() == []  # the other request never finished: nothing to flush
