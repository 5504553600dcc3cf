"""``hopscope replay``: resend a capture to real servers and report what changed.

Captures are made the way users make them: a Starlette app wrapped with
``hopscope.tracing.wrap`` and a FileSink, under a real uvicorn, driven by httpx.  Then
the capture is replayed through the CLI against the same app, a changed one, or nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from hopscope.app.cli import main
from hopscope.tracing import FileSink, MemorySink, load, wrap
from hopscope.tracing.model import assemble
from hopscope.tracing.records import to_events
from hopscope.tracing.redact import REDACTED, is_redacted, redact_attrs, redact_headers
from hopscope.tracing.replay import (
    captured_request,
    compare,
    decode_content,
    header_diff,
    json_diff,
    parse_ignore_path,
    replay_headers,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

Serve = Callable[[Any], contextlib.AbstractContextManager[str]]
ROW = re.compile(r"^\s*(\d+)\s+([A-Z]+)\s+(\S+)\s+(.*)$")
SLEEPS = [70, 60, 50, 40, 30, 20, 10, 0]


# -- the app, in two versions -------------------------------------------------------------------


def make_app(version: int = 1, slow: int = 1) -> Starlette:
    """Version 2 changes one status (/status), one JSON field (/items names) and one
    header (/echo's x-api-version); everything else answers the same."""

    async def items(request: Request) -> Response:
        names = ["apple", "pear"] if version == 1 else ["APPLE", "pear"]
        return JSONResponse(
            {"count": 2, "items": [{"id": i, "name": n} for i, n in enumerate(names, 1)]}
        )

    async def item(request: Request) -> Response:
        return JSONResponse(
            {"id": request.path_params["id"], "verbose": request.query_params.get("verbose")}
        )

    async def echo(request: Request) -> Response:
        return JSONResponse(
            {"got": await request.json()},
            status_code=201,
            headers={"x-api-version": str(version)},
        )

    async def status(request: Request) -> Response:
        return PlainTextResponse("ok", status_code=200 if version == 1 else 503)

    async def upload(request: Request) -> Response:
        return JSONResponse({"size": len(await request.body())})

    async def whoami(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def file(request: Request) -> Response:
        return JSONResponse({"name": request.path_params["name"]})

    async def sleep(request: Request) -> Response:
        ms = int(request.path_params["ms"])
        await asyncio.sleep(ms * slow / 1000)
        return JSONResponse({"slept": ms})

    return Starlette(
        routes=[
            Route("/items", items),
            Route("/items/{id:int}", item),
            Route("/echo", echo, methods=["POST"]),
            Route("/status", status),
            Route("/upload", upload, methods=["POST"]),
            Route("/whoami", whoami),
            Route("/sleep/{ms:int}", sleep),
            Route("/files/{name:path}", file),
        ]
    )


class Received:
    """What a server was sent: method, path and headers per request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.requests.append(
                {"method": scope["method"], "path": scope["path"], "headers": headers}
            )
        await self.app(scope, receive, send)

    def to(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


def drive(base: str, sleeps: bool = False) -> None:
    """The traffic captured: one request at a time, so capture order is known."""
    with httpx.Client(base_url=base) as client:
        if sleeps:
            for ms in SLEEPS:
                assert client.get(f"/sleep/{ms}").status_code == 200
            return
        assert client.get("/items").status_code == 200
        assert client.get("/items/7", params={"verbose": "1"}).status_code == 200
        assert client.post("/echo", json={"a": 1}).status_code == 201
        assert client.get("/status").status_code == 200
        assert client.post("/upload", content=b"x" * 5000).status_code == 200
        assert client.get("/files/a b/ü%.txt").json() == {"name": "a b/ü%.txt"}
        headers = {"Authorization": "Bearer s3cret", "X-Trace-Me": "yes"}
        assert client.get("/whoami", headers=headers).status_code == 200


def redact_file(raw: Path, out: Path) -> None:
    """Rewrite a capture with its secrets hidden, as an exporter would."""
    lines = raw.read_text().splitlines()
    events = [json.loads(line) for line in lines[1:]]
    for event in events:
        if event.get("attrs"):
            event["attrs"] = redact_attrs(event["attrs"])
    out.write_text("\n".join([lines[0], *(json.dumps(e) for e in events)]) + "\n")


@pytest.fixture
def capture(tmp_path: Path, serve_asgi: Serve) -> Callable[..., Path]:
    """``capture()`` -> a trace file of :func:`drive`'s traffic to version 1, secrets
    redacted; request bodies kept up to 1 KiB, so the 5000-byte upload is truncated."""

    def make(sleeps: bool = False) -> Path:
        raw = tmp_path / f"raw-{sleeps}.jsonl"
        sink = FileSink(raw)
        with serve_asgi(wrap(make_app(1), sink=sink, body_limit=1024)) as base:
            drive(base, sleeps)
        sink.close()
        out = tmp_path / f"capture-{sleeps}.jsonl"
        redact_file(raw, out)
        return out

    return make


def replay(*args: str) -> Result:
    return CliRunner().invoke(main, ["replay", *args], catch_exceptions=False)


def rows(output: str) -> dict[str, tuple[int, str]]:
    """``{path: (index, rest of the row)}`` from the printed table."""
    found = {}
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            found[match[3]] = (int(match[1]), match[4])
    return found


def details(output: str, path: str) -> list[str]:
    """The indented lines under ``path``'s row."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if ROW.match(line) and f" {path} " in line)
    out = []
    for line in lines[start + 1 :]:
        if not line.startswith("  ") or ROW.match(line):
            break
        out.append(line.strip())
    return out


@contextlib.contextmanager
def target(
    serve_asgi: Serve, version: int = 1, slow: int = 1, **wrap_options: Any
) -> Iterator[tuple[str, Received]]:
    app = Received(make_app(version, slow))
    served: Any = wrap(app, **wrap_options) if wrap_options else app
    with serve_asgi(served) as base:
        yield base, app


# -- replaying against real servers -------------------------------------------------------------


def test_same_app_matches(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture()
    before = file.read_bytes()
    with target(serve_asgi) as (base, app):
        result = replay(str(file), "--target", base)
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    files = "/files/a b/ü%.txt"
    assert set(table) == {
        "/items", "/items/7?verbose=1", "/echo", "/status", "/upload", "/files/a", "/whoami"
    }  # fmt: skip
    assert [table[p][0] for p in ("/items", "/echo", "/whoami")] == [1, 3, 7]  # capture order
    assert table["/files/a"][1].startswith("b/ü%.txt ")  # (the row regex splits at spaces)
    for path in ("/items", "/items/7?verbose=1", "/echo", "/status", "/files/a", "/whoami"):
        assert table[path][1].endswith("same"), table[path]
    # Truncated at capture: skipped, said so, never sent cut.
    skipped = "skipped: request body truncated at capture (1024 of 5000 bytes kept)"
    assert skipped in table["/upload"][1]
    assert app.to("/upload") == []
    # The redacted header is listed and not sent; the others are, hopscope's own are not.
    assert "not sent (redacted in the capture): authorization" in details(result.stdout, "/whoami")
    (whoami,) = app.to("/whoami")
    assert "authorization" not in whoami["headers"]
    assert whoami["headers"]["x-trace-me"] == "yes"
    assert whoami["headers"]["traceparent"].startswith("00-")
    (items7,) = app.to("/items/7")
    assert "user-agent" in items7["headers"] and "python-httpx" in items7["headers"]["user-agent"]
    assert [r["path"] for r in app.requests if r["path"].startswith("/files/")] == [files]
    assert "6 request(s) replayed against" in result.stdout
    assert "6 same, 0 different; 1 skipped" in result.stdout
    assert "authorization (#7)" in result.stdout
    assert file.read_bytes() == before  # the capture is never rewritten


def test_override_sends_redacted_header(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture()
    with target(serve_asgi) as (base, app):
        result = replay(
            str(file), "--target", base, "--filter", "path:/whoami",
            "--header", "Authorization: Bearer real", "--header", "X-Extra:1",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    (whoami,) = app.requests
    assert whoami["headers"]["authorization"] == "Bearer real"
    assert whoami["headers"]["x-extra"] == "1"
    assert "not sent" not in result.stdout


def test_changed_app_names_each_difference(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture()
    with target(serve_asgi, version=2) as (base, _):
        result = replay(str(file), "--target", base)
    assert result.exit_code == 1, result.output
    table = rows(result.stdout)
    assert "200 -> 503" in table["/status"][1] and "DIFFERENT" in table["/status"][1]
    assert details(result.stdout, "/status") == ["status: 200 -> 503"]
    assert details(result.stdout, "/items") == ['body: items.0.name: "apple" -> "APPLE"']
    assert details(result.stdout, "/echo") == ["header x-api-version: '1' -> '2'"]
    for path in ("/items/7?verbose=1", "/files/a", "/whoami"):
        assert table[path][1].endswith("same")
    assert "3 same, 3 different; 1 skipped" in result.stdout


def test_ignore_paths_and_headers(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture()
    with target(serve_asgi, version=2) as (base, _):
        plain = replay(str(file), "--target", base, "--filter", "path:/items")
        ignored = replay(
            str(file), "--target", base, "--filter", "path:/items", "--ignore", "items.*.name"
        )
        pointer = replay(
            str(file), "--target", base, "--filter", "path:/items", "--ignore", "/items/0/name"
        )
        other = replay(
            str(file), "--target", base, "--filter", "path:/items", "--ignore", "items.*.id"
        )
        header = replay(
            str(file), "--target", base, "--filter", "path:/echo",
            "--ignore-header", "X-API-Version",
        )  # fmt: skip
    assert plain.exit_code == 1
    assert ignored.exit_code == 0, ignored.output
    assert rows(ignored.stdout)["/items"][1].endswith("same")
    assert pointer.exit_code == 0, pointer.output
    assert other.exit_code == 1  # ignoring another field hides nothing
    assert header.exit_code == 0, header.output


def test_filter_selects(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture()
    with target(serve_asgi) as (base, app):
        result = replay(str(file), "--target", base, "--filter", "method:POST")
    assert result.exit_code == 0, result.output
    assert set(rows(result.stdout)) == {"/echo", "/upload"}
    assert [r["path"] for r in app.requests] == ["/echo"]  # /upload is skipped (truncated)


def test_bad_filter_says_where(capture: Callable[..., Path]) -> None:
    file = capture()
    result = replay(str(file), "--target", "http://127.0.0.1:9", "--filter", "stauts:500")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "unknown field 'stauts' at column 1" in result.stderr


def test_unreachable_target_is_one_line(
    capture: Callable[..., Path], free_port: Callable[[], int]
) -> None:
    file = capture()
    url = f"http://127.0.0.1:{free_port()}"
    result = replay(str(file), "--target", url, "--concurrency", "3")
    assert result.exit_code == 2
    assert result.stderr == f"Error: cannot reach {url}: connection refused\n"
    assert "Traceback" not in result.output


def test_bad_files_and_options(tmp_path: Path, capture: Callable[..., Path]) -> None:
    missing = replay(str(tmp_path / "nope.jsonl"), "--target", "http://127.0.0.1:9")
    assert missing.exit_code == 2
    assert missing.stderr.startswith("Error: cannot open") and missing.stderr.count("\n") == 1
    junk = tmp_path / "junk.jsonl"
    junk.write_text("hello\n")
    bad = replay(str(junk), "--target", "http://127.0.0.1:9")
    assert bad.exit_code == 2 and "not a hopscope trace file" in bad.stderr
    file = capture()
    before = file.read_bytes()
    same = replay(str(file), "--target", "http://127.0.0.1:9", "-o", str(file))
    assert same.exit_code == 2 and "is the capture being replayed" in same.stderr
    assert file.read_bytes() == before
    for option in (["--header", "no colon"], ["--ignore", "a..b"], ["--target", "ftp://x"]):
        args = [str(file), "--target", "http://127.0.0.1:9", *option]
        result = replay(*args)
        assert result.exit_code == 2, (option, result.output)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    nothing = replay(str(file), "--target", "http://127.0.0.1:9", "--filter", "path:/nothing")
    assert nothing.exit_code == 2 and "no captured requests that --filter selects" in nothing.stderr


def test_output_records_client_spans_the_target_joins(
    tmp_path: Path, capture: Callable[..., Path], serve_asgi: Serve
) -> None:
    file = capture()
    out = tmp_path / "replay.jsonl"
    sink = MemorySink()
    with target(serve_asgi, sink=sink) as (base, _):
        result = replay(str(file), "--target", base, "-o", str(out), "--filter", "not method:POST")
    assert result.exit_code == 0, result.output
    replayed = load(out, strict=True)
    assert len(replayed) == 5
    captured_ids = {t.trace_id for t in load(file)}
    clients = {}
    for trace in replayed:
        (client,) = trace.by_hop("client")
        assert client.parent_id is None and client.finished
        assert client.attrs["replay.of"] in captured_ids
        assert client.attrs["http.response.status_code"] == 200
        assert client.attrs["replay.match"] is True
        names = [e.name for e in client.events]
        phases = ["request.head.sent", "request.sent", "response.start", "response.end"]
        assert [n for n in names if n != "connect"] == phases
        assert names.index("connect") == 0 if "connect" in names else True
        stamps = [e.ts for e in client.events]
        assert stamps == sorted(stamps)
        assert client.start <= stamps[0] and stamps[-1] <= client.end  # type: ignore[operator]
        assert all(e.attrs["duration_ns"] >= 0 for e in client.events)
        assert client.event("response.start").attrs["status"] == 200  # type: ignore[union-attr]
        clients[trace.trace_id] = client
    assert sum("connect" in [e.name for e in c.events] for c in clients.values()) >= 1
    # The wrapped target continued each replayed request's trace under its client span.
    apps = [s for t in sink.traces() for s in t.by_hop("app") if "interface" in s.attrs]
    assert len(apps) == 5
    for app_span in apps:
        assert app_span.trace_id in clients
        assert app_span.parent_id == clients[app_span.trace_id].span_id


def test_concurrency_keep_order_is_stable(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture(sleeps=True)
    with target(serve_asgi) as (base, app):
        runs = [
            replay(str(file), "--target", base, "--concurrency", "4", "--keep-order")
            for _ in range(2)
        ]
    for result in runs:
        assert result.exit_code == 0, result.output
        table = [m.groups()[:3] for m in map(ROW.match, result.stdout.splitlines()) if m]
        # The first requests sleep longest: they finish last, yet print first.
        assert table == [(str(i), "GET", f"/sleep/{ms}") for i, ms in enumerate(SLEEPS, 1)]
    assert len(app.requests) == 2 * len(SLEEPS)


def test_rate_limited_replay_completes(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture(sleeps=True)
    with target(serve_asgi) as (base, app):
        result = replay(
            str(file), "--target", base, "--rate", "40", "--concurrency", "2",
            "--filter", "path:/sleep/?0",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(rows(result.stdout)) == 7  # /sleep/70 ... /sleep/10
    assert len(app.requests) == 7


def test_har_input(tmp_path: Path, capture: Callable[..., Path], serve_asgi: Serve) -> None:
    """A HAR (here exported from a capture, secrets redacted) replays like a trace file;
    it is recognised by its content, whatever its name."""
    from hopscope.tracing.har import traces_to_har

    har = tmp_path / "exported.json"
    har.write_text(json.dumps(traces_to_har(load(capture()))))
    with target(serve_asgi) as (base, app):
        result = replay(str(har), "--target", base, "--filter", "not path:/upload")
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert set(table) == {"/items", "/items/7?verbose=1", "/echo", "/status", "/files/a", "/whoami"}
    assert all(rest.endswith("same") for _, rest in table.values()), result.stdout
    assert "files/a b/ü%.txt" in {r["path"][1:] for r in app.requests}
    (whoami,) = app.to("/whoami")
    assert "authorization" not in whoami["headers"]
    assert "not sent (redacted in the capture): authorization" in details(result.stdout, "/whoami")


def test_timeout_is_a_failed_request(capture: Callable[..., Path], serve_asgi: Serve) -> None:
    file = capture(sleeps=True)
    with target(serve_asgi, slow=20) as (base, _):  # /sleep/70 now takes 1.4 s
        result = replay(
            str(file), "--target", base, "--timeout", "0.5", "--filter", "path:/sleep/70"
        )
    assert result.exit_code == 1, result.output
    assert rows(result.stdout)["/sleep/70"][1].endswith("ERROR")
    assert details(result.stdout, "/sleep/70") == ["error: timed out after 0.5s"]
    assert "0 same, 0 different, 1 failed" in result.stdout


# -- the pure parts -----------------------------------------------------------------------------


def test_redaction() -> None:
    pairs = [
        ("Authorization", "Bearer x"),
        ("cookie", "a=1"),
        ("X-CSRF-Token", "t"),
        ("x_client_secret", "s"),
        ("X-Upstream-ApiKey", "k"),
        ("Accept", "*/*"),
        ("accept", "text/html"),
    ]
    assert redact_headers(pairs) == [
        ("Authorization", REDACTED),
        ("cookie", REDACTED),
        ("X-CSRF-Token", REDACTED),
        ("x_client_secret", REDACTED),
        ("X-Upstream-ApiKey", REDACTED),
        ("Accept", "*/*"),
        ("accept", "text/html"),
    ]
    assert is_redacted("[REDACTED]") and is_redacted("Bearer [redacted]") and is_redacted("***")
    assert not is_redacted("Bearer abc")
    attrs = {"http.response.headers": [["Set-Cookie", "s=1"]], "x": 1}
    assert redact_attrs(attrs) == {"http.response.headers": [["Set-Cookie", REDACTED]], "x": 1}
    assert attrs["http.response.headers"] == [["Set-Cookie", "s=1"]]  # the input is kept


def test_replay_headers_drops_hop_by_hop_and_hopscope_headers() -> None:
    captured = [
        ("host", "old:80"), ("content-length", "3"), ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"), ("te", "trailers"), ("proxy-authorization", "p"),
        ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("x-request-start", "t=1"),
        ("x-forwarded-for", "1.2.3.4"), ("accept", "a"), ("accept", "b"),
        ("cookie", REDACTED), ("x-keep", "k"),
    ]  # fmt: skip
    headers, withheld = replay_headers(captured)
    assert headers == [("accept", "a"), ("accept", "b"), ("x-keep", "k")]
    assert withheld == ["cookie"]
    overrides = [("Accept", "c"), ("Cookie", "real"), ("New", "n")]
    headers, withheld = replay_headers(captured, overrides)
    assert headers == [("Accept", "c"), ("Cookie", "real"), ("x-keep", "k"), ("New", "n")]
    assert withheld == []


def test_json_diff_and_ignore_paths() -> None:
    old = {"a": 1, "b": [{"id": 1, "t": 5}, {"id": 2, "t": 6}], "c": True, "d": None}
    new = {"a": 1.0, "b": [{"id": 1, "t": 7}], "c": 1, "e": "x"}
    assert [str(c) for c in json_diff(old, new)] == [
        "b.0.t: 5 -> 7",
        'b.1: removed (was {"id":2,"t":6})',
        "c: true -> 1",
        "d: removed (was null)",
        'e: added "x"',
    ]
    ignore = [parse_ignore_path("b.*.t"), parse_ignore_path("/c"), parse_ignore_path("d")]
    assert [str(c) for c in json_diff(old, new, ignore)] == [
        'b.1: removed (was {"id":2,"t":6})',
        'e: added "x"',
    ]
    assert json_diff([1, {"x": [2]}], [1, {"x": [2]}]) == []
    assert [str(c) for c in json_diff(1, "1")] == ['(root): 1 -> "1"']
    with pytest.raises(ValueError):
        parse_ignore_path("a..b")


def test_header_diff_compares_only_captured_headers() -> None:
    old = [("Content-Type", "a/json"), ("Date", "d1"), ("X-A", "1"), ("Set-Cookie", REDACTED)]
    new = [("content-type", "a/json"), ("date", "d2"), ("x-b", "2"), ("set-cookie", "s")]
    assert header_diff(old, new) == ["x-a: removed (was '1')"]
    assert header_diff(old, new, ignore={"x-a"}) == []
    assert header_diff(old, [("content-type", "text/html"), ("x-a", "1")]) == [
        "content-type: 'a/json' -> 'text/html'"
    ]


def test_bodies_compared_decoded_and_truncated_by_prefix() -> None:
    import gzip

    doc = b'{"a": 1}'
    one, two = gzip.compress(doc, mtime=1), gzip.compress(doc, mtime=2)
    assert one != two and decode_content(one, "gzip") == doc
    assert decode_content(one[:-4], "gzip") is None
    assert decode_content(doc, "br") is None
    records = app_span(response_headers=[(b"content-encoding", b"gzip")], response_body=one)
    captured = captured_request(assemble(to_events_all(records))[0])
    assert captured is not None
    assert compare(captured, 200, [("content-encoding", "gzip")], two).same
    records = app_span(response_body=b"abcdef", response_extra={"http.response.body.size": 100})
    captured = captured_request(assemble(to_events_all(records))[0])
    assert captured is not None and captured.response_truncated
    assert compare(captured, 200, [], b"abcdef and more").same
    assert [str(d) for d in compare(captured, 200, [], b"abXdef").differences] == [
        "body: first 6 bytes (all the capture kept) differ at byte 2"
    ]


def test_captured_request_prefers_the_app_span_and_the_outer_status() -> None:
    """Through a proxy: the client span has the method, the app span the headers and body;
    the status is what the client got (here the proxy's 502 over the app's 200)."""
    records = app_span(parent=22, request_body=b"hi", response_body=b"ok")
    client = (
        "s", 1, 11, 21, 0, "client", "POST /x", 1,
        {"http.request.method": "POST", "url.path": "/x"},
    )  # fmt: skip
    proxy = ("s", 2, 11, 22, 21, "proxy", "POST /x", 1, {"http.request.method": "POST"})
    ends = [("e", 90, 11, 22, {}), ("e", 99, 11, 21, {"http.response.status_code": 502})]
    (trace,) = assemble(to_events_all([client, proxy, *records, *ends]))
    captured = captured_request(trace)
    assert captured is not None
    assert (captured.method, captured.path, captured.query) == ("POST", "/x", "a=1")
    assert captured.headers == [("content-type", "text/plain")]
    assert captured.body == b"hi" and not captured.truncated
    assert captured.status == 502
    assert captured.response_body == b"ok"
    assert captured.duration_ns == 98
    (user_only,) = assemble(to_events_all([("c", 1, 2, 5, 6, 0, "app", "job", 1, None)]))
    assert captured_request(user_only) is None


def app_span(
    *,
    parent: int = 0,
    request_body: bytes = b"",
    response_body: bytes = b"",
    response_headers: list[tuple[bytes, bytes]] | None = None,
    response_extra: dict[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    start = {
        "http.request.method": "POST",
        "url.path": "/x",
        "url.query": b"a=1",
        "http.request.headers": [(b"content-type", b"text/plain")],
    }
    end: dict[str, Any] = {
        "http.response.status_code": 200,
        "http.request.body": [request_body],
        "http.request.body.size": len(request_body),
        "http.response.body": [response_body],
        "http.response.headers": response_headers or [],
        **(response_extra or {}),
    }
    return [("s", 3, 11, 23, parent, "app", "POST /x", 1, start), ("e", 80, 11, 23, end)]


def to_events_all(records: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [event for record in records for event in to_events(record)]


def test_a_replay_where_every_selected_request_is_skipped_does_not_pass(
    capture: Callable[..., Path], serve_asgi: Serve
) -> None:
    """A gate that compared nothing must not pass (exit 0 said "all the same" before):
    the only request selected, an upload truncated at capture, is skipped."""
    file = capture()
    with target(serve_asgi) as (base, app):
        result = replay(str(file), "--target", base, "--filter", "path:/upload")
    assert result.exit_code == 2, result.output
    assert "0 request(s) replayed" in result.stdout
    assert "nothing was compared: every selected request was skipped" in result.stdout
    assert app.requests == []
