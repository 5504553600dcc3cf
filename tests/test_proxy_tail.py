"""The proxy's tail lines made from its records without wire events.

The recording child folds the proxy's ``"r"`` records straight into tail lines
(``Tail.feed_records``); the lines, and what is held for them, must be those the wire
events give, whatever the request's fate and however records are batched.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hopscope.app.collector import BackgroundCollector
from hopscope.app.tail import Tail
from hopscope.tracing import MemorySink
from hopscope.tracing.records import Record, to_events
from test_proxy import HOST, cli_proxy_process, proxy_to, raw_request, upstream_server, wait_until

pytestmark = pytest.mark.timeout(60)

HOPSCOPE = [sys.executable, "-m", "hopscope.app"]
INFO = {"process.pid": 4242, "server.software": "hopscope-proxy"}


class Sink:
    """Where lines go: a list."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.extend(line for line in text.splitlines() if line)

    def flush(self) -> None:
        pass


def _state(tail: Tail) -> dict[str, Any]:
    return {
        trace_id: {
            span_id: (s.parent_id, s.hop, s.name, s.start, s.end, s.attrs, s.raised)
            for span_id, s in trace.spans.items()
        }
        for trace_id, trace in tail._traces.items()
    }


def _as_events(batch: list[Record], info: dict[str, Any]) -> list[dict[str, Any]]:
    """What a collector makes of a batch of records: their wire events, after a
    ``dropped`` event counting the records it could not turn into events."""
    events: list[dict[str, Any]] = []
    dropped = 0
    for record in batch:
        try:
            events.extend(to_events(record, info))
        except Exception:
            dropped += 1
    if dropped:
        events.insert(0, {"kind": "dropped", "ts": 0, "count": dropped, "attrs": dict(info)})
    return events


def _both_ways(
    batches: list[list[Record]], info: dict[str, Any] = INFO
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(lines per batch, state held, counters) fed as events and fed as records."""
    results = []
    for way in ("events", "records"):
        tail = Tail(Sink(), live=False, hold=0.05)  # type: ignore[arg-type]
        per_batch = []
        for batch in batches:
            if way == "records":
                tail.feed_records(batch, info)
                per_batch.append(list(tail.out.lines))  # type: ignore[attr-defined]
            else:
                tail.feed(_as_events(batch, info))
                per_batch.append(list(tail.out.lines))  # type: ignore[attr-defined]
        state = _state(tail)
        tail.close()
        counters = (tail.printed, tail.dropped, tail.malformed, tail.in_flight)
        results.append((per_batch, state, tail.out.lines, counters))  # type: ignore[attr-defined]
    return results[0], results[1]


@pytest.fixture(scope="module")
def recorded(free_port: Callable[[], int]) -> list[Record]:
    """The proxy's and the app's records of requests of every kind of fate."""
    app_sink = MemorySink()
    with upstream_server(app_sink) as upstream, proxy_to(upstream.url) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert client.get("/").status_code == 200
            assert client.head("/").status_code == 200
            assert client.post("/echo", content=b"x" * 100).status_code == 200
            chunks = (b"y" * 70_000 for _ in range(8))  # more than 4 chunks each way
            assert client.post("/echo", content=chunks).status_code == 200
            assert client.get("/big", params={"n": 600_000}).status_code == 200
            assert client.get("/headers").status_code == 200  # hop-by-hop fields removed
            assert client.get("/sse").status_code == 500  # the app raises (no gate named)
            assert client.get("/nowhere").status_code == 404
            assert client.get("/", headers={"TE": "trailers"}).status_code == 200
        raw_request(proxy.port, b"GET http://example.com/ HTTP/1.1\r\nHost: e\r\n\r\n")
        raw_request(proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: e\r\n\r\n")
        # A client that leaves in the middle of a large response.
        with socket.create_connection((HOST, proxy.port)) as sock:
            sock.sendall(b"GET /big?n=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(1000)
        wait_until(lambda: len(proxy.sink.records()) >= 11)
        wait_until(lambda: all(r[8] >= 0 for r in proxy.sink.records()))
        proxy_records = proxy.sink.records()
    with proxy_to(f"http://{HOST}:{free_port()}") as down:
        assert httpx.get(down.url + "/down", timeout=10).status_code == 502
        wait_until(lambda: len(down.sink.records()) == 1 and down.sink.records()[0][8] >= 0)
        proxy_records += down.sink.records()
    assert {r[6] for r in proxy_records} == {"proxy"}
    return proxy_records + app_sink.records()


def test_lines_from_records_are_the_lines_from_events(recorded: list[Record]) -> None:
    by_events, by_records = _both_ways([recorded])
    assert by_records == by_events
    lines = by_records[2]
    assert len(lines) >= 12
    assert any(re.search(r" GET /big 200 .* client=.* proxy=.*client-gone", x) for x in lines)
    assert any(" GET /down 502 " in x and "error=" in x for x in lines)
    assert any(" 400 " in x for x in lines)  # an absolute-form target, refused
    assert any(" POST /echo 200 " in x and " app=" in x for x in lines)


@pytest.mark.parametrize("seed", range(6))
def test_any_batching_and_order_gives_the_same_lines(recorded: list[Record], seed: int) -> None:
    rng = random.Random(seed)
    records = list(recorded)
    rng.shuffle(records)
    batches: list[list[Record]] = []
    while records:
        size = rng.randint(1, 4)
        batches.append(records[:size])
        records = records[size:]
    by_events, by_records = _both_ways(batches)
    assert by_records == by_events


def test_plain_requests_folded_quickly_give_the_lines_of_their_spans(
    recorded: list[Record],
) -> None:
    # Without the app's records (an upstream that records nothing), the plain requests
    # stay in the tail as a few fields of their record, not spans (_Trace.quick).
    proxy = [r for r in recorded if r[0] == "r" and r[6] == "proxy"]
    by_events, by_records = _both_ways([proxy])
    assert by_records == by_events
    tail = Tail(Sink(), live=False, hold=1000.0)  # type: ignore[arg-type]
    tail.feed_records(proxy, INFO)
    quick = [t for t in tail._traces.values() if t.quick is not None]
    assert len(quick) >= 3  # GET /, HEAD /, GET /nowhere (a 404 is no error of the proxy)
    assert len(quick) < len(tail._traces)  # the refused, failed and abandoned are not
    for trace in quick:
        lines = (trace.line(), trace.line(color=True))
        assert trace.spans and trace.quick is None  # looked at: made into spans
        assert (trace.line(), trace.line(color=True)) == lines
        assert re.search(r" (GET|HEAD|POST) /\S* \d{3} \S+ms client=\S+ms proxy=\S+ms$", lines[0])


def test_bad_records_and_odd_process_info_judged_as_events_judge_them(
    recorded: list[Record],
) -> None:
    proxy = [r for r in recorded if r[0] == "r" and r[6] == "proxy"]
    first = proxy[0]
    bad_items = (*first[:10], [(99, 1)])
    zero_trace = (first[0], first[1], 0, *first[3:])
    short_end = (*first[:9], first[9][:3], first[10])
    not_a_tuple = list(first)
    end = first[9]
    odd_status = (*first[:2], 11, *first[3:9], (end[0], "200", *end[2:4], "5", *end[5:]), first[10])
    no_status = (*first[:2], 12, *first[3:9], (end[0], 0, *end[2:4], 0, *end[5:]), first[10])
    odd_info = {"process.pid": 1, "http.route": "/from-info", "span.kind": None}
    batches = [
        [bad_items, zero_trace, proxy[1]],
        [short_end, not_a_tuple],
        [odd_status, no_status],
        proxy[2:],
    ]
    for info in (INFO, odd_info, {}):
        by_events, by_records = _both_ways(batches, info)  # type: ignore[arg-type]
        assert by_records == by_events


def test_collector_gives_records_only_when_no_file_wants_events(tmp_path: Any) -> None:
    seen: dict[str, int] = {"events": 0, "records": 0}

    def consume(events: list[dict[str, Any]]) -> None:
        seen["events"] += len(events)

    def take(records: list[Any], info: dict[str, Any], dropped: int) -> int:
        seen["records"] += len(records)
        return 1 if dropped else 0

    for output in (None, tmp_path / "t.jsonl"):
        seen.update(events=0, records=0)
        with BackgroundCollector("127.0.0.1:0", consume, output=output, records=take) as bg:
            bg.collector._deliver(INFO, 0, [("p", 1, 1, 1, "x", None)])
            bg.collector._deliver(INFO, 2, [])
        if output is None:
            assert seen == {"events": 0, "records": 1}
            assert bg.collector.dropped == 3
        else:
            assert seen["records"] == 0 and seen["events"] == 2  # the event and a "dropped"


@pytest.fixture
def cli_proxy_no_file() -> Iterator[dict[str, Any]]:
    """``hopscope proxy`` as users run it (no -o): its child folds records into lines."""
    with cli_proxy_process(graceful=False) as running:
        yield running


def test_command_without_a_file_prints_whole_lines(cli_proxy_no_file: dict[str, Any]) -> None:
    proc = cli_proxy_no_file["proc"]
    with httpx.Client(base_url=cli_proxy_no_file["url"], timeout=10) as client:
        assert client.post("/echo", content=b"hi").content == b"hi"
        assert client.get("/nowhere").status_code == 404
        sent = client.get("/", headers={"X-Forwarded-For": "10.0.0.1"})
        assert sent.status_code == 200
    cli_proxy_no_file["sink"].flush()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err
    assert "stopped after 3 request(s)" in err
    echo = [line for line in out.splitlines() if " POST /echo 200 " in line]
    assert echo and all(f" {hop}=" in echo[0] for hop in ("client", "proxy", "server", "app"))
    assert any(" GET /nowhere 404 " in line for line in out.splitlines())


def _variants(record: Record) -> list[Record]:
    """A plain request's record, and records that differ from it in one field each: the
    quick check (tail._plain_proxy) must take each of them as the general path does."""
    head = record[:7]
    request, end, items = record[7], record[9], list(record[10])
    assert len(items) == 5 and items[4] is None  # the usual four items
    start, connect, sent, response = items[:4]

    def with_items(*new: Any) -> Record:
        return (*record[:10], [*new, None])

    def with_end(index: int, value: Any) -> Record:
        return (*record[:9], (*end[:index], value, *end[index + 1 :]), record[10])

    def with_request(index: int, value: Any) -> Record:
        return (*head, (*request[:index], value, *request[index + 1 :]), *record[8:])

    def with_field(index: int, value: Any) -> Record:
        return (*record[:index], value, *record[index + 1 :])

    late = end[0] + 10**9  # (a second: the lines held are due)
    retry = (14, sent[1])
    return [
        record,
        with_items(start, connect, retry, connect, sent, response),  # a stale connection
        with_items(start, (11, start[1], 10, False), connect, sent, response),  # a body
        with_items(connect, start, sent, response),  # another order
        with_items(start, connect, sent, (16, response[1], 5), response),  # a chunk
        with_items(start, connect, sent, (15, late, *response[2:])),  # after the end
        with_items((10.0, *start[1:]), connect, sent, response),  # an equal code
        with_items(start, connect, [*sent], response),  # an item not a tuple
        with_items(start, connect, (13, float(sent[1]), 1), response),  # a float time
        with_items(start, connect, (13, True, 1), response),
        with_items(start, connect, retry, (13, float(sent[1]), 1), response),  # (not four)
        with_items(start, connect, retry, (13, True, 1), response),
        with_items(start, connect, (), response),  # an empty item
        with_items(start, start, sent, response),  # two proxy spans
        with_items(start, connect, sent, (99, response[1])),  # an unknown code
        with_items(start, connect, sent, ("p", sent[1], record[2], request[11], "x", None)),
        with_items((10, record[1] - 5 * 10**6, *start[2:]), connect, sent, response),  # too early
        with_items((10, record[1] - 5 * 10**6, *start[2:]), connect, retry, sent, response),
        (*record[:10], [start, connect, sent, response]),  # no closing None
        (*record[:10], (start, connect, sent, response, None)),  # items as a tuple
        (*record[:10], [start, None, sent, response, None]),  # closed early
        with_field(2, True),
        with_field(3, record[3] + 0.0),
        with_field(4, record[3]),  # its own parent
        with_field(4, request[11]),
        with_field(4, -1),
        with_field(8, -1),  # not ended
        with_field(8, True),
        with_field(1, str(record[1])),
        with_request(0, b"GET"),
        with_request(3, None),
        with_request(8, float(request[8])),
        with_request(8, late),  # the head's time the latest
        with_request(11, record[3]),  # the proxy span is the client span
        with_request(11, 0),
        (*head, request[:11], *record[8:]),
        with_end(0, float(end[0])),
        with_end(1, 0),
        with_end(1, True),
        with_end(1, 599),
        with_end(3, False),  # refused: never went upstream
        with_end(5, None),  # no upstream connection reached
        with_end(14, {"error": True, "exception.type": "OSError"}),
        with_end(15, {"disconnected": True}),
        with_end(4, None),
        (*record[:9], None, record[10]),
        (*record[:9], end[:15], record[10]),
        list(record),
    ]


def _lines_both_ways(batches: list[list[Record]], info: dict[str, Any]) -> list[Any]:
    """The lines (plain and coloured) and counters, fed as events and as records, without
    looking at the spans (which would make a quick trace's spans before its line)."""
    results = []
    for color in (False, True):
        by_events, by_records = (
            Tail(Sink(), live=False, color=color),
            Tail(Sink(), live=False, color=color),
        )  # type: ignore[arg-type]
        for batch in batches:
            by_records.feed_records(batch, info)
            by_events.feed(_as_events(batch, info))
        for tail in (by_events, by_records):
            tail.close()
            results.append((tail.out.lines, tail.printed, tail.malformed, tail.in_flight))  # type: ignore[attr-defined]
    return results


def test_quick_check_takes_each_odd_record_as_the_general_path(recorded: list[Record]) -> None:
    from hopscope.app.tail import _plain_proxy

    proxy = [r for r in recorded if r[0] == "r" and r[6] == "proxy"]
    plain = next(r for r in proxy if _plain_proxy(r) is not None)
    variants = _variants(plain)
    assert sum(_plain_proxy(v) is not None for v in variants) >= 4  # some stay quick
    for index, variant in enumerate(variants):
        # Each on its own trace id, each alone and all in one batch.
        variant = (*variant[:2], 10**20 + index, *variant[3:]) if len(variant) == 11 else variant
        for info in (INFO, {}):
            by_events, by_records = _both_ways([[variant]], info)
            assert by_records == by_events, (index, variant)
            plain_events, plain_records, color_events, color_records = _lines_both_ways(
                [[variant]], info
            )
            assert (plain_records, color_records) == (plain_events, color_events), index
    renamed = [
        (*v[:2], 10**20 + i, *v[3:]) if type(v) is tuple and len(v) == 11 else v
        for i, v in enumerate(variants)
    ]
    by_events, by_records = _both_ways([renamed])
    assert by_records == by_events
    assert len(by_records[2]) >= 20
    plain_events, plain_records, color_events, color_records = _lines_both_ways([renamed], INFO)
    assert (plain_records, color_records) == (plain_events, color_events)
    assert any("\x1b[" in line for line in color_records[0])
    assert not any("\x1b[" in line for line in plain_records[0])


def test_plain_requests_in_the_hold_print_in_order_of_their_ends(recorded: list[Record]) -> None:
    # Held lines come off the heap as they fall due, batch after batch, in end order.
    proxy = [r for r in recorded if r[0] == "r" and r[6] == "proxy"]
    plain = [r for r in proxy if r[8] >= 0 and r[9] is not None]
    step = 10**7
    batches = []
    for n in range(40):
        base = plain[n % len(plain)]
        shift = n * step // 3 - base[1] + 1_800_000_000 * 10**9
        items = [
            None
            if item is None
            else (item[0], item[1] + shift, *item[2:])
            if type(item[0]) is int
            else item
            for item in base[10]
        ]
        request = (*base[7][:8], base[7][8] + shift, *base[7][9:])
        end = (base[9][0] + shift, *base[9][1:])
        batches.append([(base[0], base[1] + shift, 10**21 + n, *base[3:7], request, base[8],
                         end, items)])  # fmt: skip
    by_events, by_records = _both_ways(batches)
    assert by_records == by_events
    assert sum(len(lines) for lines in by_records[0]) > 0  # some printed before the close
