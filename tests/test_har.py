"""HAR 1.2 export and import: schema-valid output, round trips, redaction, timings, a
browser's HAR, bad HAR files and the ``hopscope export --har`` command."""

from __future__ import annotations

import base64
import contextlib
import gzip
import importlib.util
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.proxy import ProxyApp, ProxyHttpProtocol
from hopscope.tracing import MemorySink, wrap
from hopscope.tracing.har import HarError, exchange, load_har, traces_to_har
from hopscope.tracing.model import Trace, assemble
from hopscope.tracing.redact import REDACTED
from hopscope.tracing.tracefile import header_line
from servers import uvicorn_thread
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

DATA = Path(__file__).parent / "data"
SCHEMA = json.loads((DATA / "har12.schema.json").read_text())
CHROME = DATA / "chrome.har"


# -- schema validation ---------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: dict[str, Any], where: str, errors: list[str]) -> None:
    """The subset of JSON Schema that har12.schema.json uses."""
    if "$ref" in schema:
        schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_TYPES[kind](value) for kind in kinds):
            errors.append(f"{where}: {value!r} is not {kinds}")
            return
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        errors += [
            f"{where}: {key} is missing" for key in schema.get("required", []) if key not in value
        ]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{where}.{key}", errors)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{index}]", errors)


def assert_valid_har(document: dict[str, Any]) -> None:
    if importlib.util.find_spec("jsonschema") is not None:
        import jsonschema

        jsonschema.validate(document, SCHEMA)
    errors: list[str] = []
    _check(document, SCHEMA, "$", errors)
    assert not errors, errors
    for entry in document["log"]["entries"]:
        timings = entry["timings"]
        total = sum(v for k, v in timings.items() if k != "ssl" and v > 0)
        assert entry["time"] == pytest.approx(total, abs=0.01)  # HAR: time is their sum


def test_the_validator_catches_what_the_schema_forbids() -> None:
    errors: list[str] = []
    bad = {"log": {"version": "1.2", "creator": {"name": "x"}, "entries": [{"time": -3}]}}
    _check(bad, SCHEMA, "$", errors)
    assert "$.log.creator: version is missing" in errors
    assert "$.log.entries[0]: request is missing" in errors
    assert "$.log.entries[0].time: -3 < 0" in errors


# -- a real app ------------------------------------------------------------------------------


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "size": len(body)}, status_code=201)


async def page(request: Request) -> Response:
    return HTMLResponse(
        "<p>" + "hello " * 400 + "</p>", headers={"Set-Cookie": "sid=abc; Path=/; HttpOnly"}
    )


async def binary(request: Request) -> Response:
    return Response(bytes(range(256)), media_type="application/octet-stream")


async def browser_page(request: Request) -> Response:
    script = (
        "fetch('/api/items?x=1', {method: 'POST', body: JSON.stringify({a: 1}),"
        " headers: {'Content-Type': 'application/json'}})"
        ".then(r => r.json()).then(() => document.title = 'done')"
    )
    return HTMLResponse(f"<html><body><p>page</p><script>{script}</script></body></html>")


def make_app() -> Any:
    routes = [
        Route("/api/{rest:path}", echo, methods=["POST", "PUT"]),
        Route("/page", page),
        Route("/binary", binary),
        Route("/browser", browser_page),
    ]
    return GZipMiddleware(Starlette(routes=routes), minimum_size=500)


class Recorded:
    def __init__(self, url: str, sink: MemorySink) -> None:
        self.url = url
        self.sink = sink

    def traces(self, count: int) -> list[Trace]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            traces = [t for t in assemble(self.sink.events()) if t.finished]
            if len(traces) >= count:
                return traces
            time.sleep(0.01)
        raise AssertionError(f"fewer than {count} finished traces")


@pytest.fixture
def app_server(
    serve_asgi: Callable[[Any], contextlib.AbstractContextManager[str]],
) -> Iterator[Recorded]:
    sink = MemorySink()
    with serve_asgi(wrap(make_app(), sink=sink)) as url:
        yield Recorded(url, sink)


def drive(server: Recorded) -> list[Trace]:
    with httpx.Client(base_url=server.url) as client:
        client.post(
            "/api/items?x=1&api_key=k3y",
            json={"name": "n", "password": "hunter2"},
            headers={
                "Authorization": "Bearer t0k",
                "X-CSRF-Token": "v4lue",
                "Cookie": "sid=s1; a=b",
            },
        )
        client.put("/api/blob", content=bytes(range(256)), headers={"X-Dup": "1, 2"})
        client.get("/page", headers={"Accept-Encoding": "gzip"})
        client.get("/binary")
    return server.traces(4)


def by_path(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        entry["request"]["url"].split("?")[0].rsplit("/", 1)[1]: entry
        for entry in document["log"]["entries"]
    }


def test_export_of_real_requests_is_valid_har_1_2(app_server: Recorded) -> None:
    document = traces_to_har(drive(app_server))
    assert_valid_har(document)
    log = document["log"]
    assert log["version"] == "1.2" and log["creator"]["name"] == "hopscope"
    entries = by_path(document)
    assert set(entries) == {"items", "blob", "page", "binary"}
    items = entries["items"]
    assert items["request"]["method"] == "POST"
    assert items["response"]["status"] == 201 and items["response"]["statusText"] == "Created"
    assert items["request"]["postData"]["mimeType"] == "application/json"
    # Binary bodies: base64 both ways (a custom field for the request: HAR 1.2 has none).
    blob = entries["blob"]["request"]["postData"]
    assert blob["_encoding"] == "base64" and base64.b64decode(blob["text"]) == bytes(range(256))
    content = entries["binary"]["response"]["content"]
    assert content["encoding"] == "base64" and base64.b64decode(content["text"]) == bytes(
        range(256)
    )
    # A gzip-encoded response is shown decoded, with what compression saved.
    page_content = entries["page"]["response"]["content"]
    assert page_content["text"].startswith("<p>hello hello")
    assert page_content["compression"] > 0
    assert page_content["size"] == len(page_content["text"])
    # Entries are in start order, with the server's view of the timings.
    starts = [entry["startedDateTime"] for entry in log["entries"]]
    assert starts == sorted(starts)
    for entry in log["entries"]:
        assert entry["timings"]["connect"] == -1 and entry["timings"]["dns"] == -1


def test_secrets_are_redacted_unless_asked(app_server: Recorded) -> None:
    traces = drive(app_server)
    entry = by_path(traces_to_har(traces))["items"]
    text = json.dumps(entry)
    for secret in ("t0k", "v4lue", "s1", "k3y", "hunter2"):
        assert secret not in text, secret
    headers = {h["name"]: h["value"] for h in entry["request"]["headers"]}
    assert headers["authorization"] == headers["x-csrf-token"] == headers["cookie"] == REDACTED
    assert headers["content-type"] == "application/json"  # the rest is kept
    assert entry["request"]["cookies"] == [
        {"name": "sid", "value": REDACTED},
        {"name": "a", "value": REDACTED},
    ]
    assert {"name": "api_key", "value": REDACTED} in entry["request"]["queryString"]
    assert {"name": "x", "value": "1"} in entry["request"]["queryString"]
    assert json.loads(entry["request"]["postData"]["text"]) == {"name": "n", "password": REDACTED}
    page_entry = by_path(traces_to_har(traces))["page"]
    assert page_entry["response"]["cookies"][0]["value"] == REDACTED

    kept = json.dumps(by_path(traces_to_har(traces, redact=False))["items"])
    for secret in ("t0k", "v4lue", "s1", "k3y", "hunter2"):
        assert secret in kept, secret


def test_round_trip_keeps_method_url_status_headers_and_bodies(
    app_server: Recorded, tmp_path: Path
) -> None:
    traces = drive(app_server)
    path = tmp_path / "out.har"
    path.write_text(json.dumps(traces_to_har(traces, redact=False)))
    loaded = {t.trace_id: t for t in load_har(path)}
    assert len(loaded) == len(traces)
    for trace in traces:
        before, after = exchange(trace), exchange(loaded[trace.trace_id])
        assert before is not None and after is not None
        assert (after.method, after.url, after.status) == (before.method, before.url, before.status)
        assert after.request_headers == before.request_headers
        assert after.response_headers == before.response_headers
        assert after.request_body == before.request_body
        if "content-encoding" not in dict(before.response_headers):
            assert after.response_body == before.response_body
        else:  # HAR holds the decoded content, as browsers save it
            assert after.response_body == gzip.decompress(before.response_body)
        (span,) = loaded[trace.trace_id].spans.values()
        assert span.hop == "client" and span.finished


# -- timings ---------------------------------------------------------------------------------


@contextlib.contextmanager
def proxy_in_front(upstream: str, sink: MemorySink) -> Iterator[str]:
    with uvicorn_thread(
        ProxyApp(upstream, sink),
        http=ProxyHttpProtocol,
        lifespan="on",
        log_level="critical",
        timeout_graceful_shutdown=2,
    ) as served:
        yield served.url


def test_timings_through_the_proxy_come_from_the_client_hop(app_server: Recorded) -> None:
    proxy_sink = MemorySink()
    with proxy_in_front(app_server.url, proxy_sink) as url:
        httpx.post(url + "/api/one", content=b"x" * 1000)
        httpx.post(url + "/api/two", content=b"y")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            traces = [
                t for t in assemble(proxy_sink.events() + app_server.sink.events()) if t.finished
            ]
            if len(traces) == 2 and all(t.root and t.root.hop == "client" for t in traces):
                break
            time.sleep(0.02)
    document = traces_to_har(traces)
    assert_valid_har(document)
    for trace, entry in zip(
        sorted(traces, key=lambda t: t.start or 0), document["log"]["entries"], strict=True
    ):
        timings = entry["timings"]
        assert timings["connect"] >= 0 or timings["blocked"] >= 0
        assert entry["time"] == pytest.approx((trace.duration_ns or 0) / 1e6, abs=0.01)
    # The first request opened the upstream connection; the second reused it.
    first, second = document["log"]["entries"]
    assert first["timings"]["connect"] >= 0
    assert second["timings"]["connect"] == -1


def test_server_view_timings_split_at_the_response_head() -> None:
    ids = {"trace_id": "ab" * 16, "span_id": "cd" * 8}
    events = [
        {
            "kind": "span_start",
            "ts": 1_000_000,
            **ids,
            "parent_id": None,
            "hop": "app",
            "name": "POST /x",
            "attrs": {"http.request.method": "POST", "url.path": "/x"},
        },
        {
            "kind": "event",
            "ts": 3_000_000,
            **ids,
            "name": "request.body",
            "attrs": {"size": 1, "more": False},
        },
        {
            "kind": "event",
            "ts": 10_000_000,
            **ids,
            "name": "response.start",
            "attrs": {"status": 200},
        },
        {"kind": "span_end", "ts": 11_500_000, **ids, "attrs": {"http.response.status_code": 200}},
    ]
    entry = traces_to_har(assemble(events))["log"]["entries"][0]
    assert entry["timings"] == {
        "blocked": -1,
        "dns": -1,
        "connect": -1,
        "ssl": -1,
        "send": 2.0,
        "wait": 7.0,
        "receive": 1.5,
    }
    assert entry["time"] == 10.5


# -- a browser's HAR -------------------------------------------------------------------------


def test_a_chrome_har_loads_as_client_spans() -> None:
    traces = load_har(CHROME)
    assert len(traces) == 4
    doc, post, image, failed = sorted(traces, key=lambda t: t.start or 0)
    span = doc.root
    assert span is not None and span.hop == "client"
    assert span.attrs["url.full"] == "https://example.test/app?x=1&token=abc"
    assert span.attrs["server.address"] == "example.test" and span.attrs["server.port"] == 443
    assert span.attrs["network.protocol.version"] == "2"
    assert span.attrs["network.peer.address"] == "::1"
    assert span.attrs["har.resource_type"] == "document"
    assert doc.status == 200 and span.body("response") == b"<html><body>hi</body></html>"
    assert (span.end or 0) - (span.start or 0) == 45_670_000
    connect = span.event("connect")
    assert connect is not None and connect.attrs == {
        "blocked_ns": 1_200_000,
        "dns_ns": 300_000,
        "connect_ns": 10_000_000,
        "ssl_ns": 5_100_000,
        "reused": False,
    }
    assert [e.name for e in span.events] == ["connect", "request.sent", "response.start"]

    ex = exchange(post)
    assert ex is not None and ex.method == "POST" and ex.status == 201
    assert ex.request_body == b'{"name":"x","password":"pw"}'
    assert ex.request_headers.count(("X-Dup", "a")) == 1 and ("X-Dup", "b") in ex.request_headers
    assert image.root is not None and image.root.body("response").startswith(b"\x89PNG")
    assert image.start == post.start + 50_000_000  # "+02:00" read as such
    assert failed.error and failed.status is None
    assert (
        failed.root is not None and failed.root.attrs["error.type"] == "net::ERR_CONNECTION_REFUSED"
    )


def test_a_chrome_har_exports_back_with_the_same_timings() -> None:
    original = json.loads(CHROME.read_text())["log"]["entries"]
    exported = traces_to_har(load_har(CHROME), redact=False)
    assert_valid_har(exported)
    for before, after in zip(original, exported["log"]["entries"], strict=True):
        assert after["request"]["url"] == before["request"]["url"]
        assert after["response"]["status"] == before["response"]["status"]
        for key, value in before["timings"].items():
            if not key.startswith("_"):
                assert after["timings"][key] == pytest.approx(value, abs=0.002), key
        assert after["time"] == pytest.approx(before["time"], abs=0.01)


def test_a_har_saved_by_a_real_browser(app_server: Recorded, tmp_path: Path) -> None:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright is not installed (pip install playwright, and a Chromium)")
    from playwright.sync_api import Error, sync_playwright

    har_path = tmp_path / "browser.har"
    try:
        with sync_playwright() as playwright:
            # A distribution's Chromium (apt) when there is one, else Playwright's own.
            system = shutil.which("chromium") or shutil.which("chromium-browser")
            browser = playwright.chromium.launch(executable_path=system)
            context = browser.new_context(record_har_path=str(har_path), record_har_content="embed")
            page_ = context.new_page()
            page_.goto(app_server.url + "/browser")
            page_.wait_for_function("document.title === 'done'", timeout=10_000)
            context.close()
            browser.close()
    except Error as exc:
        pytest.skip(f"Chromium cannot run here: {str(exc).splitlines()[0]}")
    traces = load_har(har_path)
    posts = [t for t in traces if t.method == "POST"]
    assert len(posts) == 1
    ex = exchange(posts[0])
    assert ex is not None and ex.status == 201 and ex.path == "/api/items" and ex.query == "x=1"
    assert json.loads(ex.request_body) == {"a": 1}
    assert_valid_har(traces_to_har(traces))


# -- bad HAR files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json at all", "is not a HAR file (not JSON)"),
        ("[1, 2]", "is not a HAR file (no log object)"),
        ('{"log": {"version": "1.2"}}', "is not a HAR file (no log.entries list)"),
        ('{"log": {"version": "2.0", "entries": []}}', "is HAR version '2.0'"),
        (
            '{"log": {"entries": [{"startedDateTime": "2024-01-01T00:00:00Z"}]}}',
            "entry 1 has no request",
        ),
        (
            '{"log": {"entries": [{"request": {"method": "GET"}}]}}',
            "entry 1: request.method or request.url is missing",
        ),
        (
            '{"log": {"entries": [{"request": {"method": "GET", "url": "/"},'
            ' "startedDateTime": "yesterday"}]}}',
            "entry 1: startedDateTime 'yesterday' is not an ISO 8601 time",
        ),
    ],
)
def test_bad_har_is_a_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.har"
    path.write_text(content)
    with pytest.raises(HarError, match=re.escape(message)) as caught:
        load_har(path)
    assert "\n" not in str(caught.value)
    result = CliRunner().invoke(main, ["export", str(path), "--har", str(tmp_path / "out.har")])
    assert result.exit_code == 1 and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out.har").exists()


def test_an_empty_version_means_1_1_and_a_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "old.har"
    path.write_text('{"log": {"version": "", "entries": []}}')
    assert load_har(path) == []
    with pytest.raises(HarError, match=r"cannot open .*nope\.har: No such file"):
        load_har(tmp_path / "nope.har")


# -- the command -----------------------------------------------------------------------------


def write_trace_file(path: Path, traces_events: list[dict[str, Any]]) -> None:
    with path.open("w") as handle:
        handle.write(header_line())
        handle.writelines(json.dumps(event) + "\n" for event in traces_events)


def test_export_har_writes_0600_and_never_the_input(app_server: Recorded, tmp_path: Path) -> None:
    drive(app_server)
    source = tmp_path / "t.jsonl"
    write_trace_file(source, app_server.sink.events())
    out = tmp_path / "out.har"
    out.write_text("old")
    os.chmod(out, 0o644)
    result = CliRunner().invoke(main, ["export", str(source), "--har", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 4 request(s) as HAR" in result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    document = json.loads(out.read_text())
    assert_valid_har(document)
    assert REDACTED in out.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    before = source.read_bytes()
    refused = CliRunner().invoke(main, ["export", str(source), "--har", str(source)])
    assert refused.exit_code == 1 and "refusing to overwrite the input file" in refused.output
    assert source.read_bytes() == before


def test_export_har_from_a_har_to_stdout_with_no_redact(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(CHROME), "--har", "-", "--no-redact"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert_valid_har(document)
    assert len(document["log"]["entries"]) == 4
    assert "s3cr3t" in result.output
    redacted = CliRunner().invoke(main, ["export", str(CHROME), "--har", "-"])
    assert "s3cr3t" not in redacted.output and "token=%5Bredacted%5D" in redacted.output


def test_export_of_neither_format_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    result = CliRunner().invoke(main, ["export", str(path), "--har", "-"])
    assert result.exit_code == 1 and "not a HAR file" in result.output
    missing = CliRunner().invoke(main, ["export", str(tmp_path / "none"), "--har", "-"])
    assert missing.exit_code == 1 and "cannot open" in missing.output


def test_a_body_cut_at_capture_stays_marked_through_har(tmp_path: Path) -> None:
    """capture -> HAR -> load_har must keep "truncated", so replay never sends it cut."""
    from hopscope.tracing import FileSink, load
    from hopscope.tracing.har import load_har, traces_to_har
    from hopscope.tracing.replay import captured_request

    trace_file = tmp_path / "t.jsonl"
    sink = FileSink(trace_file)
    attrs = {
        "http.request.method": "POST",
        "url.path": "/upload",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": 8000,
        "http.request.headers": [(b"host", b"127.0.0.1:8000")],
    }
    end = {
        "http.response.status_code": 200,
        "http.request.body": [b"x" * 100],
        "http.request.body.size": 5000,
        "http.request.body.truncated": True,
    }
    sink.emit(("s", 1_000, 7, 9, 0, "app", "POST /upload", 1, attrs))
    sink.emit(("e", 2_000, 7, 9, end))
    sink.close()
    har = tmp_path / "t.har"
    har.write_text(json.dumps(traces_to_har(load(trace_file))))
    (trace,) = load_har(har)
    request = captured_request(trace)
    assert request is not None and request.truncated
