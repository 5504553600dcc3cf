"""Fault isolation per record, from the app to the screen (session 10).

A batch carries up to hundreds of requests; what one request's app code put in its
record (a user span's attribute whose ``repr`` raises, a structure too deep to
marshal, an int past Python's digit limit, a log message whose ``str`` raises) may cost
that value, or at worst that record (counted as dropped), never the other requests of
its batch, the connection, or the app's own behaviour.  Real apps under real servers,
real sinks, and ``hopscope tail --listen`` as a child process where a collector is
involved.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import FileSink, MemorySink, SocketSink, span, wrap
from hopscope.tracing.sinks import Sink
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

Serve = Callable[..., AbstractContextManager[str]]


class RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr is the app's bug")


class RaisingStr:
    def __str__(self) -> str:
        raise RuntimeError("str is the app's bug")

    __repr__ = __str__


def _deep(levels: int) -> list[Any]:
    top: list[Any] = []
    inner = top
    for _ in range(levels):
        inner.append([])
        inner = inner[0]
    return top


def _cycle() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


#: Values a user span may legally be given; each made fresh per request.
HOSTILE: dict[str, Callable[[], Any]] = {
    "repr-raises": RaisingRepr,
    "in-a-list": lambda: [1, RaisingRepr()],
    "as-a-key": lambda: {RaisingStr(): 1},
    "too-deep-to-marshal": lambda: _deep(5000),
    "cycle": _cycle,
    "int-past-the-digit-limit": lambda: 10**5000,
}


def _app(sink: Sink) -> Any:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def odd(request: Request) -> PlainTextResponse:
        with span("db", q=HOSTILE[request.path_params["kind"]](), fine="kept"):
            pass
        return PlainTextResponse("odd")

    routes = [Route("/ok/{n}", ok), Route("/odd/{kind}", odd)]
    return wrap(Starlette(routes=routes), sink=sink)


def _requests(base: str, kind: str) -> list[str]:
    """Five plain requests around one with ``kind``'s value; their paths."""
    paths = [f"/ok/{n}" for n in range(2)] + [f"/odd/{kind}"] + [f"/ok/{n}" for n in range(2, 5)]
    with httpx.Client(base_url=base, timeout=10) as client:
        for path in paths:
            assert client.get(path).status_code == 200
    return paths


def _file_events(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()[1:]
    return [e for e in map(json.loads, lines) if e.get("kind") != "summary"]


def _check_events(events: list[dict[str, Any]], paths: list[str]) -> None:
    starts = [e for e in events if e["kind"] == "span_start"]
    assert sorted(e["attrs"]["url.path"] for e in starts if "url.path" in e["attrs"]) == sorted(
        paths
    )
    (db,) = [e for e in starts if e["name"] == "db"]
    assert db["attrs"]["fine"] == "kept"  # the span's other attributes are whole
    assert "q" in db["attrs"]
    assert not [e for e in events if e["kind"] == "dropped"]


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_an_odd_span_attribute_costs_the_file_sink_that_value_only(
    kind: str, serve_asgi: Serve, tmp_path: Path
) -> None:
    """One batch (a long interval, then close): it used to be lost whole, every request
    of it counted as dropped, for one value of one span."""
    path = tmp_path / "t.jsonl"
    sink = FileSink(path, interval=60)
    with serve_asgi(_app(sink)) as base:
        paths = _requests(base, kind)
    sink.close()
    assert sink.dropped == 0
    _check_events(_file_events(path), paths)


@pytest.mark.parametrize("kind", ["repr-raises", "too-deep-to-marshal", "cycle"])
def test_an_odd_span_attribute_costs_the_memory_sink_that_value_only(
    kind: str, serve_asgi: Serve
) -> None:
    """``MemorySink.events()`` raised for all of them."""
    sink = MemorySink()
    with serve_asgi(_app(sink)) as base:
        paths = _requests(base, kind)
    _check_events(sink.events(), paths)


class _Tail:
    """``hopscope tail --listen`` on a free port, its stdout read as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hopscope.app", "tail", "--listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        self.url = ""
        while not self.url and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            if found := re.search(r"listening on (tcp://\S+?);", line):
                self.url = found.group(1)
        assert self.url, "the collector did not start"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self, requests: int) -> tuple[str, str]:
        """Once ``requests`` lines were printed (or 20 s went by), stop it: (out, err)."""
        deadline = time.monotonic() + 20
        while len(self.lines) < requests and time.monotonic() < deadline:
            time.sleep(0.02)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)  # its stderr says little: the pipe does not fill up
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stderr is not None
        return "".join(self.lines), self.proc.stderr.read()


@contextmanager
def _tail(*args: str) -> Iterator[_Tail]:
    tail = _Tail(*args)
    try:
        yield tail
    finally:
        if tail.proc.poll() is None:
            tail.proc.kill()
            tail.proc.communicate()


def _shown(out: str, paths: list[str]) -> list[str]:
    return sorted(path for path in paths if re.search(rf"GET {re.escape(path)}\b", out))


@pytest.mark.parametrize("output", [False, True], ids=["lines", "lines-and-file"])
@pytest.mark.parametrize(
    "kind", ["repr-raises", "as-a-key", "too-deep-to-marshal", "cycle", "int-past-the-digit-limit"]
)
def test_an_odd_span_attribute_costs_the_socket_sink_that_value_only(
    kind: str, output: bool, serve_asgi: Serve, tmp_path: Path
) -> None:
    """Marshal refuses the value, and the repr fallback raised (or recursed): the frame
    was lost, counted as dropped, and the sink closed its connection on top.  A cycle
    marshals, and the collector lost its request making it plain."""
    path = tmp_path / "t.jsonl"
    with _tail(*(["-o", str(path)] if output else [])) as tail:
        sink = SocketSink(tail.url, interval=60)  # one batch: what flush() sends
        try:
            with serve_asgi(_app(sink)) as base:
                paths = _requests(base, kind)
            sink.flush(5)
            assert sink.dropped == 0
            assert sink.connects == 1
        finally:
            sink.close()
        out, err = tail.stop(len(paths))
    assert _shown(out, paths) == sorted(paths)
    assert "Traceback" not in err
    (stop,) = [line for line in err.splitlines() if "stopped after" in line]
    assert "stopped after 6 request(s)" in stop and "dropped" not in stop
    if output:
        _check_events(_file_events(path), paths)


def test_a_record_of_no_known_shape_costs_the_collector_that_record_only(
    serve_asgi: Serve,
) -> None:
    """A record of the wrong length (emitted through the public ``Sink.emit``) made the
    collector refuse the whole frame and drop the connection; it is left out now, and
    counted where the user looks (the tail's stop line)."""
    with _tail() as tail:
        sink = SocketSink(tail.url, interval=60)
        try:
            with serve_asgi(_app(sink)) as base:
                with httpx.Client(base_url=base, timeout=10) as client:
                    assert client.get("/ok/1").status_code == 200
                    sink.emit(("s", 1))
                    assert client.get("/ok/2").status_code == 200
            sink.flush(5)
        finally:
            sink.close()
        out, err = tail.stop(2)
    assert _shown(out, ["/ok/1", "/ok/2"]) == ["/ok/1", "/ok/2"]
    assert "Traceback" not in err and "dropped a connection" not in err
    (stop,) = [line for line in err.splitlines() if "stopped after" in line]
    assert "stopped after 2 request(s)" in stop and "1 events dropped" in stop


def test_a_record_that_cannot_become_events_costs_the_file_sink_that_record_only(
    serve_asgi: Serve, tmp_path: Path
) -> None:
    """The FileSink made the batch's events in one go: one record whose fields are of
    the wrong types lost them all.  It is counted in the file's dropped line now."""
    path = tmp_path / "t.jsonl"
    sink = FileSink(path, interval=60)
    with serve_asgi(_app(sink)) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/ok/1").status_code == 200
            sink.emit(("p", "not", "ids", "at", "all", None))
            assert client.get("/ok/2").status_code == 200
    sink.close()
    events = _file_events(path)
    paths = [e["attrs"].get("url.path") for e in events if e["kind"] == "span_start"]
    assert sorted(paths) == ["/ok/1", "/ok/2"]
    assert [e["count"] for e in events if e["kind"] == "dropped"] == [1]
    assert sink.dropped == 1


class _BadMessage:
    def __str__(self) -> str:
        raise RuntimeError("the app's own bug")

    __repr__ = __str__


def test_a_log_message_whose_str_raises_does_not_change_the_response(
    serve_asgi: Serve,
) -> None:
    """Without hopscope ``log.warning(obj)`` returns (a handler that formats it reports
    the error itself); the log capture's fallback called ``str(msg)`` again, which
    raised inside the app's logging call: a 200 became a 500."""
    log = logging.getLogger("hopscope-tests.faults")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(logging.NullHandler())

    async def logs(request: Request) -> PlainTextResponse:
        log.warning(_BadMessage())
        log.warning("%d apples", "three")  # a format that does not match: as before
        return PlainTextResponse("ok")

    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/logs", logs)]), sink=sink)
    with serve_asgi(app) as base:
        assert httpx.get(f"{base}/logs", timeout=10).status_code == 200
    messages = [e["attrs"]["message"] for e in sink.events() if e.get("name") == "log"]
    assert messages == ["<unrepresentable _BadMessage>", "%d apples"]


class _Header(str):
    """A header value of the app's own str type (WSGI servers take str subclasses)."""


def test_a_flask_app_s_odd_values_cost_the_file_sink_nothing_else(tmp_path: Path) -> None:
    """The WSGI side: a user span's odd attribute, a status given as an HTTPStatus and a
    header value of a str subclass, among plain requests in one batch."""
    import http
    import threading

    from flask import Flask
    from werkzeug.serving import make_server

    flask = Flask(__name__)

    @flask.get("/ok/<int:n>")
    def ok(n: int) -> str:
        return "ok"

    @flask.get("/odd")
    def odd() -> tuple[str, http.HTTPStatus, dict[str, str]]:
        with span("db", q=RaisingRepr(), fine="kept"):
            pass
        return "made", http.HTTPStatus.CREATED, {"X-Mine": _Header("v1")}

    path = tmp_path / "t.jsonl"
    sink = FileSink(path, interval=60)
    server = make_server("127.0.0.1", 0, wrap(flask, sink=sink), threaded=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=10) as c:
            assert c.get("/ok/1").status_code == 200
            made = c.get("/odd")
            assert (made.status_code, made.headers["x-mine"]) == (201, "v1")
            assert c.get("/ok/2").status_code == 200
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
    sink.close()
    events = _file_events(path)
    _check_events(events, ["/ok/1", "/odd", "/ok/2"])
    ends = [e for e in events if e["kind"] == "span_end"]
    (end,) = [e for e in ends if e["attrs"].get("http.route") == "/odd"]
    assert end["attrs"]["http.response.status_code"] == 201
    assert ["X-Mine", "v1"] in end["attrs"]["http.response.headers"]


@pytest.mark.parametrize(
    ("sizes", "lost"),
    [((65,), 1), ((33, 33), 0)],
    ids=["one-past-a-frame", "two-that-fit-apart"],
)
def test_a_batch_past_the_collector_s_frame_limit_is_split_not_refused(
    sizes: tuple[int, ...], lost: int, serve_asgi: Serve
) -> None:
    """The collector closes the connection of a frame past 64 MiB: one request with a
    huge attribute (a blob in a span) cost its whole batch and the connection.  Now the
    sink splits such a batch into frames that fit, and only a record past the limit on
    its own is dropped (and counted)."""
    blobs = iter([str(n) * (size << 20) for n, size in enumerate(sizes)])

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def blob(request: Request) -> PlainTextResponse:
        with span("upload", blob=next(blobs)):
            pass
        return PlainTextResponse("blob")

    routes = [Route("/ok/{n}", ok), Route("/blob/{n}", blob)]
    paths = ["/ok/0", *(f"/blob/{n}" for n in range(len(sizes))), "/ok/1", "/ok/2"]
    with _tail() as tail:
        sink = SocketSink(tail.url, interval=60)
        try:
            with serve_asgi(wrap(Starlette(routes=routes), sink=sink)) as base:
                with httpx.Client(base_url=base, timeout=10) as client:
                    assert client.get(paths[0]).status_code == 200
                    # Connected and just drained: the sink's thread then waits half an
                    # interval, so the rest is one batch, what the next flush() sends.
                    sink.flush(5)
                    for path in paths[1:]:
                        assert client.get(path).status_code == 200
            sink.flush(10)
            assert sink.dropped == lost
            assert sink.connects == 1
        finally:
            sink.close()
        kept = [path for path in paths if not (lost and path.startswith("/blob/"))]
        out, err = tail.stop(len(kept))
    assert _shown(out, paths) == sorted(kept)
    assert "Traceback" not in err and "dropped a connection" not in err
    (stop,) = [line for line in err.splitlines() if "stopped after" in line]
    assert f"stopped after {len(kept)} request(s)" in stop
    assert (f"{lost} events dropped" in stop) if lost else ("dropped" not in stop)


def test_a_user_span_named_by_a_list_keeps_its_request_s_line(serve_asgi: Serve) -> None:
    """``span([...])`` is legal at run time; the tail's line of the request hashed the
    span's name, failed, and the request was silently not shown (nor counted live).
    Span names are made text with the events now."""

    async def named(request: Request) -> PlainTextResponse:
        with span(["not", "a", "str"]):  # type: ignore[arg-type]
            pass
        return PlainTextResponse("named")

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    paths = ["/ok", "/named", "/ok2"]
    routes = [Route("/ok", ok), Route("/named", named), Route("/ok2", ok)]
    with _tail() as tail:
        sink = SocketSink(tail.url, interval=60)
        try:
            with serve_asgi(wrap(Starlette(routes=routes), sink=sink)) as base:
                with httpx.Client(base_url=base, timeout=10) as client:
                    for path in paths:
                        assert client.get(path).status_code == 200
            sink.flush(5)
        finally:
            sink.close()
        out, err = tail.stop(len(paths))
    assert _shown(out, paths) == sorted(paths)
    assert "stopped after 3 request(s)" in err
