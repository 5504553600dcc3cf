"""The proxy's lean recording: one ``"r"`` record per request, expanded off its path.

A request over before the sink drains travels as one record; one still running is
sent piecewise (its start and events so far, then the rest), and both ways must give
the same records, hence the same trace.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import MemorySink, load
from hopscope.tracing.proxyrecord import expand_proxy
from hopscope.tracing.records import Record, legacy, to_events
from hopscope.tracing.sinks import Recording, Sink, decode_frame, encode_frame
from servers import interrupt
from test_proxy import (
    HOST,
    Proxy,
    Running,
    _answers,
    finished,
    gate,
    proxy_to,
    upstream_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running]:
    with upstream_server() as running:
        yield running


@pytest.fixture
def proxy(upstream: Running) -> Iterator[Proxy]:
    with proxy_to(upstream.url) as running:
        yield running


def test_one_record_per_request(proxy: Proxy) -> None:
    with httpx.Client(timeout=10) as client:
        for path in ("/", "/echo"):
            if path == "/":
                assert client.get(proxy.url + path).status_code == 200
            else:
                assert client.post(proxy.url + path, content=b"x" * 10).status_code == 200
            finished(proxy, path)
    records = proxy.sink.records()
    assert [(r[0], r[6]) for r in records] == [("r", "proxy"), ("r", "proxy")]
    # It crosses the wire as it is (marshal-able) and expands to the classic records.
    _, _, batch = decode_frame(encode_frame(records, 0, {})[4:])
    assert batch == records
    classic = legacy(records)
    shapes = [(r[0], r[5] if r[0] == "s" else r[4] if r[0] == "p" else "") for r in classic]
    assert shapes[:8] == [
        ("s", "client"),
        ("p", "request.head"),
        ("s", "proxy"),
        ("p", "upstream.connect"),
        ("p", "request.sent"),
        ("p", "response.start"),
        ("e", ""),
        ("e", ""),
    ]
    # Wire events straight from the "r" record equal those of its expansion.
    direct = [event for record in records for event in to_events(record)]
    expanded = [event for record in classic for event in to_events(record)]
    assert direct == expanded
    _, client_span = proxy.span("client", "/echo")
    assert client_span.attrs["http.request.body.size"] == 10
    assert client_span.attrs["http.response.status_code"] == 200


def test_request_fields_recorded_as_a_block_read_back_as_sent(proxy: Proxy) -> None:
    # The listener records the client's fields as one block of lines: the client span
    # still has every field as it came, in order, duplicates and odd values kept.
    sent = [
        ("x-twice", "one"),
        ("x-colons", "a: b: c"),
        ("x-twice", "two"),
        ("x-empty", ""),
        ("x-spaced", "in  side"),
    ]
    with httpx.Client(timeout=10) as client:
        assert client.get(proxy.url + "/headers", headers=sent).status_code == 200
    finished(proxy, "/headers")
    (record,) = [r for r in proxy.sink.records() if r[7][3] == "/headers"]
    assert type(record[7][7]) is bytes
    _, span = proxy.span("client", "/headers")
    fields = [tuple(pair) for pair in span.attrs["http.request.headers"]]
    assert [pair for pair in fields if pair[0].startswith("x-")] == sent
    assert fields[0] == ("host", f"{HOST}:{proxy.port}")


class Holding(Sink):
    """Keeps the recordings it is given, for the test to take from."""

    def __init__(self) -> None:
        self.recordings: list[Recording] = []

    def emit(self, record: Record) -> None:
        raise AssertionError("the proxy emitted a record instead of recording")

    def start_live(self, recording: Recording) -> bool:
        self.recordings.append(recording)
        return True


def test_a_running_request_is_sent_in_pieces_that_add_up(upstream: Running) -> None:
    holding = Holding()
    with proxy_to(upstream.url) as proxy:
        proxy.app.sink = holding
        opened = gate("pieces")
        result: list[int] = []

        def call() -> None:
            result.append(httpx.get(proxy.url + "/slow?gate=pieces", timeout=15).status_code)

        worker = threading.Thread(target=call)
        worker.start()
        pieces: list[Record] = []
        try:
            recording = wait_until(lambda: holding.recordings and holding.recordings[0])
            # Upstream has the request: the start and the events so far go now.
            wait_until(lambda: len(recording.snapshot()) >= 5)
            assert recording.take(pieces) is False
            assert [r[0] for r in pieces][:3] == ["s", "p", "s"]
            assert not any(r[0] == "e" for r in pieces)
        finally:
            opened.set()
            worker.join(15)
        assert result == [200]
        wait_until(lambda: recording.done)
        assert recording.take(pieces) is True
        whole: list[Any] = []
        recording._collect(-1, whole)  # what a first take would send now: one record
        assert len(whole) == 1 and whole[0][0] == "r"
        assert pieces == expand_proxy(whole[0])
        assert [r[0] for r in pieces].count("e") == 2


def test_memory_sink_sees_the_request_before_it_ends(proxy: Proxy) -> None:
    sink = proxy.sink
    assert isinstance(sink, MemorySink)
    opened = gate("memory-inflight")
    worker = threading.Thread(
        target=lambda: httpx.get(proxy.url + "/slow?gate=memory-inflight", timeout=15)
    )
    worker.start()
    try:
        started = wait_until(lambda: [r for r in sink.records() if r[0] == "s"])
        assert started[0][5] == "client"
    finally:
        opened.set()
        worker.join(15)
    finished(proxy, "/slow")


@pytest.mark.parametrize("sink_kind", ["local", "socket"])
def test_in_process_recording_kinds(
    upstream: Running, tmp_path: Path, sink_kind: str, free_port: Callable[[], int]
) -> None:
    """The proxy with its collector on a thread of its own process: records handed over
    (``local``) or sent to the collector's port (``socket``) reach the trace file."""
    port, collector = free_port(), free_port()
    output = tmp_path / "trace.jsonl"
    code = (
        "from hopscope.app.proxy_command import run_proxy; "
        f"run_proxy({upstream.url!r}, listen='{HOST}:{port}', collector='{HOST}:{collector}', "
        f"sink_kind={sink_kind!r}, output={str(output)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _answers(port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                assert client.get(f"http://{HOST}:{port}/").status_code == 200
    finally:
        _, err = interrupt(proc, 15, 5)
    assert "stopped after 3 request(s)" in err
    hops = [{s.hop for s in t.spans.values() if s.finished} for t in load(output)]
    assert hops.count({"client", "proxy", "server", "app"}) + hops.count({"client", "proxy"}) == 3
