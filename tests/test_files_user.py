"""Saved traces used the way people use them: saved by a wrapped app's ``FileSink``,
opened with ``view``/``tail``, replayed against a real server, exported as HAR and
OTLP, and the same commands on damaged files and odd output paths.

Each test pins a bug found by doing so; the capture is a Starlette app under a real
uvicorn, driven by httpx, recorded once per module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from conftest import _uvicorn_thread
from hopscope.app.cli import main
from hopscope.tracing import FileSink, wrap
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

#: What a browser does on /page: the requests :func:`drive` makes, from JavaScript.
PAGE = """<script>
(async () => {
  const json = {"content-type": "application/json"};
  const send = async (url, options) => (await fetch(url, options)).text();  // bodies read
  await send("/echo", {method: "POST", headers: json, body: JSON.stringify({a: 1})});
  await send("/login", {method: "POST", headers: json, body: "{}"});
  await send("/moved");
  await send("/echo", {method: "PUT", body: "put"});
  const ws = new WebSocket(location.origin.replace("http", "ws") + "/ws");
  await new Promise((done) => {
    ws.onopen = () => ws.send("hi");
    ws.onmessage = () => { ws.close(); done(); };
  });
  document.title = "done";
})();
</script>"""


def make_app(version: int = 1) -> Starlette:
    """Version 2 answers /echo with another status, header and body."""

    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(
            body if version == 1 else body + b"!",
            status_code=200 if version == 1 else 202,
            headers={"x-version": str(version)},
            media_type=request.headers.get("content-type", "application/octet-stream"),
        )

    async def login(request: Request) -> Response:
        await request.json()
        return JSONResponse({"access_token": "tok-a-longer-s3cret", "user": "ann"})

    async def moved(request: Request) -> Response:
        return RedirectResponse("/echo?token=r3dir-s3cret&x=1")

    async def deny(request: Request) -> Response:
        return Response(b"denied", status_code=401)  # before reading the upload

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            for number in range(3):
                yield f"data: {number}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def forever(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            number = 0
            while True:  # until the client hangs up
                yield f"data: {version}-{number}\n\n".encode()
                number += 1
                await asyncio.sleep(0.01)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST", "PUT"]),
            Route("/login", login, methods=["POST"]),
            Route("/moved", moved),
            Route("/page", page),
            Route("/deny", deny, methods=["POST"]),
            Route("/events", events),
            Route("/forever", forever),
            WebSocketRoute("/ws", ws),
        ]
    )


def drive(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        assert client.post("/echo", json={"a": 1}).status_code == 200
        assert client.post("/echo", content=bytes(range(256))).status_code == 200
        assert client.post("/login", json={"user": "ann"}).status_code == 200
        assert client.get("/moved").status_code == 307
        assert client.put("/echo", content=b"put").status_code == 200
        assert client.get("/events").text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    import websockets.sync.client

    with websockets.sync.client.connect(base.replace("http", "ws", 1) + "/ws") as socket:
        socket.send("hi")
        assert socket.recv(timeout=5) == "hi"


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trace file of :func:`drive`'s traffic to version 1, as a ``FileSink`` saves it."""
    path = tmp_path_factory.mktemp("capture") / "capture.jsonl"
    sink = FileSink(path)
    with _uvicorn_thread(wrap(make_app(1), sink=sink, body_limit=1024)) as base:
        drive(base)
    sink.close()
    return path


@contextlib.contextmanager
def served(version: int) -> Iterator[str]:
    with _uvicorn_thread(make_app(version)) as base:
        yield base


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result: Result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@contextlib.contextmanager
def fifo_reader(path: Path) -> Iterator[list[bytes]]:
    """A FIFO at ``path`` whose reader collects what is written into it."""
    os.mkfifo(path, 0o644)
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as handle:
            got.append(handle.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        for _ in range(200):  # a reader waiting for a writer: be one (10 s at most)
            if not thread.is_alive():
                break
            with contextlib.suppress(OSError):  # ENXIO: the reader is gone meanwhile
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(0.05)


# -- output files that are not plain files ---------------------------------------------------


def test_export_into_a_fifo_writes_through_it_and_keeps_it(capture: Path, tmp_path: Path) -> None:
    """``--har /dev/stdout`` (or /dev/null) used to be replaced by a regular file: as
    root, /dev/null became a 0600 file for the whole machine."""
    out = tmp_path / "pipe"
    with fifo_reader(out) as got:
        result = run("export", str(capture), "--har", str(out))
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(out.lstat().st_mode)
    assert stat.S_IMODE(out.lstat().st_mode) == 0o644
    assert json.loads(got[0])["log"]["entries"]


def test_export_through_a_symlink_replaces_its_target(capture: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    result = run("export", str(capture), "--otlp", str(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert json.loads(real.read_text())["resourceSpans"]


def test_a_file_sink_on_a_fifo_leaves_its_mode(tmp_path: Path) -> None:
    """The writer made every file it opened 0600, devices and FIFOs included (``-o
    /dev/null`` changed /dev/null's mode for every user of the machine)."""
    out = tmp_path / "pipe"
    with fifo_reader(out) as got:
        sink = FileSink(out)
        sink.emit(("s", 1_000, 7, 9, 0, "app", "GET /", 1, {"http.request.method": "GET"}))
        sink.emit(("e", 2_000, 7, 9, {"http.response.status_code": 200}))
        sink.close()
    assert stat.S_IMODE(out.lstat().st_mode) == 0o644
    assert got[0].startswith(b'{"format":"hopscope"')
    assert b'"span_end"' in got[0]


# -- HAR export: secrets and WebSockets --------------------------------------------------------


def har_of(capture: Path, *options: str) -> dict[str, Any]:
    result = run("export", str(capture), "--har", "-", *options)
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def entry(document: dict[str, Any], path: str) -> dict[str, Any]:
    (found,) = (
        e for e in document["log"]["entries"] if e["request"]["url"].split("?")[0].endswith(path)
    )
    return found


def test_har_export_redacts_a_json_response_secret_and_a_redirect_url(capture: Path) -> None:
    """A login's ``{"access_token": ...}`` and a Location's ``?token=`` went out as they
    were: the response body was never redacted, and ``redirectURL`` took the raw
    Location while the header beside it was redacted."""
    document = har_of(capture)
    text = json.dumps(document)
    assert "s3cret" not in text
    login = json.loads(entry(document, "/login")["response"]["content"]["text"])
    assert login == {"access_token": "[redacted]", "user": "ann"}
    assert "token=%5Bredacted%5D&x=1" in entry(document, "/moved")["response"]["redirectURL"]
    kept = json.dumps(har_of(capture, "--no-redact"))
    assert "tok-a-longer-s3cret" in kept and "r3dir-s3cret" in kept


def test_a_websocket_exports_as_101_and_replays_as_skipped(capture: Path, tmp_path: Path) -> None:
    """An app span's WebSocket has no status code: its HAR entry said status 0, which
    HAR viewers show as a failed request, and a replay of that HAR called it "no
    response at capture" rather than a WebSocket."""
    ws = entry(har_of(capture), "/ws")
    assert ws["response"]["status"] == 101
    assert ws["response"]["statusText"] == "Switching Protocols"
    har = tmp_path / "capture.har"
    assert run("export", str(capture), "--har", str(har)).exit_code == 0
    with served(1) as base:
        result = run("replay", str(har), "--target", base)
    assert result.exit_code == 0, result.output
    (row,) = (line for line in result.stdout.splitlines() if " /ws " in line)
    assert row.endswith("skipped: a WebSocket: not replayable")


def test_replay_of_a_redacted_har_compares_all_but_the_hidden_values(
    capture: Path, tmp_path: Path
) -> None:
    """The redacted ``access_token`` must not read as a difference (the capture does not
    know it any more), nor its new length as a body cut at capture; and the Location
    whose ``token`` was redacted not as a changed header.  Real changes still show:
    status, header and body."""
    har = tmp_path / "capture.har"
    assert run("export", str(capture), "--har", str(har)).exit_code == 0
    with served(1) as base:
        same = run("replay", str(har), "--target", base)
    assert same.exit_code == 0, same.output
    assert "6 same, 0 different" in same.stdout
    with served(2) as base:
        changed = run("replay", str(har), "--target", base, "--keep-order")
    assert changed.exit_code == 1
    assert "access_token" not in changed.stdout
    assert "status: 200 -> 202" in changed.stdout
    assert "header x-version: '1' -> '2'" in changed.stdout
    assert "body: 3 -> 4 bytes, first difference at byte 3: '' -> '!'" in changed.stdout
    assert "3 same, 3 different" in changed.stdout


# -- files people have at hand -----------------------------------------------------------------

COMMANDS = [
    ["view", "--headless"],
    ["tail"],
    ["export", "--har", "-"],
    ["export", "--otlp", "-"],
    ["replay", "--target", "http://127.0.0.1:9"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_gzipped_trace_or_har_is_named_as_such(
    capture: Path, tmp_path: Path, command: list[str]
) -> None:
    """``gzip t.jsonl`` then ``hopscope view t.jsonl.gz`` said "not a hopscope trace
    file" (export: "not a HAR file"), which sends people looking for another bug."""
    import gzip

    har = tmp_path / "t.har"
    assert run("export", str(capture), "--har", str(har)).exit_code == 0
    for source in (capture, har):
        packed = tmp_path / (source.name + ".gz")
        packed.write_bytes(gzip.compress(source.read_bytes()))
        result = run(command[0], str(packed), *command[1:])
        assert one_line_error(result) == f"Error: {packed} is gzip-compressed: gunzip it first\n"


def damaged_copy(capture: Path, tmp_path: Path) -> Path:
    """The capture with a garbled line in the middle and its last line cut (a writer
    killed mid-write)."""
    lines = capture.read_bytes().splitlines(keepends=True)
    lines.insert(3, b'{"kind": "span_end", garbage\n')
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(b"".join(lines))
    return damaged


def test_replay_of_a_damaged_capture_replays_what_is_readable(
    capture: Path, tmp_path: Path
) -> None:
    """Replay refused a file with one bad line or a cut last line outright (exit 2), so
    a capture whose writer was killed could not be replayed at all; it now replays
    every request read, says what was skipped, and never exits 0 for it."""
    damaged = damaged_copy(capture, tmp_path)
    with served(1) as base:
        result = run("replay", str(damaged), "--target", base)
    assert result.exit_code == 1, result.output
    assert "6 same, 0 different" in result.stdout
    last = result.stdout.splitlines()[-1]
    assert last.startswith(f"damaged capture, only what could be read was replayed: {damaged}: ")
    # (the last line of a capture is a summary: cut, it loses nothing; the other does)
    assert "skipped 1 malformed line(s); the last line, a summary, was cut off" in last


def test_tail_reads_a_har_as_view_does(capture: Path, tmp_path: Path) -> None:
    """``hopscope view --headless x.har`` printed its requests but ``hopscope tail
    x.har`` said "not a hopscope trace file"."""
    har = tmp_path / "t.har"
    assert run("export", str(capture), "--har", str(har)).exit_code == 0
    for source in (har, Path(__file__).parent / "data" / "chrome.har"):
        tail = run("tail", str(source))
        assert tail.exit_code == 0, tail.output
        assert tail.stdout == run("view", "--headless", str(source)).stdout
        assert len(tail.stdout.splitlines()) in (4, 7)
    assert " POST /login 200 " in run("tail", str(har)).stdout


def test_replay_of_a_har_saved_by_a_real_browser(tmp_path: Path) -> None:
    """Chromium's HAR marks a WebSocket only by its ``ws://`` URL and status 101: replay
    sent it as a plain ``GET /ws`` and reported the server's refusal as a change."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright is not installed (pip install playwright, and a Chromium)")
    from playwright.sync_api import Error, sync_playwright

    har = tmp_path / "browser.har"
    try:
        with served(1) as base, sync_playwright() as playwright:
            system = shutil.which("chromium") or shutil.which("chromium-browser")
            browser = playwright.chromium.launch(executable_path=system)
            context = browser.new_context(record_har_path=str(har), record_har_content="embed")
            context.new_page().goto(base + "/page")
            context.pages[0].wait_for_function("document.title === 'done'", timeout=10_000)
            context.close()
            browser.close()
    except Error as exc:
        pytest.skip(f"Chromium cannot run here: {str(exc).splitlines()[0]}")
    with served(1) as base:
        same = run("replay", str(har), "--target", base, "--keep-order")
    assert same.exit_code == 0, same.output
    (row,) = (line for line in same.stdout.splitlines() if " /ws " in line)
    assert row.endswith("skipped: a WebSocket: not replayable")
    with served(2) as base:
        changed = run("replay", str(har), "--target", base, "--keep-order")
    assert changed.exit_code == 1
    assert changed.stdout.count("status: 200 -> 202") == 3  # POST, the redirect's GET, PUT
    assert "header x-version: '1' -> '2'" in changed.stdout


def test_a_body_the_app_never_read_is_not_resent_empty(tmp_path: Path) -> None:
    """An app that answers before reading the upload leaves a capture with no body, yet
    the request had one (its Content-Length says so): replay, copy as curl and the HAR
    all sent or showed an empty body as if it were the request's."""
    path = tmp_path / "deny.jsonl"
    sink = FileSink(path)
    with _uvicorn_thread(wrap(make_app(1), sink=sink)) as base:
        assert httpx.post(base + "/deny", content=b"ten bytes!").status_code == 401
    sink.close()
    with served(1) as base:
        result = run("replay", str(path), "--target", base)
    # (Its only request skipped: nothing compared, which a gate must not take for a pass.)
    assert result.exit_code == 2, result.output
    assert "skipped: request body truncated at capture (0 of 10 bytes kept)" in result.stdout
    curl = run("export", str(path), "--curl", "1").stdout
    assert "# the body (10 bytes) was not captured" in curl
    post = har_of(path)["log"]["entries"][0]["request"]["postData"]
    assert post["comment"] == "hopscope did not capture this body of 10 bytes"


def test_a_har_saved_without_bodies_does_not_read_as_every_body_changed(
    capture: Path, tmp_path: Path
) -> None:
    """Browsers can save a HAR without response bodies (only ``content.size``): replay
    took each missing body for an empty one and reported every response as changed."""
    document = har_of(capture)
    for item in document["log"]["entries"]:
        item["response"]["content"].pop("text", None)
        item["response"]["content"].pop("encoding", None)
    har = tmp_path / "no-bodies.har"
    har.write_text(json.dumps(document))
    with served(1) as base:
        same = run("replay", str(har), "--target", base, "--keep-order")
    assert same.exit_code == 0, same.output
    assert "    body: " not in same.stdout
    assert "note: the capture holds no response body: bodies not compared" in same.stdout
    with served(2) as base:
        changed = run("replay", str(har), "--target", base)
    assert changed.exit_code == 1 and "status: 200 -> 202" in changed.stdout
    assert "    body: " not in changed.stdout


def test_a_path_that_was_not_utf8_is_said_to_be_sent_changed(tmp_path: Path) -> None:
    """The server decodes the path as UTF-8 and records U+FFFD for other bytes: replay
    sends that instead of the original bytes, and a row that differs for this reason
    alone must say so."""
    path = tmp_path / "odd.jsonl"
    sink = FileSink(path)
    with _uvicorn_thread(wrap(make_app(1), sink=sink)) as base:
        assert httpx.get(base + "/echo%FF").status_code == 404
    sink.close()
    with served(1) as base:
        result = run("replay", str(path), "--target", base)
    assert result.exit_code == 0, result.output
    note = "note: the captured path had bytes that are not UTF-8 (recorded as U+FFFD, sent so)"
    assert note in result.stdout


@contextlib.contextmanager
def fifo_writer(path: Path, data: bytes) -> Iterator[Path]:
    """A FIFO at ``path`` that gives ``data`` once, as ``<(zcat t.jsonl.gz)`` does: a
    reader opening it again gets nothing (end of file), as from a reopened pipe."""
    os.mkfifo(path)
    stop = threading.Event()

    def write() -> None:
        with contextlib.suppress(BrokenPipeError):
            with open(path, "wb") as handle:
                handle.write(data)
            while not stop.is_set():
                with open(path, "wb"):
                    pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        for _ in range(200):  # a writer waiting for a reader: be one (10 s at most)
            if not thread.is_alive():
                break
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            thread.join(0.05)
            os.close(fd)
        path.unlink()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_trace_file_read_from_a_pipe(capture: Path, tmp_path: Path, command: list[str]) -> None:
    """``hopscope tail <(zcat t.jsonl.gz)`` ended in a traceback (``tell()`` on a pipe),
    and the commands that peek at the first line to tell a trace file from a HAR lost
    it before reading the rest ("not a hopscope trace file")."""
    data = capture.read_bytes()
    with contextlib.ExitStack() as stack:
        if command[0] == "replay":
            command = [*command[:-1], stack.enter_context(served(1))]
        pipe = stack.enter_context(fifo_writer(tmp_path / "pipe", data))
        result = run(command[0], str(pipe), *command[1:])
    assert result.exit_code == 0, result.output
    assert "Error" not in result.output
    if command[0] in ("tail", "view"):
        assert len(result.stdout.splitlines()) == 7
    if command[0] == "replay":
        assert "6 same, 0 different; 1 skipped" in result.stdout


def test_an_untrusted_tls_target_is_one_plain_line(
    capture: Path, certificate: tuple[Path, Path]
) -> None:
    """A target with a self-signed certificate ended the replay with OpenSSL's own text,
    ``[SSL: CERTIFICATE_VERIFY_FAILED] ... (_ssl.c:1006)``."""
    import socket
    import ssl

    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve_one() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as connection:
            context.wrap_socket(connection, server_side=True).close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    try:
        result = run("replay", str(capture), "--target", url)
    finally:
        thread.join(10)
        listener.close()
    assert result.exit_code == 2
    reason = "TLS certificate verify failed: self-signed certificate"
    assert one_line_error(result) == f"Error: cannot reach {url}: {reason}\n"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_har_saved_with_a_byte_order_mark(
    capture: Path, tmp_path: Path, command: list[str]
) -> None:
    """Windows tools save HAR files with a UTF-8 BOM; the HAR reader takes them, but
    replay's look at the first line did not see the ``{`` behind the BOM and called the
    file "not a hopscope trace file"."""
    har = tmp_path / "t.har"
    har.write_bytes(b"\xef\xbb\xbf" + json.dumps(har_of(capture)).encode())
    with contextlib.ExitStack() as stack:
        if command[0] == "replay":
            command = [*command[:-1], stack.enter_context(served(1))]
        result = run(command[0], str(har), *command[1:])
    assert result.exit_code == 0, result.output


def test_websocket_and_sse_traces_export_as_valid_har_and_otlp(capture: Path) -> None:
    """A WebSocket and a server-sent-event stream, exported both ways: a HAR that meets
    the HAR 1.2 schema, and OTLP JSON that the OpenTelemetry protobuf types accept."""
    import base64

    from google.protobuf.json_format import ParseDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from test_har import assert_valid_har

    document = har_of(capture)
    assert_valid_har(document)
    sse = entry(document, "/events")["response"]["content"]
    assert sse["mimeType"].startswith("text/event-stream") and sse["text"].count("data:") == 3
    result = run("export", str(capture), "--otlp", "-")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    for resource in payload["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for item in scope["spans"]:  # OTLP JSON ids are hex, protobuf's JSON base64
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in item:
                        item[key] = base64.b64encode(bytes.fromhex(item[key])).decode()
    message = ParseDict(payload, ExportTraceServiceRequest())
    spans = {s.name: s for r in message.resource_spans for ss in r.scope_spans for s in ss.spans}
    assert {"WS /ws", "GET /events"} <= set(spans)
    ws = {a.key: a.value for a in spans["WS /ws"].attributes}
    assert ws["network.protocol.name"].string_value == "websocket"


def test_replay_of_an_endless_stream_the_client_left_ends(tmp_path: Path) -> None:
    """A client that read a few events of an endless event stream and hung up: replay
    read the new stream to its end, which never comes, and hung (a read timeout never
    fires while events keep coming)."""
    import subprocess
    import sys

    path = tmp_path / "stream.jsonl"
    sink = FileSink(path)
    with _uvicorn_thread(wrap(make_app(1), sink=sink)) as base:
        with httpx.Client() as client, client.stream("GET", base + "/forever") as response:
            lines = response.iter_lines()
            assert [next(lines) for _ in range(6)][-2:] == ["data: 1-2", ""]
        deadline = time.monotonic() + 10  # the request ends when the server sees it left
        while b'"disconnected":true' not in path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
    sink.close()

    def replay(url: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "hopscope.app", "replay", str(path), "--target", url]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    with served(2) as base, served(1) as same:
        results = [replay(same), replay(base)]
    assert results[0].returncode == 0, results[0].stdout + results[0].stderr
    assert "1 same, 0 different" in results[0].stdout
    assert results[1].returncode == 1
    assert "(all the capture kept) differ at byte 6" in results[1].stdout


def test_secret_form_fields_are_redacted_and_a_redacted_har_still_replays(
    tmp_path: Path,
) -> None:
    """A multipart form's ``password`` went out as it was (only urlencoded forms and
    JSON were searched); and a body whose secret was redacted into a shorter one read,
    back from the HAR, as cut at capture (its size was the original's), so replay
    skipped it."""
    path = tmp_path / "forms.jsonl"
    sink = FileSink(path)
    with _uvicorn_thread(wrap(make_app(1), sink=sink)) as base:
        form = {"user": "ann", "password": "a-long-form-s3cret"}
        files = {"f": ("a.txt", b"file body")}
        assert httpx.post(base + "/echo", data=form, files=files).status_code == 200
        secret = {"password": "a-long-json-s3cret"}
        assert httpx.post(base + "/echo", json=secret).status_code == 200
    sink.close()
    document = har_of(path)
    text = json.dumps(document)
    assert "s3cret" not in text and "file body" in text and "ann" in text
    for number in ("1", "2"):
        curl = run("export", str(path), "--curl", number).stdout
        assert "s3cret" not in curl and "# secret fields in the body are redacted" in curl
    har = tmp_path / "forms.har"
    har.write_text(json.dumps(document))
    with served(1) as base:
        result = run("replay", str(har), "--target", base)
    assert result.exit_code == 0, result.output
    assert "2 same, 0 different" in result.stdout
    assert result.stdout.count("note: the captured body holds redacted values") == 2


@pytest.mark.parametrize(
    ("base_url", "error"),
    [
        ("notaurl", "--base-url must look like http://HOST:PORT, got 'notaurl'"),
        ("http://[::1", "--base-url must look like http://HOST:PORT, got 'http://[::1'"),
        ("http://h:port", "--base-url must look like http://HOST:PORT, got 'http://h:port'"),
        ("http://h?a=1", "--base-url cannot have a query or fragment, got 'http://h?a=1'"),
    ],
    ids=["no-scheme", "ipv6-unclosed", "port-not-a-number", "query"],
)
def test_a_bad_base_url_is_one_line(capture: Path, base_url: str, error: str) -> None:
    """``--base-url`` went into the copied command unchecked: ``curl notaurl/echo``
    asks the host ``notaurl``; with ``--har`` it was silently ignored."""
    result = run("export", str(capture), "--curl", "1", "--base-url", base_url)
    assert one_line_error(result) == f"Error: {error}\n"
    ignored = run("export", str(capture), "--har", "-", "--base-url", "http://h:1")
    assert one_line_error(ignored) == "Error: --base-url goes with --curl, --httpie or --httpx\n"


def test_the_ui_reads_a_trace_file_from_a_pipe(capture: Path, tmp_path: Path) -> None:
    """``hopscope view <(cat t.jsonl)`` in the UI showed "Illegal seek" and no request:
    its fast path (the summary scan) opens the file twice and seeks in it; a pipe is
    now read once, front to back, its events folded."""
    from hopscope.app.ui import build_view_app

    messages: list[str] = []
    with fifo_writer(tmp_path / "pipe", capture.read_bytes()) as pipe:
        session = build_view_app(str(pipe))
        app = session.app

        async def main() -> None:
            async with app.run_test(size=(120, 35)) as pilot:
                for _ in range(400):  # 20 s at most
                    messages[:] = [n.message for n in app._notifications]
                    if any("read" in m or "Error" in m or "seek" in m for m in messages):
                        break
                    await pilot.pause(0.05)
                await pilot.pause(0.1)

        try:
            asyncio.run(main())
        finally:
            session.close()
    assert not any("seek" in message for message in messages), messages
    assert any(message.startswith("pipe: read ") for message in messages), messages
    assert len(app.store) == 7


def test_two_trace_files_concatenated_read_as_one(capture: Path, tmp_path: Path) -> None:
    """``cat a.jsonl b.jsonl > both.jsonl``: the second header line was a "malformed
    line", so replay exited 1 and ``load()`` warned; it is a header, skipped."""
    import warnings

    from hopscope.tracing import load

    both = tmp_path / "both.jsonl"
    both.write_bytes(capture.read_bytes() * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load(both)) == 7  # the same trace ids twice: one trace each
    with served(1) as base:
        result = run("replay", str(both), "--target", base)
    assert result.exit_code == 0, result.output
    assert "damaged" not in result.stdout
    tail = run("tail", str(both))
    assert tail.exit_code == 0 and tail.stderr == "", tail.output


def test_a_cut_off_summary_line_loses_no_request(capture: Path, tmp_path: Path) -> None:
    """A file whose cut-off last line is a summary (every event before it intact) made
    replay exit 1 as if requests were lost: it now warns and exits 0."""
    lines = capture.read_bytes().splitlines(keepends=True)
    assert lines[-1].startswith(b'{"kind":"summary",')
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    with served(1) as base:
        result = run("replay", str(cut), "--target", base)
    assert result.exit_code == 0, result.output
    assert "6 same, 0 different" in result.stdout
    last = result.stdout.splitlines()[-1]
    assert last == f"warning: {cut}: the last line, a summary, was cut off (no event lost)"
    tail = run("tail", str(cut))
    assert tail.exit_code == 0
    assert "(no event lost)" in tail.stderr and "malformed" not in tail.stderr


def test_replay_to_a_self_signed_https_target_with_insecure(
    capture: Path, certificate: tuple[Path, Path]
) -> None:
    """``hopscope replay FILE --target https://...`` had no ``--insecure`` (``hopscope
    proxy`` has) for a development server's self-signed certificate."""
    cert, key = certificate
    with _uvicorn_thread(make_app(1), ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        refused = run("replay", str(capture), "--target", url)
        result = run("replay", str(capture), "--target", url, "--insecure")
    assert "self-signed certificate" in one_line_error(refused)
    assert result.exit_code == 0, result.output
    assert "6 same, 0 different; 1 skipped" in result.stdout


@pytest.mark.parametrize(
    "command",
    [["tail"], ["view", "--headless"], ["export", "--har", "-"], ["export", "--curl", "1"]],
    ids=lambda c: " ".join(c[:2]),
)
def test_an_ascii_only_stdout_gets_escapes_not_a_crash(tmp_path: Path, command: list[str]) -> None:
    """With ``PYTHONIOENCODING=ascii`` (a C locale, some CI), printing a path the server
    recorded with U+FFFD crashed with UnicodeEncodeError; it is printed escaped."""
    import subprocess
    import sys

    path = tmp_path / "odd.jsonl"
    sink = FileSink(path)
    with _uvicorn_thread(wrap(make_app(1), sink=sink)) as base:
        assert httpx.get(base + "/echo%FF").status_code == 404
    sink.close()
    script = "from hopscope.app.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script, command[0], str(path), *command[1:]],
        capture_output=True, timeout=60, env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr
    assert b"/echo\\ufffd" in result.stdout
    if command[0] == "export" and command[1] == "--har":
        document = json.loads(result.stdout)  # the escapes are JSON's own
        (entry,) = document["log"]["entries"]
        assert entry["request"]["url"].endswith("/echo\ufffd")
