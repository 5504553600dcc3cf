"""OpenTelemetry on the live commands: ``watch --otlp-listen`` takes spans from an app
instrumented with the OpenTelemetry SDK, ``--otlp URL`` forwards finished traces to an
OTLP/HTTP receiver, and ``--server-timing`` adds the hops' durations to responses.

Real processes on 127.0.0.1, each bounded by timeouts."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hopscope.app.otlp_receiver import OtlpReceiver
from hopscope.tracing import wrap
from hopscope.tracing.sinks import SocketSink

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_line(stream: Any, needle: str, timeout: float = 20.0) -> str:
    """The first line of ``stream`` (a pipe) containing ``needle``."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not select.select([stream], [], [], 0.2)[0]:
            continue
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return str(line)
    raise AssertionError(f"no {needle!r} in {seen!r}")


def _hopscope(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hopscope.app", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A tiny OTLP/HTTP receiver on uvicorn: its URL and the events it got."""
    got: list[dict[str, Any]] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(OtlpReceiver(got.extend), lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}", got
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_watch_takes_spans_from_an_opentelemetry_sdk_app() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    otlp_port = _free_port()
    proc = _hopscope(
        "watch", "--headless", "--listen", f"127.0.0.1:{_free_port()}",
        "--otlp-listen", f"127.0.0.1:{otlp_port}",
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = _read_line(proc.stderr, "listening on")
        assert f"OTLP/HTTP on http://127.0.0.1:{otlp_port}/v1/traces" in line
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{otlp_port}/v1/traces")
        provider = TracerProvider(resource=Resource.create({"service.name": "otel-shop"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")
        attributes = {"http.request.method": "GET", "url.path": "/otel-cart"}
        with tracer.start_as_current_span("GET /otel-cart", kind=SpanKind.SERVER) as span:
            span.set_attribute("http.response.status_code", 200)
            for name, value in attributes.items():
                span.set_attribute(name, value)
        provider.force_flush(10)
        provider.shutdown()
        assert proc.stdout is not None
        printed = _read_line(proc.stdout, "/otel-cart")
    finally:
        _, err = _stop(proc)
    assert "GET /otel-cart" in printed
    assert "200" in printed
    assert "Traceback" not in err


def test_otlp_listen_port_in_use_is_one_line_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _hopscope(
            "watch", "--headless", "--listen", f"127.0.0.1:{_free_port()}",
            "--otlp-listen", f"127.0.0.1:{port}",
        )  # fmt: skip
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "address already in use" in err
    assert len(err.strip().splitlines()) == 1


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def test_watch_forwards_finished_traces_to_an_otlp_receiver(
    receiver: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, got = receiver
    port = _free_port()
    saved = tmp_path / "saved.jsonl"
    proc = _hopscope(
        "watch", "--headless", "--listen", f"127.0.0.1:{port}", "-o", str(saved), "--otlp", url
    )
    try:
        assert proc.stderr is not None
        _read_line(proc.stderr, "listening on")
        sink = SocketSink(f"tcp://127.0.0.1:{port}")
        app = wrap(_hello, sink=sink)
        transport = httpx.ASGITransport(app=app)

        async def requests() -> None:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for index in range(3):
                    assert (await client.get(f"/item/{index}")).status_code == 200

        import asyncio

        asyncio.run(requests())
        sink.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            starts = [e for e in got if e.get("kind") == "span_start"]
            if len({e["trace_id"] for e in starts}) >= 3:
                break
            time.sleep(0.1)
    finally:
        _, err = _stop(proc)
    sent = {e["trace_id"] for e in got if e.get("kind") == "span_start"}
    recorded = set()
    for line in saved.read_text().splitlines()[1:]:
        event = json.loads(line)
        if event.get("kind") == "span_start":
            recorded.add(event["trace_id"])
    assert len(recorded) == 3
    assert sent == recorded
    assert "OTLP: " in err and "span(s) sent" in err


def test_an_unreachable_otlp_url_is_a_warning_not_fatal() -> None:
    port = _free_port()
    proc = _hopscope(
        "watch", "--headless", "--listen", f"127.0.0.1:{port}",
        "--otlp", f"http://127.0.0.1:{_free_port()}",
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        _read_line(proc.stderr, "listening on")
        sink = SocketSink(f"tcp://127.0.0.1:{port}")
        app = wrap(_hello, sink=sink)

        async def one() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                await client.get("/down")

        import asyncio

        asyncio.run(one())
        sink.close()
        assert proc.stdout is not None
        _read_line(proc.stdout, "/down")
        warning = _read_line(proc.stderr, "OTLP export failing")
        assert proc.poll() is None
    finally:
        _stop(proc)
    assert "cannot send" in warning


def test_a_bad_otlp_url_is_a_usage_error() -> None:
    proc = _hopscope("watch", "--headless", "--otlp", "localhost:4318")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "not an http://" in err


APP = textwrap.dedent(
    """
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    """
)


@pytest.mark.parametrize("flag", [True, False])
def test_run_server_timing(tmp_path: Path, flag: bool) -> None:
    (tmp_path / "timed.py").write_text(APP)
    args = ["run", "timed:app", "--app-dir", str(tmp_path), "--port", "0", "--headless"]
    if flag:
        args.append("--server-timing")
    proc = _hopscope(*args)
    try:
        assert proc.stderr is not None
        line = _read_line(proc.stderr, "open http://", timeout=30)
        base = line.rsplit("open ", 1)[1].split()[0]
        response = httpx.get(base + "/", timeout=10)
    finally:
        _stop(proc)
    assert response.status_code == 200
    timing = response.headers.get("server-timing")
    if flag:
        assert timing is not None
        assert "server;dur=" in timing
        assert "proxy;dur=" in timing
    else:
        assert timing is None


def test_watch_ui_session_relays_otlp_in_and_out(
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    """Under the UI the OTLP listener runs in the collector's child process and the
    sender beside the UI: a span posted in comes out at the receiver."""
    from hopscope.app.ui import build_watch_app

    url, got = receiver
    otlp_port = _free_port()
    session = build_watch_app("127.0.0.1:0", otlp=url, otlp_listen=f"127.0.0.1:{otlp_port}")
    try:
        now = time.time_ns()
        trace_id = "5b8efff798038103d269b633813fc60c"
        span = {
            "traceId": trace_id, "spanId": "eee19b7ec3c1b174", "name": "GET /ui-otel",
            "kind": 2, "startTimeUnixNano": str(now), "endTimeUnixNano": str(now + 1_000_000),
            "attributes": [{"key": "http.request.method", "value": {"stringValue": "GET"}}],
        }  # fmt: skip
        payload = {"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": [span]}]}]}
        answer = httpx.post(f"http://127.0.0.1:{otlp_port}/v1/traces", json=payload, timeout=10)
        assert answer.status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not got:
            time.sleep(0.1)
    finally:
        session.close()
    assert {e["trace_id"] for e in got if e.get("kind") == "span_start"} == {trace_id}


def test_demo_sends_every_hop_to_otlp_and_adds_server_timing(
    receiver: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, got = receiver
    port = _free_port()
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "demo", "--headless", "--requests", "3",
         "--port", str(port), "--otlp", url, "--server-timing"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "OTLP:" in done.stderr
    hops = {e["hop"] for e in got if e.get("kind") == "span_start"}
    assert {"client", "proxy", "server", "app"} <= hops
