"""The collection side used the way a team uses it: apps that outlive their collector,
peers that send garbage, OTLP backends that are slow, OpenTelemetry SDK apps that send
links and malformed bodies.  Real processes and sockets on 127.0.0.1, bounded waits."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from hopscope.app.collector import BackgroundCollector
from hopscope.app.otlp_sender import OtlpSender
from hopscope.tracing import SocketSink
from hopscope.tracing.model import assemble
from hopscope.tracing.otlp import OtlpError, otlp_to_events
from hopscope.tracing.records import new_span_id, new_trace_id
from hopscope.tracing.sinks import WIRE_MAGIC
from test_otlp_live import _hopscope

EXPORTER = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None


def _record(name: str) -> tuple[Any, ...]:
    now = time.time_ns()
    return ("c", now, now + 1000, new_trace_id(), new_span_id(), 0, "app", name, 1, {})


class Names:
    """A collector consumer that keeps the names of the spans it saw."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.dropped = 0
        self._cond = threading.Condition()

    def __call__(self, events: list[dict[str, Any]]) -> None:
        with self._cond:
            for event in events:
                if event["kind"] == "span_start":
                    self.names.append(event["name"])
                elif event["kind"] == "dropped":
                    self.dropped += event["count"]
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.names) < count and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return list(self.names)


# -- an app outlives its collector -------------------------------------------------------


def test_records_sent_after_the_collector_restarted_all_arrive(
    free_port: Callable[[], int],
) -> None:
    """The old connection is closed by the stopped collector: a frame written into it
    used to vanish (no error for the first write after the peer closed) and the next
    one failed and was counted as dropped, though the new collector listened all along."""
    address = f"127.0.0.1:{free_port()}"
    sink = SocketSink(f"tcp://{address}", interval=0.01)
    try:
        first = Names()
        with BackgroundCollector(address, first):
            sink.emit(_record("before"))
            assert first.wait_for(1) == ["before"]
        second = Names()
        with BackgroundCollector(address, second):
            for n in range(5):
                sink.emit(_record(f"after{n}"))
                time.sleep(0.03)  # one frame each, as an app idling between requests
            sink.flush()
            assert second.wait_for(5) == [f"after{n}" for n in range(5)]
        assert second.dropped == 0
        assert sink.dropped == 0
    finally:
        sink.close()


# -- the live collector command ----------------------------------------------------------


def _wait_listening(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line:
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the collector did not start: {proc.communicate()}")


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out, err


@pytest.fixture
def live(free_port: Callable[[], int]) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    port, otlp_port = free_port(), free_port()
    proc = _hopscope(
        "watch", "--headless", "--listen", f"127.0.0.1:{port}",
        "--otlp-listen", f"127.0.0.1:{otlp_port}",
    )  # fmt: skip
    try:
        _wait_listening(proc)
        yield proc, port, f"http://127.0.0.1:{otlp_port}/v1/traces"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _send_raw(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)


def test_garbage_and_half_frames_are_said_once_and_the_collector_carries_on(
    live: tuple[subprocess.Popen[str], int, str],
) -> None:
    proc, port, otlp_url = live
    _send_raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _send_raw(port, WIRE_MAGIC + struct.pack("!I", 100) + b"half a frame")
    _send_raw(port, WIRE_MAGIC + struct.pack("!I", 5) + b"\xff\xff\xff\xff\xff")
    for _ in range(5):
        _send_raw(port, b"\x00\xff" * 64)
    otlp_port = int(otlp_url.split(":")[2].split("/")[0])
    for _ in range(3):  # and not HTTP to the OTLP/HTTP port
        _send_raw(otlp_port, b"\x00\xffgarbage\r\n\r\n")
    sink = SocketSink(f"tcp://127.0.0.1:{port}")
    try:
        sink.emit(_record("GET /still-here"))
        sink.flush()
    finally:
        sink.close()
    # The app's request is printed once it arrived (the process is still up).
    assert proc.stdout is not None
    line = ""
    deadline = time.monotonic() + 15
    while "/still-here" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "GET /still-here" in line
    assert proc.poll() is None
    _, err = _stop(proc)
    said = [text for text in err.splitlines() if "hopscope handshake" in text]
    assert len(said) == 1, err
    assert len([text for text in err.splitlines() if "did not send valid HTTP" in text]) == 1
    assert "Invalid HTTP request" not in err
    assert "Traceback" not in err
    assert "8 connection(s) dropped for bad data" in err.splitlines()[-1]


def _otlp_span(trace_id: str, **extra: Any) -> dict[str, Any]:
    span = {
        "traceId": trace_id,
        "spanId": "b7ad6b7169203331",
        "name": "GET /a",
        "kind": 2,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000100000000",
    }
    span.update(extra)
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}


MALFORMED = [
    {"resourceSpans": [{"scopeSpans": 5}]},
    {"resourceSpans": [{"scopeSpans": True}]},
    _otlp_span("0af7651916cd43dd8448eb211c80319c", events=True),
    _otlp_span("0af7651916cd43dd8448eb211c80319c", events=7),
    _otlp_span("0af7651916cd43dd8448eb211c80319c", links=3),
    _otlp_span("0af7651916cd43dd8448eb211c80319c", links=[{"traceId": 5}]),
]


#: JSON as Python's json module (and some exporters) write it: Infinity is no integer.
INFINITY = json.dumps(
    _otlp_span("0af7651916cd43dd8448eb211c80319c", startTimeUnixNano=float("inf"))
).encode()


@pytest.mark.parametrize("payload", MALFORMED)
def test_malformed_otlp_shapes_are_otlp_errors(payload: dict[str, Any]) -> None:
    with pytest.raises(OtlpError):
        otlp_to_events(payload)


def test_json_infinity_timestamps_are_otlp_errors() -> None:
    with pytest.raises(OtlpError):
        otlp_to_events(json.loads(INFINITY))


def test_malformed_otlp_bodies_get_400_and_the_collector_stays_up(
    live: tuple[subprocess.Popen[str], int, str],
) -> None:
    proc, _, url = live
    bodies = [json.dumps(payload).encode() for payload in MALFORMED]
    bodies.append(INFINITY)
    with httpx.Client(timeout=10) as client:
        for body in bodies:
            response = client.post(url, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, body
        good = _otlp_span("0af7651916cd43dd8448eb211c80319e")
        assert client.post(url, json=good).status_code == 200
    assert proc.stdout is not None
    assert "GET /a" in proc.stdout.readline()
    _, err = _stop(proc)
    assert "Traceback" not in err


@pytest.mark.skipif(not EXPORTER, reason="opentelemetry-exporter-otlp-proto-http is not installed")
def test_links_from_the_opentelemetry_sdk_are_kept(
    live: tuple[subprocess.Popen[str], int, str], tmp_path: Any
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    proc, _, url = live
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url)))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("enqueue", kind=SpanKind.PRODUCER) as producer:
        pass
    with tracer.start_as_current_span(
        "GET /work", kind=SpanKind.SERVER, links=[Link(producer.get_span_context())]
    ) as consumer:
        consumer.add_event("picked", {"attempt": 1})
        consumer.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    assert proc.stdout is not None
    deadline = time.monotonic() + 15
    line = ""
    while "GET /work" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "GET /work" in line and "error" in line
    _stop(proc)
    # The same conversion the receiver ran, checked on the events themselves.
    context = producer.get_span_context()
    payload = _otlp_span(
        f"{consumer.get_span_context().trace_id:032x}",
        links=[{"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}],
    )
    (trace,) = assemble(otlp_to_events(payload))
    (span,) = trace.spans.values()
    assert span.attrs["otel.links"] == [f"{context.trace_id:032x}-{context.span_id:016x}"]


# -- OTLP out, to a backend that is slow --------------------------------------------------


class _SlowBackend:
    """An OTLP endpoint that holds every request until released (or 30 s at most)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrived = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                backend.arrived.set()
                backend.release.wait(30)
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _trace_events(name: str) -> list[dict[str, Any]]:
    trace_id, span_id = f"{new_trace_id():032x}", f"{new_span_id():016x}"
    ids = {"trace_id": trace_id, "span_id": span_id}
    start = {"kind": "span_start", "ts": 1, **ids, "parent_id": None, "hop": "app",
             "name": name, "attrs": {}}  # fmt: skip
    return [start, {"kind": "span_end", "ts": 2, **ids, "attrs": {}}]


def test_a_slow_backend_is_warned_once_and_what_it_never_took_is_counted() -> None:
    backend = _SlowBackend()
    warnings: list[str] = []
    sender = OtlpSender(backend.url, interval=0.02, warn=warnings.append)
    sender.slow_after = 0.1
    try:
        sender.feed(_trace_events("GET /first"))
        assert backend.arrived.wait(10)
        time.sleep(0.2)  # the batch is now in flight for longer than slow_after
        for n in range(4):
            sender.feed(_trace_events(f"GET /later{n}"))
        sender.close(timeout=0.2)
        assert len(warnings) == 1 and "slow" in warnings[0]
        assert sender.sent == sender.failed == sender.dropped == 0
        assert sender.unsent == 5
        assert "5 trace(s) not sent" in sender.summary()
    finally:
        backend.close()


# -- several workers, the collector started after them ------------------------------------

PID_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from hopscope.tracing import wrap


async def pid(request):
    return PlainTextResponse(str(os.getpid()))


app = wrap(Starlette(routes=[Route("/pid/{n}", pid)]))
"""


def test_workers_started_before_the_collector_report_all_and_each_pid_is_said(
    tmp_path: Any, free_port: Callable[[], int]
) -> None:
    (tmp_path / "pidapp.py").write_text(PID_APP)
    port, app_port = free_port(), free_port()
    env = {**os.environ, "HOPSCOPE_SINK": f"tcp://127.0.0.1:{port}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "pidapp:app", "--port", str(app_port),
         "--workers", "2", "--log-level", "warning"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc: subprocess.Popen[str] | None = None
    try:
        served: dict[int, int] = {}
        base = f"http://127.0.0.1:{app_port}"
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:
            # A new connection each time, so both workers get some.
            try:
                response = httpx.get(f"{base}/pid/{n}", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            served[n] = int(response.text)
            n += 1
            if len(set(served.values())) == 2 and n >= 10:
                break
        assert len(set(served.values())) == 2, "uvicorn did not start two workers"
        proc = _hopscope("tail", "--listen", f"127.0.0.1:{port}")
        _wait_listening(proc)
        for _ in range(10):
            response = httpx.get(f"{base}/pid/{n}", timeout=5)
            served[n] = int(response.text)
            n += 1
        assert proc.stdout is not None
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while len(seen) < n and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "GET /pid/" in line:
                seen.add(line.split("GET /pid/")[1].split()[0])
        _, err = _stop(proc)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Nothing was dropped: what the apps queued before the collector listened arrived.
    assert seen == {str(k) for k in served}
    assert "dropped" not in err
    (last,) = [line for line in err.splitlines() if "stopped after" in line]
    said = last.split(", from pid ")[1].replace(" (uvicorn/", ",").replace(",", " ").split()
    assert {int(pid) for pid in said if pid.isdigit()} == set(served.values())
