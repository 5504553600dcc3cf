"""SocketSink export: requests send their own batches, a sleeping thread covers idle times.

Real collectors on 127.0.0.1 or a Unix socket (some that misbehave on purpose) and real
uvicorn servers; every wait is bounded and ends by itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
from frames import ThreadCollector, listener
from hopscope.tracing import wrap
from hopscope.tracing.records import Record, expand
from hopscope.tracing.sinks import SocketSink
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from test_sinks import _fork_child

Serve = Callable[[Any], AbstractContextManager[str]]


def _unix_collector(where: Path) -> tuple[ThreadCollector, str]:
    collector = ThreadCollector(listener(f"unix:{where / 'c.sock'}"))
    return collector, collector.url


def _tick(i: int, pad: bytes = b"") -> Record:
    return ("p", i, 1, 1, "tick", {"pad": pad} if pad else None)


def test_the_emitting_thread_sends_batches_itself(short_dir: Path) -> None:
    collector, url = _unix_collector(short_dir)
    # The background thread connects, then sleeps for a minute: whatever arrives before
    # close() was sent by the thread that emitted.
    sink = SocketSink(url, interval=60, flush_at=10)
    try:
        sink.emit(_tick(0))
        # Record 0 arrived: the thread's first drain is over (its lock free), it sleeps.
        assert collector.wait_for(lambda: len(collector.records) == 1)
        for i in range(1, 100):
            sink.emit(_tick(i))
        assert collector.wait_for(lambda: len(collector.records) >= 90)
        assert len(sink._queue) < 10
    finally:
        sink.close()
        collector.stop()
    assert [record[1] for record in collector.records] == list(range(100))  # close sent the rest
    assert collector.dropped == 0 and sink.dropped == 0


def test_a_small_queue_is_sent_before_it_fills(short_dir: Path) -> None:
    collector, url = _unix_collector(short_dir)
    sink = SocketSink(url, interval=60, max_queue=8)
    try:
        sink.emit(_tick(0))
        # As above: were the thread still draining, emits would only queue, and drop.
        assert collector.wait_for(lambda: len(collector.records) == 1)
        for i in range(1, 100):
            sink.emit(_tick(i))
        assert sink.dropped == 0
    finally:
        sink.close()
        collector.stop()
    assert [record[1] for record in collector.records] == list(range(100))


def test_a_collector_that_stops_reading_never_blocks_the_app_and_drops_are_counted(
    short_dir: Path,
) -> None:
    collector, url = _unix_collector(short_dir)
    max_pending = 256 * 1024
    sink = SocketSink(url, interval=60, flush_at=16, max_pending=max_pending)
    pad = b"x" * 4096
    emitted = 0
    try:
        sink.emit(_tick(emitted))
        emitted += 1
        # Record 0 arrived: the background thread's first drain is over and it sleeps
        # (a minute), so the emitting thread below sends, and drops, by itself.  (Were
        # the thread still draining, its lock held, requests would only queue.)
        assert collector.wait_for(lambda: len(collector.records) == 1)
        collector.paused.set()
        # Far more than the socket's buffers and max_pending hold: the emitting thread
        # goes on, drops whole batches and counts them.
        done = threading.Event()

        def app_thread() -> None:
            nonlocal emitted
            for _ in range(5000):
                sink.emit(_tick(emitted, pad))
                emitted += 1
                assert sink._pending_bytes <= 2 * max_pending  # at most one frame more
            done.set()

        worker = threading.Thread(target=app_thread, daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert done.is_set(), "emitting waited for the collector"
        assert sink.dropped > 0
        assert sink.connects == 1  # a full socket is not a broken one
        collector.paused.clear()
        for _ in range(20):  # after it reads again, records and the drop count arrive
            sink.emit(_tick(emitted))
            emitted += 1
        sink.flush(timeout=10)
    finally:
        sink.close()
        collector.stop()
    # Every record either arrived or was counted as dropped, and the count arrived too.
    assert len(collector.records) + sink.dropped == emitted
    assert collector.dropped == sink.dropped
    numbers = [record[1] for record in collector.records]
    assert numbers == sorted(numbers) and numbers[-1] == emitted - 1


def test_collector_restart_while_requests_send(
    free_port: Callable[[], int],
) -> None:
    port = free_port()

    def listen() -> ThreadCollector:
        return ThreadCollector(listener(str(port)))

    first = listen()
    sink = SocketSink(f"tcp://127.0.0.1:{port}", interval=0.02, flush_at=2)
    try:
        for i in range(10):
            sink.emit(_tick(i))
        assert first.wait_for(lambda: len(first.records) >= 8)
        first.stop(force=True)  # closes the listener and the connection
        for i in range(10, 1000):  # sends fail or go nowhere: never an exception here
            sink.emit(_tick(i))
        second = listen()
        try:
            n = 1000
            while not second.wait_for(lambda: any(r[1] >= 1000 for r in second.records), 0.2):
                assert n < 100_000, "the sink never reconnected"
                for _ in range(3):
                    sink.emit(_tick(n))
                    n += 1
        finally:
            second.stop(force=True)
    finally:
        sink.close()
    assert sink.connects == 2


def _slow_app(release: threading.Event) -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def slow(request: Request) -> PlainTextResponse:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return PlainTextResponse("slow")

    return Starlette(routes=[Route("/hello", hello), Route("/slow", slow)])


def _starts(records: list[Record]) -> list[str]:
    """Span start names, whether a request came whole ("r") or in pieces."""
    names = []
    for record in records:
        for part in expand(record) if record[0] == "r" else [record]:
            if part[0] == "s":
                names.append(part[6])
    return names


def _ends(records: list[Record]) -> int:
    return sum(
        part[0] == "e"
        for record in records
        for part in (expand(record) if record[0] == "r" else [record])
    )


def test_an_idle_app_still_delivers_its_last_requests_and_running_ones(
    serve_asgi: Serve, short_dir: Path
) -> None:
    collector, url = _unix_collector(short_dir)
    release = threading.Event()
    # Far fewer requests than flush_at: only the background thread can send them.
    sink = SocketSink(url, interval=0.05, flush_at=1000)
    try:
        with (
            serve_asgi(wrap(_slow_app(release), sink=sink, capture_logs=False)) as base,
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            for _ in range(3):
                assert client.get("/hello").status_code == 200
            assert collector.wait_for(lambda: _starts(collector.records).count("GET /hello") == 3)
            assert _ends(collector.records) == 3

            slow = threading.Thread(target=client.get, args=("/slow",), daemon=True)
            slow.start()
            # Still running: its start is visible, not its end.
            assert collector.wait_for(lambda: "GET /slow" in _starts(collector.records))
            assert _ends(collector.records) == 3
            release.set()
            slow.join(timeout=15)
            assert collector.wait_for(lambda: _ends(collector.records) == 4)
    finally:
        release.set()
        sink.close()
        collector.stop()
    assert _starts(collector.records).count("GET /slow") == 1
    assert sink.dropped == 0


def test_busy_app_sends_from_the_request_path(serve_asgi: Serve, short_dir: Path) -> None:
    collector, url = _unix_collector(short_dir)
    sink = SocketSink(url, interval=60, flush_at=8)  # the thread only connects
    release = threading.Event()
    release.set()
    try:
        with (
            serve_asgi(wrap(_slow_app(release), sink=sink, capture_logs=False)) as base,
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            assert client.get("/hello").status_code == 200
            # The first request's records arrived: the thread's first drain is over.
            assert collector.wait_for(lambda: sink.connects == 1 and collector.records != [])
            for _ in range(40):
                assert client.get("/hello").status_code == 200
            assert collector.wait_for(lambda: _ends(collector.records) >= 32)
    finally:
        sink.close()
        collector.stop()
    assert _ends(collector.records) == 41  # close() sent the rest
    assert sink.dropped == 0


def test_forked_worker_gets_its_own_connection_and_queue(short_dir: Path) -> None:
    collector, url = _unix_collector(short_dir)
    # The parent's records are queued (nothing sends them before close): a forked
    # worker must neither send them again nor write into the parent's connection.
    sink = SocketSink(url, interval=60, flush_at=1000)
    try:
        sink.emit(("s", 0, 1, 1, 0, "app", "parent", 1, None))
        assert collector.wait_for(lambda: sink.connects == 1)
        for i in range(1, 50):
            sink.emit(("s", i, 1, 1 + i, 0, "app", "parent", 1, None))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:
            _fork_child(sink)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        sink.close()
        collector.stop()
    by_pid: dict[int, list[Record]] = {}
    for info, _, batch in collector.frames:
        by_pid.setdefault(info["process.pid"], []).extend(batch)
    assert sorted(by_pid) == sorted([os.getpid(), pid])
    assert [r[1] for r in by_pid[os.getpid()]] == list(range(50))
    assert [r[1] for r in by_pid[pid]] == list(range(50))
    assert {r[6] for r in by_pid[pid]} == {"child"}


def test_what_waits_at_exit_is_sent(short_dir: Path) -> None:
    collector, url = _unix_collector(short_dir)
    program = (
        "import sys\n"
        "from hopscope.tracing.sinks import SocketSink\n"
        "sink = SocketSink(sys.argv[1], interval=60)\n"
        "for i in range(10):\n"
        "    sink.emit(('p', i, 1, 1, 'tick', None))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", program, url], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    finally:
        collector.stop()
    assert [record[1] for record in collector.records] == list(range(10))
