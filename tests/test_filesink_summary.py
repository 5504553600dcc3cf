"""Summary lines as ``FileSink`` writes them: a request whole in one write is summed up
without folding its events (``tracefile._quick_info``), so the summary must still be
exactly what a reader folding the file's events makes (``TraceInfo`` and the outline),
for real recordings of wrapped apps and for generated events; and a file several
processes write must never show a wrong summary.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from flask import Flask, Response
from hopscope.tracing import load, tracefile, wrap
from hopscope.tracing.context import span
from hopscope.tracing.model import Span, Trace, TraceInfo
from hopscope.tracing.records import Record, to_events
from hopscope.tracing.sinks import FileSink, MemorySink
from hopscope.tracing.tracefile import OUTLINE_KEYS, SummarisedTrace, SummaryScan, TraceFileWriter
from hopscope.tui.source import FileSource
from hopscope.tui.store import RequestStore
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

Event = dict[str, Any]
T0 = 1_735_732_800_000_000_000
WAIT = 30.0
BIG = bytes(range(256)) * 800  # 200 KiB: past the 64 KiB a middleware keeps


# -- real recordings -------------------------------------------------------------------


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello", headers={"x-odd": "a\tb"})


async def item(request: Request) -> JSONResponse:
    with span("db", table="items"):
        await asyncio.sleep(0)
    return JSONResponse({"id": request.path_params["n"], "q": request.query_params.get("q")})


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> Any:
        for n in range(7):
            yield b"chunk %d " % n

    return StreamingResponse(chunks(), media_type="text/plain")


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("boom")


async def big(request: Request) -> StarletteResponse:
    return StarletteResponse(BIG, media_type="application/octet-stream")


async def echo(request: Request) -> StarletteResponse:
    return StarletteResponse(await request.body(), media_type="application/octet-stream")


async def later(request: Request) -> PlainTextResponse:
    def work() -> None:
        with span("send mail"):
            pass

    return PlainTextResponse("queued", background=BackgroundTask(work))


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(text.upper())
    await websocket.close()


STARLETTE = Starlette(
    routes=[
        Route("/", hello),
        Route("/items/{n}", item),
        Route("/stream", stream),
        Route("/boom", boom),
        Route("/big", big),
        Route("/echo", echo, methods=["POST"]),
        Route("/later", later),
        WebSocketRoute("/ws", socket),
    ]
)

FASTAPI = FastAPI()


@FASTAPI.get("/users/{name}")
async def user(name: str) -> dict[str, str]:
    if name == "nobody":
        raise HTTPException(status_code=404, detail="no such user")
    return {"name": name}


FLASK = Flask(__name__)


@FLASK.get("/")
def flask_hello() -> str:
    return "hello from flask"


@FLASK.get("/boom")
def flask_boom() -> str:
    raise RuntimeError("boom")


@FLASK.get("/stream")
def flask_stream() -> Response:
    return Response((b"part %d\n" % n for n in range(6)), mimetype="text/plain")


@FLASK.get("/big")
def flask_big() -> Response:
    with span("render"):
        return Response(BIG, mimetype="application/octet-stream")


def record_asgi(app: Any, calls: list[tuple[str, str, bytes]]) -> list[Record]:
    sink = MemorySink()
    wrapped = wrap(app, sink=sink)

    async def run() -> None:
        transport = httpx.ASGITransport(app=wrapped, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            for method, url, body in calls:
                await client.request(method, url, content=body or None)

    asyncio.run(run())
    return sink.records()


def record_websocket(requests: int) -> list[Record]:
    sink = MemorySink()
    with TestClient(wrap(STARLETTE, sink=sink)) as client:
        for n in range(requests):
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text(f"hi {n}")
                assert websocket.receive_text() == f"HI {n}"
    return sink.records()


def record_flask(requests: int) -> list[Record]:
    sink = MemorySink()
    transport = httpx.WSGITransport(app=wrap(FLASK, sink=sink))
    with httpx.Client(transport=transport, base_url="http://flask.test") as client:
        for n in range(requests):
            client.get(["/", "/boom", "/stream", "/big"][n % 4])
    return sink.records()


def starlette_calls(requests: int) -> list[tuple[str, str, bytes]]:
    paths = ["/", "/items/7?q=x", "/stream", "/boom", "/big", "/later", "/missing"]
    calls = [("GET", paths[n % len(paths)], b"") for n in range(requests)]
    calls += [("POST", "/echo", b"x" * size) for size in (0, 10, 70_000)]
    return calls


@pytest.fixture(scope="module")
def recordings() -> list[Record]:
    records = record_asgi(STARLETTE, starlette_calls(42))
    records += record_asgi(FASTAPI, [("GET", f"/users/{n}", b"") for n in ("ada", "nobody")] * 3)
    records += record_websocket(3)
    records += record_flask(12)
    return records


def trace_count(records: list[Record]) -> int:
    events = [event for record in records for event in to_events(record)]
    return len({event["trace_id"] for event in events})


def outline_of(spans: Iterable[Span]) -> list[tuple[Any, ...]]:
    return [
        (s.hop, s.name, {k: s.attrs[k] for k in OUTLINE_KEYS if k in s.attrs}, s.start, s.end)
        for s in spans
    ]


def info_fields(info: TraceInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in TraceInfo.__slots__}


def scan(path: Path) -> tuple[SummaryScan, dict[str, SummarisedTrace]]:
    summary_scan = SummaryScan(path)
    traces: dict[str, SummarisedTrace] = {}
    for found, _ in summary_scan.chunks():
        for trace, _again in found:
            traces[trace.trace_id] = trace
    return summary_scan, traces


def assert_summaries_are_the_fold(path: Path) -> int:
    """Every summary says what folding the file says; returns the number of traces."""
    folded = {trace.trace_id: trace for trace in load(path, strict=True)}
    summary_scan, summarised = scan(path)
    assert summary_scan.complete
    assert summarised.keys() == folded.keys()
    for trace_id, trace in folded.items():
        lazy = summarised[trace_id]
        assert info_fields(lazy.info) == info_fields(TraceInfo(trace)), trace_id
        # (an outline the reader cannot use, a hop that is not text, is read from the
        # trace's lines instead: the same spans)
        assert outline_of(lazy.outline()) == outline_of(trace.spans.values()), trace_id
    return len(folded)


@pytest.fixture
def quick_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many traces were summed up the quick way (so a test knows it ran)."""
    calls = [0]
    original = tracefile._quick_info

    def counted(events: list[Event]) -> Any:
        calls[0] += 1
        return original(events)

    monkeypatch.setattr(tracefile, "_quick_info", counted)
    yield calls


def test_file_sink_summaries_of_real_requests_are_the_fold(
    tmp_path: Path, recordings: list[Record], quick_calls: list[int]
) -> None:
    path = tmp_path / "sink.jsonl"
    sink = FileSink(path, summaries=True)
    for record in recordings:
        sink.emit(record)
    sink.close()
    assert assert_summaries_are_the_fold(path) == trace_count(recordings)
    # Both ways ran: whole single-span requests, and traces with user spans, background
    # work or exceptions, which are folded.
    assert 0 < quick_calls[0] < trace_count(recordings)


@pytest.mark.parametrize("seed", range(3))
def test_summaries_are_the_fold_however_the_writes_split_requests(
    tmp_path: Path, recordings: list[Record], seed: int, quick_calls: list[int]
) -> None:
    """Batches cut anywhere, even inside a request's events, and summaries due at once
    or later: the quick way and the fold agree."""
    rng = random.Random(seed)
    events = [event for record in recordings for event in to_events(record, {"process.pid": 1})]
    path = tmp_path / "t.jsonl"
    clock = [0.0]
    writer = TraceFileWriter.create(path, grace=0.5, clock=lambda: clock[0])
    at = 0
    while at < len(events):
        size = rng.choice([1, 2, 3, 7, 30, 200])
        writer.write(events[at : at + size])
        at += size
        clock[0] += rng.choice([0.0, 0.1, 1.0])
    writer.close()
    assert assert_summaries_are_the_fold(path) == trace_count(recordings)
    assert quick_calls[0] > 0


# -- generated events ------------------------------------------------------------------


def one_span(rng: random.Random, n: int) -> list[Event]:
    """A request's events as one span: what the writer sums up the quick way, with the
    odd values a trace file may hold."""
    trace_id, span_id = f"{n + 1:032x}", f"{n + 1:016x}"
    ts = T0 + n * 1_000_000
    parent = rng.choice([None, None, "00000000000000aa", span_id])  # itself: never a root
    headers: list[Any] = [["Host", f"h{n % 3}.example:80{n % 9}"], ["X-N", str(n)]]
    odd = rng.random()
    if odd < 0.15:
        headers.append(["x-odd", "line\nbreak"])
    elif odd < 0.25:
        headers.append([3, "not text"])
    elif odd < 0.3:
        headers = []
    start_attrs: dict[str, Any] = {
        "http.request.method": rng.choice(["GET", "POST", 7]),
        "url.path": f"/p/{n}",
        "http.request.headers": headers,
    }
    if rng.random() < 0.3:
        start_attrs["server.address"] = rng.choice(["srv.example", 5])
    if rng.random() < 0.1:
        start_attrs["span.kind"] = "queue"
    if rng.random() < 0.2:
        start_attrs["error"] = True  # the end may say otherwise
    start: Event = {
        "kind": "span_start",
        "ts": ts,
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": parent,
        "name": f"GET /p/{n}",
        "attrs": start_attrs if rng.random() < 0.95 else None,
    }
    if rng.random() < 0.2:
        start["hop"] = rng.choice(["server", "proxy", "weird", None])
    events = [start]
    for k in range(rng.randrange(4)):
        name = rng.choice(["response.start", "response.body", "log", "exception"])
        events.append(
            {
                "kind": "event",
                "ts": ts + 10 + k,
                "trace_id": trace_id,
                "span_id": span_id,
                "name": name,
                "attrs": {"size": k},
            }
        )
    end_attrs: dict[str, Any] = {
        "http.response.status_code": rng.choice([200, 404, 500, "201"]),
        "http.response.headers": [["Content-Type", "text/plain"]],
        "http.response.body": rng.choice(["", "aGk=", None]),
    }
    if rng.random() < 0.3:
        end_attrs["error"] = rng.choice([True, False, 0, "yes"])
    if rng.random() < 0.3:
        end_attrs["http.route"] = "/p/{n}"
    end: Event = {
        "kind": "span_end",
        "ts": ts + 100 + rng.randrange(-200, 50),  # may end before it starts
        "trace_id": trace_id,
        "span_id": span_id,
        "attrs": end_attrs if rng.random() < 0.95 else None,
    }
    if rng.random() < 0.2:
        end["name"] = "renamed"
    events.append(end)
    return events


def late_events(rng: random.Random, request: list[Event]) -> list[Event]:
    """What may come for a request after it ended: an exception, a background span."""
    first = request[0]
    trace_id, span_id = first["trace_id"], first["span_id"]
    ts = request[-1]["ts"] + 1000
    if rng.random() < 0.5:
        return [
            {
                "kind": "event",
                "ts": ts,
                "trace_id": trace_id,
                "span_id": span_id,
                "name": "exception",
                "attrs": {"exception.type": "ValueError"},
            }
        ]
    child = f"{rng.getrandbits(60) + 1:016x}"
    ids = {"trace_id": trace_id, "span_id": child}
    return [
        {"kind": "span_start", "ts": ts, **ids, "parent_id": span_id, "name": "background"},
        {"kind": "span_end", "ts": ts + 5, **ids, "attrs": {}},
    ]


@pytest.mark.parametrize("seed", range(4))
def test_generated_single_span_requests_sum_up_as_the_fold(
    tmp_path: Path, seed: int, quick_calls: list[int]
) -> None:
    """Late events in the same write (not next to their request), in a later write
    before the summary went out, and after it (a newer summary follows)."""
    rng = random.Random(seed)
    path = tmp_path / "t.jsonl"
    clock = [0.0]
    writer = TraceFileWriter.create(path, grace=0.5, clock=lambda: clock[0], keep=20)
    pending: list[Event] = []
    batch: list[Event] = []
    for n in range(300):
        request = one_span(rng, n)
        batch += request
        chance = rng.random()
        if chance < 0.1:
            batch += late_events(rng, request)  # right after it: folded, not quick
        elif chance < 0.3:
            pending += late_events(rng, request)
        if rng.random() < 0.2:
            rng.shuffle(pending)
            batch += pending  # among other requests
            pending = []
        if rng.random() < 0.3:
            writer.write(batch)
            batch = []
            clock[0] += rng.choice([0.0, 0.2, 1.0])
    writer.write(batch + pending)
    writer.close()
    assert assert_summaries_are_the_fold(path) == 300
    assert quick_calls[0] > 100


def test_events_the_writer_cannot_fold_leave_the_file_to_be_folded(tmp_path: Path) -> None:
    rng = random.Random(9)
    requests = [one_span(rng, n) for n in range(20)]
    requests[5][-1]["attrs"] = ["not", "an", "object"]  # the builder refuses it
    requests[6][0]["ts"] = True  # an int all the same, but not as the sinks write it
    path = tmp_path / "t.jsonl"
    writer = TraceFileWriter.create(path)
    writer.write([event for request in requests for event in request])
    writer.close()
    summary_scan, _ = scan(path)
    assert not summary_scan.complete  # the refused line is no summary's
    folded = {trace.trace_id: trace for trace in load(path)}
    store = open_in_store(path)
    assert {t: info_fields(TraceInfo(x)) for t, x in store.items()} == {
        t: info_fields(TraceInfo(x)) for t, x in folded.items()
    }


# -- files several processes write -------------------------------------------------------


def open_in_store(path: Path) -> dict[str, Trace]:
    """What ``hopscope view`` ends up holding (the source run to its end, no UI)."""
    source = FileSource(path)
    batches: list[list[Any]] = []
    source.start(batches.append)
    assert source.done.wait(WAIT)
    store = RequestStore(100_000)
    for batch in batches:
        store.ingest(batch)
    return {row.trace.trace_id: row.trace for row in store.rows.values()}


def test_forked_workers_sharing_a_file_each_sum_up_their_own(
    tmp_path: Path, recordings: list[Record]
) -> None:
    path = tmp_path / "shared.jsonl"
    # Every record of a trace to the same worker (a background span may be its own).
    halves: list[list[Record]] = [[], []]
    for record in recordings:
        halves[int(to_events(record)[0]["trace_id"], 16) % 2].append(record)
    assert halves[0] and halves[1]
    children = []
    for half in halves:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                sink = FileSink(path, append=True, summaries=True)
                for record in half:
                    sink.emit(record)
                sink.close()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_bytes().count(b'{"format":"hopscope"') == 1
    assert assert_summaries_are_the_fold(path) == trace_count(recordings)
    held = open_in_store(path)
    assert all(isinstance(trace, SummarisedTrace) for trace in held.values())


def test_a_proxy_and_an_app_writing_one_file_never_show_a_partial_summary(
    tmp_path: Path, recordings: list[Record]
) -> None:
    """Each writer sums up only its own hop of a trace: no summary covers every line
    of it, so the file is folded, and the view shows both hops."""
    path = tmp_path / "shared.jsonl"
    app_sink = FileSink(path, append=True, summaries=True)
    proxy_sink = FileSink(path, append=True, summaries=True)
    ids: list[tuple[int, int]] = []
    for record in recordings:
        if record[0] == "r":
            ids.append((record[2], record[1]))
        app_sink.emit(record)
    for n, (trace_id, start) in enumerate(ids):
        attrs = {"http.request.method": "GET", "url.path": f"/via-proxy/{n}", "error": n == 3}
        proxy_sink.emit(
            ("c", start - 500, start + 10**9, trace_id, 10**6 + n, 0, "proxy", "GET", 1, attrs)
        )
    app_sink.close()
    proxy_sink.close()
    summary_scan, _ = scan(path)
    assert summary_scan.summaries >= 2 * len(ids) and not summary_scan.complete
    folded = {trace.trace_id: trace for trace in load(path, strict=True)}
    held = open_in_store(path)
    assert not any(isinstance(trace, SummarisedTrace) for trace in held.values())
    expected = {t: info_fields(TraceInfo(x)) for t, x in folded.items()}
    assert {t: info_fields(TraceInfo(x)) for t, x in held.items()} == expected
    # (what each writer's own summary says is not the whole trace: the proxy's path wins)
    assert {info["path"] for info in expected.values()} >= {"/via-proxy/0"}
