"""What hopscope costs a hello-world app, next to no recording and next to OpenTelemetry.

Run: ``python bench/overhead.py [--quick]`` (needs ``pip install -e '.[bench]'``; uses
``wrk`` when it is on PATH, else a slower built-in keep-alive load loop, and says which).

Two measurements, in one run, on loopback only:

* End to end: a Starlette hello world under uvicorn (httptools, one worker) and a Flask
  hello world under gunicorn (one gthread worker with 4 threads: one process, like
  uvicorn's, and on 2 cores it served more than ``-k sync`` with one or two workers),
  each bare, wrapped by hopscope sending to a live collector process, and wrapped by
  OpenTelemetry's middleware (SDK tracer, batch processor, in-memory exporter), and
  wrapped by the floor any recorder stands on (:class:`MinimalASGI`, :class:`MinimalWSGI`:
  three timestamps and a tuple a request, nothing exported), alone and with the request's
  context variable set where the app's code runs (``floor+ctx``, as ``span()`` needs): a
  goal above the floor's ratio cannot be met on that machine by any recorder.  The five
  servers of a framework run side by side and are loaded in alternating rounds (the
  order rotates each round) because round-to-round noise on a small machine is several
  percent: only ratios taken within one run, as medians of rounds, mean anything.  The
  CPU time each server (and the collector) spent per request is printed too, read from
  ``/proc``: it moves far less than req/s when other work shares the machine.
* In process: the same apps driven by a minimal fake server loop (no sockets, no parsing),
  so the difference between wrapped and bare is the middleware's own cost per request:
  into a MemorySink (the request's path only) and into a SocketSink to the collector
  (plus marshalling and sending, done in the same process: by a request now and then,
  by the sink's thread when the app is idle); and, for scale, into the floor any recorder
  stands on (:class:`MinimalASGI`, :class:`MinimalWSGI`: three timestamps and a tuple a
  request, nothing else recorded, nothing exported), alone and with the request's context
  variable set wherever the app's code runs, as ``span()`` needs (``minimal+context``:
  for a Flask request the call, two steps through its body and its ``close``).

Every process this script starts is stopped before it exits (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import io
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    ASGI_SCOPE,
    HOST,
    WSGI_ENVIRON,
    flask_hello,
    free_port,
    spawn,
    starlette_hello,
    stop,
    stop_all,
    wait_ready,
    wrk,
    wrk_errors,
    wrk_ms,
)

HERE = Path(__file__).resolve().parent
#: "floor" is :class:`MinimalASGI` / :class:`MinimalWSGI`: what any recorder costs at least;
#: "floor+ctx" the same with the request's context variable set where the app's code runs.
MODES = ("bare", "hopscope", "otel", "floor", "floor+ctx")
GOAL_RATIO = 0.90
GOAL_ADDED_US = 10.0

# --------------------------------------------------------------------------------------
# The apps (imported by the server processes as ``overhead:asgi_app`` / ``wsgi_app``)
# --------------------------------------------------------------------------------------


class _BoundedExporter:
    """An InMemorySpanExporter that forgets every 10k spans, so memory stays flat."""

    def __new__(cls) -> Any:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        class Bounded(InMemorySpanExporter):
            exported = 0

            def export(self, spans: Any) -> Any:
                result = super().export(spans)
                self.exported += len(spans)
                if self.exported >= 10_000:
                    self.clear()
                    self.exported = 0
                return result

        return Bounded()


def otel_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_BoundedExporter()))
    return provider


def wrapped(app: Any, mode: str, sink: Any, interface: str) -> Any:
    """``app`` bare, under hopscope (to ``sink``) or under OpenTelemetry's middleware."""
    if mode == "bare":
        return app
    if mode == "hopscope":
        from hopscope.tracing import wrap

        return wrap(app, sink=sink)
    if mode in ("floor", "floor+ctx"):
        minimal = MinimalASGI if interface == "asgi" else MinimalWSGI
        return minimal(app, context=mode == "floor+ctx")
    if interface == "asgi":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as OtelASGI

        return OtelASGI(app, tracer_provider=otel_provider())
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as OtelWSGI

    return OtelWSGI(app, tracer_provider=otel_provider())


class MinimalASGI:
    """The floor any recorder stands on (../shared/notes/overhead-floor.md): three
    timestamps (call, response start, final body) through a wrapped ``send``, one tuple a
    request into a bounded deque; no ids, headers, bodies, context or export."""

    def __init__(self, app: Any, context: bool = False) -> None:
        self.app = app
        self.kept: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=100_000)
        #: Also what the issue asks of every recorder: the request's context variable set
        #: around the app's code (``span()`` finds its request), reset after it.
        self.context = context

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.context:
            token = _current().set(self)
            try:
                await self._call(scope, receive, send)
            finally:
                _current().reset(token)
        else:
            await self._call(scope, receive, send)

    async def _call(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.time_ns()
        marks = [0, 0, 0]

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                marks[0] = time.time_ns()
                marks[2] = message["status"]
            elif not message.get("more_body"):
                marks[1] = time.time_ns()
            await send(message)

        await self.app(scope, receive, recording_send)
        self.kept.append((started, marks[0], marks[1], marks[2], scope.get("path")))


class MinimalWSGI:
    """The same floor for WSGI: the status through a wrapped ``start_response``, the end
    when the server closes the body (a generator passing the chunks on, and ``close``)."""

    def __init__(self, app: Any, context: bool = False) -> None:
        self.app = app
        self.kept: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=100_000)
        #: The context variable set wherever the app's code runs, as the issue asks of
        #: ``span()``: around the call, each step through the body, and its ``close``.
        self.context = context

    def __call__(self, environ: Any, start_response: Any) -> Any:
        started = time.time_ns()
        marks = [0, ""]

        def recording_start(status: str, headers: Any, exc_info: Any = None) -> Any:
            marks[0] = time.time_ns()
            marks[1] = status
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        path = environ.get("PATH_INFO")
        if not self.context:
            result = self.app(environ, recording_start)
            return _MinimalBody(result, self.kept, started, marks, path)
        current = _current()
        token = current.set(self)  # type: ignore[arg-type]
        try:
            result = self.app(environ, recording_start)
        finally:
            current.reset(token)
        return _MinimalContextBody(result, self.kept, started, marks, path)


class _MinimalBody:
    def __init__(self, result: Any, kept: Any, started: int, marks: list[Any], path: Any) -> None:
        self.result, self.kept, self.started, self.marks, self.path = (
            result, kept, started, marks, path
        )  # fmt: skip

    def __iter__(self) -> Iterator[bytes]:
        yield from self.result

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()
        self.kept.append((self.started, self.marks[0], time.time_ns(), self.marks[1], self.path))


class _MinimalContextBody(_MinimalBody):
    def __iter__(self) -> Iterator[bytes]:
        current = _current()
        iterator = None
        while True:
            token = current.set(self)  # type: ignore[arg-type]
            try:
                if iterator is None:
                    iterator = iter(self.result)
                chunk = next(iterator, None)
            finally:
                current.reset(token)
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        current = _current()
        token = current.set(self)  # type: ignore[arg-type]
        try:
            super().close()
        finally:
            current.reset(token)


def _current() -> Any:
    from hopscope.tracing.context import current

    return current


def _socket_sink(url: str) -> Any:
    from hopscope.tracing import SocketSink

    return SocketSink(url)


def asgi_app() -> Any:
    """uvicorn ``--factory`` entry: mode and collector come from the environment."""
    mode = os.environ["HOPSCOPE_BENCH_MODE"]
    sink = _socket_sink(os.environ["HOPSCOPE_BENCH_SINK"]) if mode == "hopscope" else None
    return wrapped(starlette_hello(), mode, sink, "asgi")


def wsgi_app(mode: str, sink_url: str) -> Any:
    """gunicorn ``overhead:wsgi_app('MODE', 'URL')`` entry."""
    sink = _socket_sink(sink_url) if mode == "hopscope" else None
    return wrapped(flask_hello(), mode, sink, "wsgi")


# --------------------------------------------------------------------------------------
# The collector process (``overhead.py --collector``)
# --------------------------------------------------------------------------------------

_LENGTH = struct.Struct("!I")


class _MinimalCollector:
    """Fallback when ``hopscope.app.collector`` is not importable: same wire, same decode."""

    def __init__(self) -> None:
        self.frames = self.events = self.dropped = 0
        self.server = socket.create_server((HOST, 0))
        self.url = f"tcp://{HOST}:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.server.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        from hopscope.tracing.records import to_events
        from hopscope.tracing.sinks import WIRE_MAGIC, decode_frame

        stream = conn.makefile("rb")
        with conn, stream:
            if stream.read(len(WIRE_MAGIC)) != WIRE_MAGIC:
                return
            while head := stream.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(head)
                info, dropped, records = decode_frame(stream.read(length))
                self.frames += 1
                self.dropped += dropped
                for record in records:
                    self.events += len(to_events(record, info))


def collector_main(tail: bool = False) -> None:
    """Print the collector's URL, answer ``stats`` lines on stdin, stop at EOF.

    Without ``tail`` nobody reads the collector's events (it then only counts them);
    with it, it prints ``hopscope tail`` lines to /dev/null, as ``hopscope tail --listen``
    does to a terminal.
    """
    kind = "hopscope.app.collector"
    try:
        from hopscope.app.collector import BackgroundCollector

        consumer = None
        if tail:
            from hopscope.app.tail import Tail

            consumer = Tail(open(os.devnull, "w")).feed  # open as long as we run
            kind += " feeding hopscope tail (lines to /dev/null)"
        background = BackgroundCollector(f"{HOST}:0", consumer).start()
        url, counters = background.url, background.collector
    except ImportError:
        kind = "minimal in-bench collector"
        minimal = _MinimalCollector()
        url, counters, background = minimal.url, minimal, None
    print(f"{url} {kind}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # the bench stops its children with SIGINT
        for line in sys.stdin:
            if line.strip() == "stats":
                print(counters.frames, counters.events, counters.dropped, flush=True)
    if background is not None:
        background.stop()


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


@dataclass
class Server:
    framework: str
    mode: str
    port: int
    proc: subprocess.Popen[Any]


def start_server(framework: str, mode: str, sink_url: str) -> Server:
    port = free_port()
    py = sys.executable
    if framework == "asgi":
        argv = [
            py, "-m", "uvicorn", "--app-dir", str(HERE), "--factory", "overhead:asgi_app",
            "--host", HOST, "--port", str(port), "--http", "httptools", "--workers", "1",
            "--log-level", "warning",
        ]  # fmt: skip
        env = {"HOPSCOPE_BENCH_MODE": mode, "HOPSCOPE_BENCH_SINK": sink_url}
    else:
        argv = [
            py, "-m", "gunicorn", "--chdir", str(HERE), "-b", f"{HOST}:{port}", "-w", "1",
            "-k", "gthread", "--threads", "4", "--log-level", "warning",
            f"overhead:wsgi_app({mode!r}, {sink_url!r})",
        ]  # fmt: skip
        env = {}
    proc = spawn(argv, env, stdin=subprocess.DEVNULL)
    wait_ready(proc, port, f"{framework} {mode} server", bench="overhead")
    return Server(framework, mode, port, proc)


class CollectorProcess:
    def __init__(self, tail: bool = False) -> None:
        self.proc = spawn(
            [sys.executable, str(Path(__file__).resolve()), "--collector"]
            + (["--tail"] if tail else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self._readline(20.0)
        self.url, _, self.kind = line.partition(" ")

    def _readline(self, timeout: float) -> str:
        """One line from the collector, or give up (no bench run may hang)."""
        result: list[str] = []
        reader = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise SystemExit("overhead: the collector process did not answer")
        return result[0].strip()

    def stats(self) -> tuple[int, int, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        frames, events, dropped = (int(x) for x in self._readline(10.0).split())
        return frames, events, dropped


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    requests: int = 0
    #: CPU microseconds per request of the server's processes and of the collector:
    #: unlike req/s, these hardly move when something else on the machine competes.
    server_us: float = float("nan")
    collector_us: float = float("nan")


def run_wrk(port: int, seconds: int, connections: int) -> Load:
    out = wrk(port, seconds, connections)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = wrk_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    p99 = wrk_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    count = wrk_errors(out)
    done = re.search(r"(\d+) requests in", out)
    return Load(rps, p50, p99, count, int(done[1]) if done else round(rps * seconds))


def run_python_load(port: int, seconds: float, connections: int) -> Load:
    """Fallback without wrk: keep-alive GET loops on raw sockets (asyncio, one thread)."""
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0

    async def client(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])  # type: ignore[index]
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                latencies.append(time.perf_counter() - began)
        finally:
            writer.close()

    async def main() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(client(began + seconds) for _ in range(connections)))
        return time.perf_counter() - began

    elapsed = asyncio.run(main())
    latencies.sort()
    n = len(latencies)
    p50, p99 = latencies[n // 2], latencies[min(n - 1, n * 99 // 100)]
    return Load(n / elapsed, p50 * 1e3, p99 * 1e3, errors, n)


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


@dataclass
class E2E:
    framework: str
    server: str
    loads: dict[str, list[Load]] = field(default_factory=dict)

    def ratio(self, mode: str) -> list[float]:
        return [w.rps / b.rps for w, b in zip(self.loads[mode], self.loads["bare"], strict=True)]


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the processes of one group (a server and its workers).

    Linux only (``/proc``); NaN elsewhere.  Ended processes no longer count, which is fine
    here: servers and the collector live through the whole measurement.
    """
    total = 0.0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return float("nan")
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # the process group id
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def measured(
    load: Callable[..., Load], srv: Server, collector: CollectorProcess, seconds: int, conns: int
) -> Load:
    server0, collector0 = group_cpu(srv.proc.pid), group_cpu(collector.proc.pid)
    result = load(srv.port, seconds, conns)
    if result.requests:
        per = 1e6 / result.requests
        result.server_us = (group_cpu(srv.proc.pid) - server0) * per
        result.collector_us = (group_cpu(collector.proc.pid) - collector0) * per
    return result


def end_to_end(
    framework: str, collector: CollectorProcess, args: argparse.Namespace, load: Callable[..., Load]
) -> E2E:
    if framework == "asgi":
        import uvicorn

        server = f"uvicorn {uvicorn.__version__} (httptools, loop auto, 1 worker)"
    else:
        import gunicorn

        server = f"gunicorn {gunicorn.__version__} (1 worker, -k gthread --threads 4)"
    result = E2E(framework, server, {mode: [] for mode in MODES})
    servers = [start_server(framework, mode, collector.url) for mode in MODES]
    try:
        for srv in servers:  # warm up: imports, code paths, the sink's connection
            load(srv.port, args.warmup, args.connections)
        for round_no in range(args.rounds):
            shift = round_no % len(servers)
            for srv in servers[shift:] + servers[:shift]:
                result.loads[srv.mode].append(
                    measured(load, srv, collector, args.duration, args.connections)
                )
    finally:
        for srv in servers:
            stop(srv.proc)
    return result


# --------------------------------------------------------------------------------------
# In process
# --------------------------------------------------------------------------------------

#: CPU seconds of this whole process (the sink's thread included), not wall time: the
#: collector and anything else on the machine then cannot inflate the figures.
_cpu = time.process_time


#: ``every`` runs once per this many requests: a MemorySink cleared that often holds about
#: what a SocketSink's queue holds between two 50 ms drains at a few thousand req/s.
EVERY = 256


def drive_asgi(app: Any, n: int, every: Callable[[], None]) -> float:
    """CPU seconds for ``n`` requests through a fake server: fresh scope, trivial channels."""
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: Any) -> None:
        pass

    async def loop() -> float:
        scope = ASGI_SCOPE
        began = _cpu()
        for i in range(n):
            await app(dict(scope), receive, send)
            if not i % EVERY:
                every()
        return _cpu() - began

    return asyncio.run(loop())


def drive_wsgi(app: Any, n: int, every: Callable[[], None]) -> float:
    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        return _discard

    environ = WSGI_ENVIRON
    bytes_io = io.BytesIO
    began = _cpu()
    for i in range(n):
        env = dict(environ)
        env["wsgi.input"] = bytes_io(b"")
        result = app(env, start_response)
        try:
            for _ in result:
                pass
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not i % EVERY:
            every()
    return _cpu() - began


def _discard(data: bytes) -> None:
    pass


@dataclass
class InProcess:
    framework: str
    rounds: dict[str, list[float]]  # CPU microseconds per request, per variant and round
    dropped: int

    def us(self, variant: str, best: bool = False) -> float:
        values = self.rounds[variant]
        return min(values) if best else statistics.median(values)

    def added(self, variant: str, best: bool = False) -> float:
        return self.us(variant, best) - self.us("bare", best)


def in_process(framework: str, collector_url: str, n: int, rounds: int) -> InProcess:
    """``n`` requests per variant, in ``rounds`` alternating rounds; median per request.

    The socket variant's time includes delivering what it queued (the sink thread's CPU
    counts, it is this process's), so it is the whole cost to the app's process.
    """
    from hopscope.tracing import MemorySink

    make = starlette_hello if framework == "asgi" else flask_hello
    drive = drive_asgi if framework == "asgi" else drive_wsgi
    memory = MemorySink()
    socket_sink = _socket_sink(collector_url)
    per_round = max(1, n // rounds)
    hop_memory = wrapped(make(), "hopscope", memory, framework)
    hop_socket = wrapped(make(), "hopscope", socket_sink, framework)
    variants: dict[str, tuple[Any, Callable[[], None], int]] = {
        "bare": (make(), _nothing, per_round),
        "hopscope/memory": (hop_memory, memory.clear, per_round),
        "hopscope/socket": (hop_socket, _nothing, per_round),
        # What a recorder that records next to nothing costs (the floor; see MinimalASGI).
        "minimal": (
            (MinimalASGI if framework == "asgi" else MinimalWSGI)(make()),
            _nothing,
            per_round,
        ),
        # The same, with the request's context set where the app's code runs.
        "minimal+context": (
            (MinimalASGI if framework == "asgi" else MinimalWSGI)(make(), context=True),
            _nothing,
            per_round,
        ),
        # OpenTelemetry costs far more per request: fewer requests give the same precision.
        "otel": (wrapped(make(), "otel", None, framework), _nothing, max(200, per_round // 10)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for app, every, _count in variants.values():  # warm up
        drive(app, 500, every)
    socket_sink.flush()
    memory.clear()
    for _ in range(rounds):
        for name, (app, every, count) in variants.items():
            gc.collect()
            elapsed = drive(app, count, every)
            began = _cpu()
            socket_sink.flush()
            if name == "hopscope/socket":
                elapsed += _cpu() - began
            memory.clear()
            times[name].append(elapsed / count * 1e6)
    socket_sink.close()
    return InProcess(framework, times, socket_sink.dropped)


def _nothing() -> None:
    pass


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def report_e2e(result: E2E) -> dict[str, float]:
    label = "Starlette" if result.framework == "asgi" else "Flask"
    print(f"\n== {label} hello world ({result.framework.upper()}) under {result.server}")
    print(
        f"{'round':>5}  "
        + "  ".join(f"{m + ' req/s':>14}" for m in MODES)
        + "  hop/bare  otel/bare  floor/bare  floor+ctx/bare"
    )
    compared = ("hopscope", "otel", "floor", "floor+ctx")
    for i in range(len(result.loads["bare"])):
        cells = "  ".join(f"{result.loads[m][i].rps:14.0f}" for m in MODES)
        hop, otel, floor, ctx = (result.ratio(m)[i] for m in compared)
        print(f"{i + 1:>5}  {cells}  {hop:8.3f}  {otel:9.3f}  {floor:10.3f}  {ctx:14.3f}")
    medians = {m: statistics.median(x.rps for x in result.loads[m]) for m in MODES}
    ratios = {m: statistics.median(result.ratio(m)) for m in compared}
    cells = "  ".join(f"{medians[m]:14.0f}" for m in MODES)
    print(
        f"{'med':>5}  {cells}  {ratios['hopscope']:8.3f}  {ratios['otel']:9.3f}  "
        f"{ratios['floor']:10.3f}  {ratios['floor+ctx']:14.3f}"
    )
    print(
        "  floor: the least any recorder does (three timestamps and a tuple a request, "
        "nothing exported: MinimalASGI/MinimalWSGI); floor+ctx: and the request's context "
        "variable set where the app's code runs, as span() needs"
    )
    print("  medians of rounds: latency, and CPU per request (server processes; collector)")
    for m in MODES:
        loads = result.loads[m]
        p50 = statistics.median(x.p50_ms for x in loads)
        p99 = statistics.median(x.p99_ms for x in loads)
        server_us = statistics.median(x.server_us for x in loads)
        line = f"  {m:<9} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  server CPU {server_us:6.1f} us/req"
        if m == "hopscope":
            collector_us = statistics.median(x.collector_us for x in loads)
            line += f"  collector CPU {collector_us:5.1f} us/req"
        errors = sum(x.errors for x in loads)
        if errors:
            line += f"  ({errors} errors)"
        print(line)
    cpu = {m: statistics.median(x.server_us for x in result.loads[m]) for m in MODES}
    collector_us = statistics.median(x.collector_us for x in result.loads["hopscope"])
    if cpu["bare"] == cpu["bare"]:  # not NaN: /proc was readable
        # What the ratio would be with the server alone on its core (the CPU it spends per
        # request decides its throughput then); the second figure also charges the
        # collector's decoding, as on a machine where all of them share the cores.
        print(
            f"  CPU-based ratios: hopscope {cpu['bare'] / cpu['hopscope']:.3f} "
            f"(with collector {cpu['bare'] / (cpu['hopscope'] + collector_us):.3f}), "
            f"otel {cpu['bare'] / cpu['otel']:.3f}"
        )
    return ratios


def report_in_process(result: InProcess) -> None:
    label = "ASGI (Starlette)" if result.framework == "asgi" else "WSGI (Flask)"
    print(f"\n== in process, {label}: CPU microseconds per request")
    print(f"  {'':<16} {'median':>8} {'best':>8}   {'added (median)':>14} {'added (best)':>12}")
    for name in result.rounds:
        line = f"  {name:<16} {result.us(name):8.2f} {result.us(name, best=True):8.2f}"
        if name != "bare":
            line += f"   {result.added(name):+14.2f} {result.added(name, best=True):+12.2f}"
        print(line)
    if result.dropped:
        print(f"  (the socket sink dropped {result.dropped} records: queue full)")


@contextlib.contextmanager
def cleanup() -> Iterator[None]:
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about a minute)")
    parser.add_argument("--collector", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tail",
        action="store_true",
        help="the collector prints tail lines (to /dev/null) instead of only counting",
    )
    parser.add_argument("--only", choices=("asgi", "wsgi"), help="one framework only")
    parser.add_argument(
        "--in-process-only",
        "--skip-e2e",
        dest="skip_e2e",
        action="store_true",
        help="in-process figures only (no servers, no load generator)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()
    if args.collector:
        collector_main(args.tail)
        return 0
    args.rounds = 2 if args.quick else 5
    args.duration = 1 if args.quick else 3  # whole seconds: wrk takes no fractions
    args.warmup = 1
    args.connections = 16
    n = 5_000 if args.quick else 50_000
    in_rounds = 4 if args.quick else 10
    frameworks = [args.only] if args.only else ["asgi", "wsgi"]

    try:
        from hopscope.tracing import wrap  # noqa: F401
        from opentelemetry.instrumentation import asgi, wsgi  # noqa: F401
        from opentelemetry.sdk import trace  # noqa: F401
    except ImportError as exc:
        print(f"overhead: missing {exc.name}: pip install -e '.[dev,bench]'", file=sys.stderr)
        return 2
    if "wsgi" in frameworks:
        try:
            from hopscope.tracing import wsgi as _  # noqa: F401
        except ImportError:
            print("overhead: hopscope.tracing.wsgi is missing: skipping WSGI", file=sys.stderr)
            frameworks.remove("wsgi")

    wrk = shutil.which("wrk")
    load = run_wrk if wrk else run_python_load
    with cleanup():
        collector = CollectorProcess(args.tail)
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; collector: {collector.kind}"
        )
        if wrk:
            print(f"load: wrk -t1 -c{args.connections} -d{args.duration}s --latency ({wrk})")
        else:
            print(
                f"load: built-in asyncio keep-alive loop, {args.connections} connections "
                f"(wrk not on PATH: absolute figures are lower than wrk's)"
            )
        print(
            f"end to end: {args.rounds} rounds, alternating, order rotated each round, medians; "
            f"in process: {n} requests per variant in {in_rounds} alternating rounds"
        )

        ratios: dict[str, dict[str, float]] = {}
        if not args.skip_e2e:
            for framework in frameworks:
                before = collector.stats()
                ratios[framework] = report_e2e(end_to_end(framework, collector, args, load))
                after = collector.stats()
                print(
                    f"  collector received {after[0] - before[0]} frames, "
                    f"{after[1] - before[1]} events decoded, {after[2] - before[2]} dropped"
                )
        added: dict[str, InProcess] = {}
        for framework in frameworks:
            result = in_process(framework, collector.url, n, in_rounds)
            report_in_process(result)
            added[framework] = result

    print("\n== goals")
    ok = True
    for framework in frameworks:
        if framework in ratios:
            hop, otel = ratios[framework]["hopscope"], ratios[framework]["otel"]
            good = hop >= GOAL_RATIO and hop > otel
            ok &= good
            floor, ctx = ratios[framework]["floor"], ratios[framework]["floor+ctx"]
            print(
                f"  {framework}: hopscope/bare {hop:.3f} (goal >= {GOAL_RATIO}), "
                f"otel/bare {otel:.3f}: {'met' if good else 'MISSED'}; "
                f"floor/bare {floor:.3f}, floor+ctx/bare {ctx:.3f}"
                + (" (the goal is above the floor in this run)" if floor < GOAL_RATIO else "")
            )
        hot = added[framework].added("hopscope/memory")
        total = added[framework].added("hopscope/socket")
        good = hot <= GOAL_ADDED_US
        ok &= good
        print(
            f"  {framework}: in-process added cost {hot:.2f} us/request on the request's path "
            f"(goal <= {GOAL_ADDED_US:g}): {'met' if good else 'MISSED'}; "
            f"{total:.2f} with export to the collector"
        )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("overhead: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, subprocess.SubprocessError, ValueError, TypeError) as exc:
        # wrk failing, a port taken, unreadable output: one line, not a traceback.
        print(f"overhead: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
