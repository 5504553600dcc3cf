"""OpenTelemetry: OTLP JSON/protobuf export checked with opentelemetry-proto, the way back
into wire events, the OTLP/HTTP receiver fed by the real OpenTelemetry SDK exporter, and
the background sender."""

from __future__ import annotations

import base64
import contextlib
import gzip
import importlib.util
import json
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.otlp_receiver import OtlpReceiver
from hopscope.app.otlp_sender import OtlpSender, traces_url
from hopscope.tracing import MemorySink, span, wrap
from hopscope.tracing.model import Trace, assemble
from hopscope.tracing.otlp import (
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    OtlpError,
    otlp_protobuf_to_json,
    otlp_to_events,
    traces_to_otlp_json,
    traces_to_otlp_protobuf,
)
from hopscope.tracing.redact import REDACTED
from hopscope.tracing.tracefile import header_line
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PROTO = importlib.util.find_spec("opentelemetry.proto") is not None
EXPORTER = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
needs_proto = pytest.mark.skipif(
    not PROTO, reason="opentelemetry-proto is not installed (pip install opentelemetry-proto)"
)

Serve = Callable[[Any], contextlib.AbstractContextManager[str]]


# -- traces from a real app ------------------------------------------------------------------


async def item(request: Request) -> Response:
    with span("db.query", table="items"):
        pass
    # Work past 10 ms after the response is a "background" span.
    return JSONResponse({"ok": True}, background=BackgroundTask(time.sleep, 0.03))


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


def wait_traces(sink: MemorySink, spans: int) -> list[Trace]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        traces = assemble(sink.events())
        if sum(1 for t in traces for s in t.spans.values() if s.finished) >= spans:
            return traces
        time.sleep(0.01)
    raise AssertionError(f"fewer than {spans} finished spans")


@pytest.fixture
def traces(serve_asgi: Serve) -> list[Trace]:
    sink = MemorySink()
    app = Starlette(routes=[Route("/items/{id}", item), Route("/boom", boom)])
    with serve_asgi(wrap(app, sink=sink)) as url:
        httpx.get(
            url + "/items/7?q=1&access_token=s3cr3t",
            headers={"Authorization": "Bearer t0k", "X-Dup": "a"},
        )
        httpx.get(url + "/boom")
        return wait_traces(sink, 4)  # app spans, db.query and background


def spans_of(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        s for r in payload["resourceSpans"] for scope in r["scopeSpans"] for s in scope["spans"]
    ]


def attrs_of(item: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in item["attributes"]}


def test_otlp_json_has_ids_kinds_times_and_semantic_attributes(traces: list[Trace]) -> None:
    payload = traces_to_otlp_json(traces)
    resource = attrs_of(payload["resourceSpans"][0]["resource"])
    assert resource["service.name"].startswith("uvicorn/")
    assert int(resource["process.pid"]) > 0
    spans = {s["name"]: s for s in spans_of(payload)}
    assert set(spans) == {"GET /items/7", "db.query", "background", "GET /boom"}
    root = spans["GET /items/7"]
    trace = next(t for t in traces if t.path == "/items/7")
    assert root["traceId"] == trace.trace_id and len(root["traceId"]) == 32
    assert root["spanId"] == trace.root.span_id if trace.root else False
    assert "parentSpanId" not in root
    assert spans["db.query"]["parentSpanId"] == root["spanId"]
    assert root["kind"] == SPAN_KIND_SERVER
    assert spans["db.query"]["kind"] == spans["background"]["kind"] == SPAN_KIND_INTERNAL
    assert root["startTimeUnixNano"] == str(trace.root.start if trace.root else 0)
    assert int(root["endTimeUnixNano"]) >= int(root["startTimeUnixNano"])
    attrs = attrs_of(root)
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/items/7" and attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == "200"  # int64: a string in OTLP JSON
    assert attrs["http.route"] == "/items/{id}"
    assert attrs["server.address"] == "127.0.0.1" and attrs["client.address"] == "127.0.0.1"
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["hopscope.hop"] == "app"
    assert attrs["http.request.header.x-dup"] == {"values": [{"stringValue": "a"}]}
    assert not any(key.endswith(".body") for key in attrs)  # bodies are not telemetry
    error = spans["GET /boom"]
    assert error["status"]["code"] == 2 and "RuntimeError" in error["status"]["message"]
    assert "exception" in [e["name"] for e in error["events"]]
    event_attrs = attrs_of(next(e for e in error["events"] if e["name"] == "exception"))
    assert event_attrs["exception.type"].endswith("RuntimeError")


def test_secrets_are_redacted_in_otlp(traces: list[Trace]) -> None:
    text = json.dumps(traces_to_otlp_json(traces))
    assert "t0k" not in text and "s3cr3t" not in text
    root = next(s for s in spans_of(traces_to_otlp_json(traces)) if s["name"] == "GET /items/7")
    attrs = attrs_of(root)
    assert attrs["http.request.header.authorization"] == {"values": [{"stringValue": REDACTED}]}
    assert attrs["url.query"] == "q=1&access_token=%5Bredacted%5D"
    kept = json.dumps(traces_to_otlp_json(traces, redact=False))
    assert "t0k" in kept and "s3cr3t" in kept


def test_otlp_json_comes_back_as_the_same_spans(traces: list[Trace]) -> None:
    again = {t.trace_id: t for t in assemble(otlp_to_events(traces_to_otlp_json(traces)))}
    assert set(again) == {t.trace_id for t in traces}
    for trace in traces:
        other = again[trace.trace_id]
        assert set(other.spans) == set(trace.spans)
        for span_id, before in trace.spans.items():
            after = other.spans[span_id]
            assert (after.hop, after.name, after.parent_id) == (
                before.hop,
                before.name,
                before.parent_id,
            )
            assert (after.start, after.end) == (before.start, before.end)
            assert [e.name for e in after.events] == [
                e.name for e in sorted(before.events, key=lambda e: e.ts)
            ]
        assert (other.method, other.path, other.status, other.error) == (
            trace.method,
            trace.path,
            trace.status,
            trace.error,
        )
    root = next(t for t in again.values() if t.path == "/items/7").root
    assert root is not None and ["x-dup", "a"] in root.attrs["http.request.headers"]


@needs_proto
def test_otlp_json_parses_into_the_protobuf_request(traces: list[Trace]) -> None:
    from google.protobuf.json_format import ParseDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    payload = traces_to_otlp_json(traces)

    def b64(value: str) -> str:  # OTLP JSON ids are hex; protobuf's JSON mapping wants base64
        return base64.b64encode(bytes.fromhex(value)).decode()

    for item in spans_of(payload):
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in item:
                item[key] = b64(item[key])
    message = ParseDict(payload, ExportTraceServiceRequest())
    decoded = [s for r in message.resource_spans for ss in r.scope_spans for s in ss.spans]
    by_name = {s.name: s for s in decoded}
    trace = next(t for t in traces if t.path == "/items/7")
    root_span = trace.root
    assert root_span is not None
    root = by_name["GET /items/7"]
    assert root.trace_id == bytes.fromhex(trace.trace_id)
    assert root.span_id == bytes.fromhex(root_span.span_id)
    assert root.start_time_unix_nano == root_span.start
    assert root.kind == SPAN_KIND_SERVER
    assert by_name["db.query"].parent_span_id == root.span_id
    assert by_name["GET /boom"].status.code == 2
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["http.request.method"].string_value == "GET"

    # The library's own protobuf encoding says the same.
    raw = traces_to_otlp_protobuf(traces)
    parsed = ExportTraceServiceRequest.FromString(raw)
    assert parsed == message
    assert otlp_protobuf_to_json(raw)["resourceSpans"][0]["scopeSpans"][0]["spans"][0][
        "traceId"
    ] in {t.trace_id for t in traces}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "an OTLP request is a JSON object"),
        ({"resourceSpans": {}}, "resourceSpans is not a list"),
        ({"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "ab" * 8}]}]}]}, "no traceId"),
        (
            {
                "resourceSpans": [
                    {"scopeSpans": [{"spans": [{"traceId": "zz", "spanId": "ab" * 8}]}]}
                ]
            },
            "is not base64",
        ),
        (
            {
                "resourceSpans": [
                    {
                        "scopeSpans": [
                            {
                                "spans": [
                                    {
                                        "traceId": "ab" * 16,
                                        "spanId": "ab" * 8,
                                        "startTimeUnixNano": "soon",
                                    }
                                ]
                            }
                        ]
                    }
                ]
            },
            "startTimeUnixNano is not a number",
        ),
    ],
)
def test_bad_otlp_payloads_are_one_line_errors(payload: Any, message: str) -> None:
    with pytest.raises(OtlpError, match=message):
        otlp_to_events(payload)


def test_foreign_spans_get_hops_from_their_kind() -> None:
    def one(kind: Any, attrs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "traceId": "0af7651916cd43dd8448eb211c80319c",
            "spanId": f"{kind}".zfill(16)[-16:] if isinstance(kind, int) else "b7ad6b7169203331",
            "name": f"k{kind}",
            "kind": kind,
            "startTimeUnixNano": 10,
            "endTimeUnixNano": "20",
            "attributes": attrs or [],
        }

    payload = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "shop"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            one(2),
                            one(3),
                            one(1),
                            one(5, [{"key": "hopscope.hop", "value": {"stringValue": "proxy"}}]),
                        ]
                    }
                ],
            }
        ]
    }
    spans = {s.name: s for t in assemble(otlp_to_events(payload)) for s in t.spans.values()}
    assert spans["k2"].hop == "app" and spans["k3"].hop == "client"
    assert spans["k1"].hop == "app" and spans["k1"].attrs["span.kind"] == "user"
    assert spans["k5"].hop == "proxy"
    assert spans["k2"].attrs["service.name"] == "shop"
    assert (spans["k2"].start, spans["k2"].end) == (10, 20)


# -- the receiver ----------------------------------------------------------------------------


class Received:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, events: list[dict[str, Any]]) -> None:
        self.events += events
        self.arrived.set()
        self.release.wait(10)

    def wait(self, spans: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            starts = [e for e in self.events if e["kind"] == "span_start"]
            if len(starts) >= spans:
                return starts
            time.sleep(0.01)
        raise AssertionError(f"fewer than {spans} spans arrived")


@pytest.fixture
def receiver(serve_asgi: Serve) -> Iterator[tuple[str, Received, OtlpReceiver]]:
    received = Received()
    app = OtlpReceiver(received)
    with serve_asgi(app) as url:
        yield url, received, app


def test_receiver_takes_json_gzip_and_says_what_is_wrong(
    receiver: tuple[str, Received, OtlpReceiver], traces: list[Trace]
) -> None:
    url, received, app = receiver
    payload = traces_to_otlp_json(traces)
    ok = httpx.post(url + "/v1/traces", json=payload)
    assert ok.status_code == 200 and ok.json() == {}
    body = gzip.compress(json.dumps(payload).encode())
    zipped = httpx.post(
        url + "/v1/traces",
        content=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert zipped.status_code == 200
    spans = sum(len(t.spans) for t in traces)
    assert len(received.wait(2 * spans)) == 2 * spans
    assert app.requests == 2 and app.spans == 2 * spans

    bad = httpx.post(
        url + "/v1/traces", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["message"] == "body is not JSON"
    bad_ids = httpx.post(
        url + "/v1/traces", json={"resourceSpans": [{"scopeSpans": [{"spans": [{}]}]}]}
    )
    assert bad_ids.status_code == 400 and "no traceId" in bad_ids.json()["message"]
    assert (
        httpx.post(url + "/v1/traces", content=b"x", headers={"Content-Encoding": "br"}).status_code
        == 415
    )
    assert (
        httpx.post(
            url + "/v1/traces", content=b"x", headers={"Content-Type": "text/plain"}
        ).status_code
        == 415
    )
    assert (
        httpx.post(
            url + "/v1/traces", content=b"not gzip", headers={"Content-Encoding": "gzip"}
        ).status_code
        == 400
    )
    assert httpx.get(url + "/v1/traces").status_code == 405
    assert httpx.post(url + "/v1/metrics", json={}).status_code == 404
    assert app.rejected == 7 and app.requests == 2


def test_receiver_refuses_a_zip_bomb(serve_asgi: Serve) -> None:
    received = Received()
    with serve_asgi(OtlpReceiver(received, max_body=100_000)) as url:
        bomb = gzip.compress(b" " * 1_000_000)
        answer = httpx.post(
            url + "/v1/traces",
            content=bomb,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert answer.status_code == 413
        big = httpx.post(url + "/v1/traces", content=b" " * 200_000)
        assert big.status_code == 413
    assert received.events == []


@needs_proto
def test_receiver_takes_protobuf(
    receiver: tuple[str, Received, OtlpReceiver], traces: list[Trace]
) -> None:
    url, received, _ = receiver
    answer = httpx.post(
        url + "/v1/traces",
        content=traces_to_otlp_protobuf(traces),
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-protobuf"
    spans = sum(len(t.spans) for t in traces)
    got = {(e["trace_id"], e["span_id"], e["name"], e["hop"]) for e in received.wait(spans)}
    assert got == {(s.trace_id, s.span_id, s.name, s.hop) for t in traces for s in t.spans.values()}
    bad = httpx.post(
        url + "/v1/traces",
        content=b"\xff\xff\xff",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert bad.status_code == 400


@pytest.mark.skipif(
    not EXPORTER,
    reason="opentelemetry-exporter-otlp-proto-http is not installed",
)
@pytest.mark.parametrize("compressed", [False, True])
def test_an_app_instrumented_with_the_opentelemetry_sdk_reports_into_the_receiver(
    receiver: tuple[str, Received, OtlpReceiver], compressed: bool
) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode

    url, received, _ = receiver
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    exporter = OTLPSpanExporter(
        endpoint=url + "/v1/traces",
        compression=Compression.Gzip if compressed else Compression.NoCompression,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span(
        "GET /orders/{id}",
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "GET",
            "url.path": "/orders/3",
            "http.response.status_code": 500,
        },
    ) as server_span:
        with tracer.start_as_current_span("charge", kind=SpanKind.CLIENT) as client_span:
            client_span.add_event("retry", {"attempt": 2})
        with tracer.start_as_current_span("render") as inner:
            inner.set_status(Status(StatusCode.ERROR, "template missing"))
    provider.shutdown()

    starts = {e["name"]: e for e in received.wait(3)}
    context = server_span.get_span_context()
    trace_id, server_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    assert set(starts) == {"GET /orders/{id}", "charge", "render"}
    assert {e["trace_id"] for e in starts.values()} == {trace_id}
    assert starts["GET /orders/{id}"]["span_id"] == server_id
    assert starts["GET /orders/{id}"]["parent_id"] is None
    assert starts["charge"]["parent_id"] == starts["render"]["parent_id"] == server_id
    assert starts["charge"]["span_id"] == f"{client_span.get_span_context().span_id:016x}"
    assert (starts["GET /orders/{id}"]["hop"], starts["charge"]["hop"]) == ("app", "client")
    assert starts["GET /orders/{id}"]["attrs"]["service.name"] == "shop"
    assert starts["GET /orders/{id}"]["attrs"]["http.response.status_code"] == 500

    (trace,) = assemble(received.events)
    assert trace.method == "GET" and trace.status == 500 and trace.error
    charge = trace.spans[starts["charge"]["span_id"]]
    assert [(e.name, e.attrs) for e in charge.events] == [("retry", {"attempt": 2})]
    assert trace.spans[starts["render"]["span_id"]].attrs["error"] is True


# -- the sender ------------------------------------------------------------------------------


def test_sender_posts_batches_to_the_receiver(
    receiver: tuple[str, Received, OtlpReceiver], traces: list[Trace]
) -> None:
    url, received, _ = receiver
    spans = sum(len(t.spans) for t in traces)
    with OtlpSender(url, interval=0.05) as sender:
        for trace in traces:
            assert sender.submit(trace)
        received.wait(spans)
    assert sender.sent == spans and sender.failed == sender.dropped == 0
    assert {e["trace_id"] for e in received.events} == {t.trace_id for t in traces}
    assert "t0k" not in json.dumps(received.events)  # redacted on the way out


def test_sender_feed_sends_each_trace_once_when_it_finishes(
    receiver: tuple[str, Received, OtlpReceiver], traces: list[Trace]
) -> None:
    url, received, _ = receiver
    events = otlp_to_events(traces_to_otlp_json(traces, redact=False))
    ends = [e for e in events if e["kind"] == "span_end"]
    others = [e for e in events if e["kind"] != "span_end"]
    with OtlpSender(url, interval=0.05) as sender:
        sender.feed(others)
        assert sender._queue.qsize() == 0  # nothing finished yet
        sender.feed(ends)
        sender.feed(ends)  # stragglers of traces already sent are ignored
        received.wait(sum(len(t.spans) for t in traces))
    assert sender.sent == sum(len(t.spans) for t in traces)


def test_sender_drops_when_full_and_counts_failures(
    receiver: tuple[str, Received, OtlpReceiver], traces: list[Trace], free_port: Callable[[], int]
) -> None:
    url, received, _ = receiver
    received.release.clear()  # the receiver holds the first batch: the queue fills up
    sender = OtlpSender(url, max_queue=2, batch_size=1, interval=0.01)
    try:
        assert sender.submit(traces[0])
        assert received.arrived.wait(10)
        results = [sender.submit(traces[1]) for _ in range(5)]
        assert results == [True, True, False, False, False]
        assert sender.dropped == 3
    finally:
        received.release.set()
        sender.close()
    assert sender.sent == len(traces[0].spans) + 2 * len(traces[1].spans)

    down = OtlpSender(f"http://127.0.0.1:{free_port()}", interval=0.01, timeout=2)
    down.submit(traces[0])
    down.close()
    assert down.failed == len(traces[0].spans) and down.sent == 0
    assert down.last_error is not None and "Connect" in down.last_error
    assert not down.submit(traces[0])  # closed


def test_traces_url() -> None:
    assert traces_url("http://localhost:4318") == "http://localhost:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("https://c/custom/path") == "https://c/custom/path"
    with pytest.raises(ValueError, match="not an http"):
        traces_url("localhost:4318")


# -- the command -----------------------------------------------------------------------------


def test_export_otlp_writes_0600_json(traces: list[Trace], tmp_path: Path) -> None:
    source = tmp_path / "t.jsonl"
    events = otlp_to_events(traces_to_otlp_json(traces, redact=False))
    with source.open("w") as handle:
        handle.write(header_line())
        handle.writelines(json.dumps(event) + "\n" for event in events)
    out = tmp_path / "spans.json"
    result = CliRunner().invoke(main, ["export", str(source), "--otlp", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {sum(len(t.spans) for t in traces)} span(s) as OTLP JSON" in result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    payload = json.loads(out.read_text())
    assert {s["traceId"] for s in spans_of(payload)} == {t.trace_id for t in traces}
    assert "t0k" not in out.read_text()
    kept = CliRunner().invoke(main, ["export", str(source), "--otlp", "-", "--no-redact"])
    assert "t0k" in kept.output
