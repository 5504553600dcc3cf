"""Sinks: where records go, without ever making the app wait.

The hot path calls :meth:`Sink.emit`, which appends to a bounded queue and returns.  A
full queue drops the record and counts it; the count travels with the next batch, so a
viewer can say how much it did not see.  Who drains the queue depends on the sink: a
:class:`FileSink` has a background thread (every ``interval`` seconds, sooner when
:data:`WAKE_AT` records wait), because JSON encoding costs too much for a request's
thread; a :class:`SocketSink` ships marshalled records, cheap enough that a request
sends a batch itself now and then (non-blocking), and its thread mostly sleeps (see
there why).

Middlewares hand over a whole request instead (:meth:`Sink.start_live` with a
:class:`Recording`): the request's thread only fills the recording in, and the drain
makes its records.  A request over before the next drain then travels as one ``"r"``
record; one still running shows its span start and events so far at each drain, so a
live viewer sees it within an interval, as it did when every event was its own record.
"""

from __future__ import annotations

import atexit
import marshal
import os
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from .records import (
    Record,
    item_records,
    process_info,
    request_end,
    request_start,
    safe_repr,
    to_events,
    unshowable,
)
from .tracefile import TraceFileWriter

__all__ = [
    "FileSink",
    "MemorySink",
    "Recording",
    "Sink",
    "SocketSink",
    "default_sink",
    "parse_address",
    "sink_from_url",
]

#: Records a queue holds before it drops (about 30 MB at worst for ordinary requests).
DEFAULT_MAX_QUEUE = 65_536
#: Records per frame on the wire (and per write to a file).
BATCH = 4096
#: Queued records that wake the draining thread before its interval is up.  Whatever
#: waits in the queue is alive, and the garbage collector walks what is alive: drained
#: in small batches, records are freed young instead of piling up into the older
#: generations, whose collections then walk every object of the app.
WAKE_AT = 256
#: Records a :class:`Recording` keeps for its request; past this they go to the sink.
RECORDING_ITEMS = 4096
#: Running requests a sink follows at most.  A response nobody closes (a test client
#: that never reads it, a leaked iterator) never ends: past this many, the oldest are let
#: go (what they recorded so far was sent; they count as dropped) so memory stays bounded.
MAX_INFLIGHT = 10_000
#: Queued records that make the next request's thread send them (:class:`SocketSink`):
#: often enough that what waits is young and few (still in the CPU's caches when it is
#: marshalled: 128 cost less per request than 256 or 1024 here), seldom enough that the
#: cost of a send is shared by many requests.
FLUSH_AT = 128
#: Bytes of frames a :class:`SocketSink` keeps while the collector reads slower than the
#: app records; past them batches are dropped (and counted) instead of waited for.
MAX_PENDING = 8 << 20

WIRE_MAGIC = b"HOPSCOPE/1\n"
_FRAME = struct.Struct("!I")
#: Bytes a frame's payload may have: a collector closes the connection of a peer that
#: sends more (no honest batch comes near it), so a sink never does.
MAX_FRAME = 64 * 1024 * 1024


class Sink:
    """What every sink offers: ``emit`` (hot path), ``dropped``, ``flush`` and ``close``."""

    __slots__ = ()

    dropped: int = 0

    def emit(self, record: Record) -> None:
        raise NotImplementedError

    def start_live(self, recording: Recording) -> bool:
        """Take a request being recorded, to make its records later (see
        :class:`Recording`).  False when this sink cannot: the recording then emits its
        records itself, each as it happens."""
        return False

    def flush(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (best effort within ``timeout``)."""

    def close(self) -> None:
        """Flush and stop; later records are dropped."""


class Recording(Sink):
    """One request as a middleware records it, filled in by the request's thread.

    The middleware sets the fields below, appends what happens to ``items`` (see the
    ``"r"`` record in :mod:`~hopscope.tracing.records`), publishes the span's end by
    setting ``end`` (or what :meth:`end_fields` reads) and then ``end_at``, and closes
    it with :meth:`seal` once nothing more will come.  It never emits: the sink that
    took it (:meth:`Sink.start_live`) calls :meth:`take` from its draining thread,
    which makes records of what is new.
    Every field is written by one thread and read by the other only after the write
    that publishes it, so no lock is needed.

    While its request runs a recording is also the sink of the request's
    :class:`~hopscope.tracing.context.SpanContext`: logs and user spans then land in
    ``items`` in the order they happened among the middleware's own events.
    """

    __slots__ = (
        "_state",
        "done",
        "end",
        "end_at",
        "items",
        "parent_id",
        "request",
        "sink",
        "span_id",
        "start",
        "thread_id",
        "trace_id",
    )

    #: Which ``"r"`` layout ``request`` and ``end`` follow ("asgi" or "wsgi").
    interface: str = ""

    sink: Sink
    start: int
    trace_id: int
    span_id: int
    parent_id: int
    thread_id: int
    request: Any
    items: list[Any]
    end_at: int
    end: Any
    done: bool
    #: The taker's cursor: -1 before anything was sent, else ``2 * items sent + end sent``.
    _state: int

    # -- the request's side ------------------------------------------------------
    def emit(self, record: Record) -> None:
        """A record made inside the request (a log, a user span): kept in order."""
        items = self.items
        if self.done or len(items) >= RECORDING_ITEMS:
            self.sink.emit(record)
            return
        items.append(record)
        if self.done:
            self._late(record)

    def _late(self, record: Record) -> None:
        # Another thread sealed the items while this record went in: a record that
        # landed after the seal is no longer the recording's to send.
        items = self.items
        try:
            seal = items.index(None)
        except ValueError:
            return  # not sealed yet: the record is before the seal
        if any(item is record for item in items[seal + 1 :]):
            self.sink.emit(record)

    def flush(self, timeout: float = 5.0) -> None:
        self.sink.flush(timeout)

    def seal(self) -> None:
        """Nothing more will be added: the taker may send the rest and let go."""
        self.done = True
        items = self.items
        items.append(None)
        if type(items) is _EagerItems:
            items._recording = None  # all is sent: no cycle left for the collector

    def go_eager(self) -> Sink:
        """For sinks that do not take recordings: emit each record as it is made."""
        self._state = -1
        self.items = _EagerItems(self)
        self.push()
        return self.sink

    def push(self) -> None:
        records: list[Record] = []
        self.take(records)
        emit = self.sink.emit
        for record in records:
            emit(record)

    # -- the taker's side -----------------------------------------------------------
    def _whole(self, end_at: int, items: list[Any]) -> Record:
        """The ``"r"`` record of a request over before its first take."""
        return (
            "r",
            self.start,
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.thread_id,
            self.interface,
            self.request_fields(),
            end_at,
            self.end_fields() if end_at >= 0 else None,
            items,
        )

    def take(self, out: list[Record]) -> bool:
        """Append the records of what is new since the last take; True once all is sent."""
        if self._state < 0 and self.done:
            # What _collect does for a request over before its first take (nearly every
            # one), without the call and the cursor arithmetic.
            items = self.items
            size = len(items) - 1
            if size >= 0 and items[size] is None:
                end_at = self.end_at
                if end_at > size:
                    end_at = -1
                out.append(self._whole(end_at, items))
                self._state = 1
                return True
        self._state, finished = self._collect(self._state, out)
        return finished

    def end_fields(self) -> Any:
        """The ``end`` tuple of the ``"r"`` layout, once ``end_at`` is set."""
        return self.end

    def request_fields(self) -> Any:
        """The ``request`` tuple of the ``"r"`` layout (a recording may keep something
        cheaper to take on the request's thread, and derive this when first asked)."""
        return self.request

    def snapshot(self) -> list[Record]:
        """The records of everything so far, as a first take would make them now."""
        out: list[Record] = []
        self._collect(-1, out)
        return out

    def _published(self) -> tuple[bool, list[Any], int, int]:
        """``(done, items, size, end_at)`` as the request's thread published them, read
        in the order it writes them (done, then items, then end): ``size`` counts the
        items before the seal, ``end_at`` is -1 until the end is among them."""
        done = self.done
        items = self.items
        size = len(items)
        if done:
            if size and items[size - 1] is None:
                size -= 1
            else:
                try:
                    size = items.index(None)
                except ValueError:
                    done = False  # sealing under way: the seal is not in yet
        end_at = self.end_at
        if end_at > size or end_at < 0:
            end_at = -1  # ended after the items were read (next time), or not yet
        return done, items, size, end_at

    def _collect(self, state: int, out: list[Record]) -> tuple[int, bool]:
        done, items, size, end_at = self._published()
        if state < 0:
            if done:
                out.append(self._whole(end_at, items))
                return 1, True
            out.append(
                request_start(
                    self.interface,
                    self.start,
                    self.trace_id,
                    self.span_id,
                    self.parent_id,
                    self.thread_id,
                    self.request_fields(),
                )
            )
            state = 0
        cursor, end_sent = state >> 1, state & 1
        trace_id, span_id = self.trace_id, self.span_id
        if end_at >= 0 and not end_sent:
            if cursor < end_at:
                cursor = item_records(items, cursor, end_at, trace_id, span_id, out)
            out.append(request_end(self.interface, trace_id, span_id, self.end_fields()))
            end_sent = 1
        cursor = item_records(items, cursor, size, trace_id, span_id, out)
        return cursor << 1 | end_sent, done


class _EagerItems(list[Any]):
    """A recording's items that emit at once what they make (sinks without a drain)."""

    __slots__ = ("_recording",)

    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self._recording: Recording | None = recording

    def append(self, item: Any) -> None:
        super().append(item)
        if self._recording is not None:
            self._recording.push()

    def __bool__(self) -> bool:
        # True even when empty: a middleware that keeps an event out of empty items
        # (the ASGI response start) appends it here, where appending sends it at once.
        return True


class MemorySink(Sink):
    """Keeps records in process, for tests and embedding.

    Bounded like every sink: past ``max_records`` new records are dropped and counted.
    """

    def __init__(self, max_records: int = 1_000_000) -> None:
        self._records: deque[Record | Recording] = deque()
        self._max = max_records
        self.dropped = 0
        #: Requests left out because no record could be made of them (see records()).
        self._unrecordable = 0

    def emit(self, record: Record) -> None:
        if len(self._records) < self._max:
            self._records.append(record)
        else:
            self.dropped += 1

    def start_live(self, recording: Recording) -> bool:
        if len(self._records) < self._max:
            self._records.append(recording)
            return True
        return False

    def records(self) -> list[Record]:
        """What was recorded so far; a request appears as it would at a drain now: one
        ``"r"`` record once it is over, its start and events so far while it runs.

        A request no record can be made of (raw values from an odd server) is left out
        and counted as dropped, once, as a draining sink loses it: the others are
        returned."""
        out: list[Record] = []
        for item in list(self._records):
            if isinstance(item, Recording):
                try:
                    out.extend(item.snapshot())
                except Exception:
                    self._unrecordable_request(item)
            else:
                out.append(item)
        return out

    def _unrecordable_request(self, recording: Recording) -> None:
        try:
            self._records.remove(recording)
        except ValueError:
            return  # another call (or clear()) let it go already
        self.dropped += 1
        self._unrecordable += 1

    def events(self) -> list[dict[str, Any]]:
        """The wire events of what was recorded so far; a record that cannot be made
        into events (or a request no record can be made of) is left out and counted in
        a leading ``dropped`` event, as the other sinks write it (the rest are
        returned)."""
        info = process_info(os.getpid())
        events: list[dict[str, Any]] = []
        records = self.records()
        unreadable = self._unrecordable  # requests records() left out, so far
        for record in records:
            try:
                events += to_events(record, info)
            except Exception:
                unreadable += 1
        if unreadable:
            events.insert(0, dropped_event(unreadable, info))
        return events

    def traces(self) -> list[Any]:
        """The traces recorded so far, assembled (oldest first)."""
        from .model import assemble

        return assemble(self.events())

    def clear(self) -> None:
        self._records.clear()
        self.dropped = 0
        self._unrecordable = 0


_live_sinks: weakref.WeakSet[_BatchingSink] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for sink in list(_live_sinks):
        sink._after_fork()


def _close_all() -> None:
    """At exit: close every sink (each delivers what it can, up to its timeout), and say
    on stderr, in one line per sink, how many dropped records no collector will hear of
    (see :meth:`SocketSink.exit_note`): at exit nobody else can read ``dropped``."""
    for sink in list(_live_sinks):
        sink.close()
        note = sink.exit_note()
        if note:
            try:
                sys.stderr.write(note + "\n")
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):  # stderr closed or gone
                pass


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_close_all)


class _BatchingSink(Sink):
    """A bounded queue drained by a lazily started background thread.

    The thread starts on the first record, per process: a forked worker gets an empty
    queue and its own thread, so records are neither lost nor written twice.
    """

    def __init__(self, *, max_queue: int = DEFAULT_MAX_QUEUE, interval: float = 0.05) -> None:
        self._queue: deque[Record | Recording] = deque()
        # Requests seen by a drain while they ran: each drain sends what they did since.
        # Only the draining thread touches this list (it replaces it, never mutates it).
        self._inflight: list[Recording] = []
        self._max = max_queue
        self._interval = interval
        self.dropped = 0
        self._unreported = 0
        self._drop_lock = threading.Lock()
        self._start_lock = threading.Lock()
        # Held while a batch is taken and written, so flush() can wait for the batch
        # in flight and two drainers never race for the same queue.
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: The thread started and the sink is not closed (one test on the hot path).
        self._running = False
        self._pid = os.getpid()
        _live_sinks.add(self)

    # -- hot path ---------------------------------------------------------------
    def emit(self, record: Record) -> None:
        queue = self._queue
        waiting = len(queue)
        if waiting < self._max and not self._closed:
            queue.append(record)
            if self._thread is None:
                self._start()
            elif waiting == WAKE_AT:
                self._wake.set()
        else:
            self._count_dropped(1)

    def start_live(self, recording: Recording) -> bool:
        queue = self._queue
        waiting = len(queue)
        if waiting < self._max and not self._closed:
            queue.append(recording)
            if self._thread is None:
                self._start()
            elif waiting == WAKE_AT:
                self._wake.set()
            return True
        return False

    # -- plumbing ---------------------------------------------------------------
    def _count_dropped(self, count: int) -> None:
        with self._drop_lock:
            self.dropped += count
            self._unreported += count

    def _lost(self, records: int, reported: int) -> None:
        """A batch that could not be delivered: its records are dropped, and the drop
        count it carried (already counted) goes with the next batch instead."""
        with self._drop_lock:
            self.dropped += records
            self._unreported += records + reported

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(
                    target=self._run, name=f"hopscope-{type(self).__name__}", daemon=True
                )
                self._thread = thread
                thread.start()
                self._running = not self._closed

    def _after_fork(self) -> None:
        self._queue.clear()
        self._inflight = []
        self._drop_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._running = False
        self._unreported = 0
        self._pid = os.getpid()
        self._forked()

    def _forked(self) -> None:
        """Drop per-process resources (sockets) the parent owns."""

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            self._drain()
        self._drain()

    def _ready(self) -> bool:
        """False while the destination is unreachable: records then wait in the queue."""
        return True

    def _drain(self) -> None:
        with self._drain_lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        queue = self._queue
        if not (queue or self._unreported or self._inflight) or not self._ready():
            return
        # Requests still running at the previous drain go first: they started earlier.
        records: list[Record] = []
        inflight: list[Recording] = []
        for recording in self._inflight:
            if not self._take(recording, records):
                inflight.append(recording)
        while True:
            pop = queue.popleft
            while queue and len(records) < BATCH:
                item = pop()
                if isinstance(item, Recording):
                    # _take inline: one call less per request (this is every request).
                    try:
                        finished = item.take(records)
                    except Exception:
                        self._count_dropped(1)
                        finished = True
                    if not finished:
                        inflight.append(item)
                else:
                    records.append(item)
            if len(inflight) > MAX_INFLIGHT:
                self._count_dropped(len(inflight) - MAX_INFLIGHT)
                del inflight[:-MAX_INFLIGHT]
            self._inflight = inflight
            batch, records = records[:BATCH], records[BATCH:]
            with self._drop_lock:
                dropped, self._unreported = self._unreported, 0
            if not batch and not dropped:
                return
            try:
                self._write(batch, dropped)
            except Exception:
                self._lost(len(batch) + len(records), dropped)
                self._failed()
                return
            if not (records or queue):
                return  # drops counted meanwhile go with the next batch
            if not self._ready():
                self._count_dropped(len(records))
                return

    def _take(self, recording: Recording, records: list[Record]) -> bool:
        try:
            return recording.take(records)
        except Exception:
            # Raw values a record could not be made of (a server's odd environ): the
            # request is lost and counted, the draining thread carries on.
            self._count_dropped(1)
            return True

    def _write(self, batch: list[Record], dropped: int) -> None:
        raise NotImplementedError

    def _failed(self) -> None:
        """A write failed: the batch was counted as dropped."""

    def flush(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        if self._thread is None or not self._thread.is_alive():
            self._drain()
            return
        while (self._queue or self._ending()) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.005)
        # The last batch may have left the queue but not reached its destination yet.
        if self._drain_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._drain_lock.release()

    def _ending(self) -> bool:
        """A request a drain saw running has ended since: its end is still to be sent."""
        return any(recording.done for recording in self._inflight)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._running = False
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._last_drain_at_close(thread)
        self._closed_hook()

    def _last_drain_at_close(self, thread: threading.Thread | None) -> None:
        """What is still queued once the thread is gone (a thread still draining keeps it)."""
        if thread is None or not thread.is_alive():
            self._drain()

    def _closed_hook(self) -> None:
        pass

    @property
    def unreported(self) -> int:
        """Of the records counted in ``dropped``, how many no frame or line has reported
        yet (after :meth:`close`: how many nobody will hear of)."""
        return self._unreported

    def exit_note(self) -> str:
        """The line to say at exit about drops nobody heard of ("" for none)."""
        return ""


class FileSink(_BatchingSink):
    """Writes a versioned JSON Lines trace file (mode 0600).

    The file is opened for appending so that forked workers sharing one sink add whole
    lines without overwriting each other.  ``append=True`` keeps an existing trace and
    writes the header only into an empty file: that is how ``HOPSCOPE_SINK=file:PATH``
    opens it, because each worker of a multi-process server makes its own sink and must
    not wipe what its siblings wrote.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        append: bool = False,
        summaries: bool = True,
        **kwargs: Any,
    ) -> None:
        self.path = Path(path)
        # Summary lines by default: a file is written to be looked at, and without them
        # ``hopscope view`` folds every event (some 15 s of CPU for 100,000 requests
        # against 1.5 s).  They cost the sink's thread some two thirds as much again as
        # writing the lines (never the request's thread); ``summaries=False`` saves that.
        self._writer = TraceFileWriter.create(self.path, append=append, summaries=summaries)
        super().__init__(**kwargs)

    def _forked(self) -> None:
        # The parent sums up the traces it was writing; the child starts with none.
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.forget()

    def _write(self, batch: list[Record], dropped: int) -> None:
        info = process_info(os.getpid())
        events: list[dict[str, Any]] = []
        unreadable = 0
        for record in batch:
            try:
                events += to_events(record, info)
            except Exception:
                # A record that cannot be made into events is dropped, and counted in
                # this batch's line: the other requests of the batch are written.
                unreadable += 1
        if unreadable:
            with self._drop_lock:
                self.dropped += unreadable
            dropped += unreadable
        if dropped:
            events.insert(0, dropped_event(dropped, info))
        self._writer.write(events)

    def _closed_hook(self) -> None:
        try:
            self._writer.close()
        except OSError:
            pass


def dropped_event(count: int, info: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "dropped", "ts": time.time_ns(), "count": count, "attrs": dict(info)}


def parse_address(address: str) -> tuple[str, Any]:
    """``tcp://HOST:PORT``, ``HOST:PORT``, ``:PORT`` or ``unix:PATH`` -> (family, address)."""
    if address.startswith("unix:"):
        path = address[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"no socket path in {address!r}")
        return "unix", path
    rest = address[6:] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if sep and port.isascii() and port.isdigit() and int(port) > 65535 and "/" not in host:
        raise ValueError(f"port {int(port)} is out of range (0-65535) in {address!r}")
    valid_port = port.isascii() and port.isdigit()
    if not sep or not valid_port or "/" in host:
        raise ValueError(f"expected HOST:PORT, tcp://HOST:PORT or unix:PATH, got {address!r}")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


class SocketSink(_BatchingSink):
    """Streams records to a collector (``hopscope tail --listen``) over TCP or a Unix socket.

    Records travel as marshalled batches, undecoded: the collector process does the
    encoding work, so the app's process spends as little CPU on export as it can.

    Why no draining thread while the app is busy: a second thread that wakes to drain
    takes the GIL from the request's thread every time that one makes a system call,
    and under load those hand-offs cost the app more than the draining itself.  So the
    request that finds :data:`FLUSH_AT` records queued sends them itself, before it
    queues its own: it marshals the batch and hands it to a non-blocking socket.  What
    the socket does not take at once waits, up to ``max_pending`` bytes, for the next
    send; past that, batches are dropped and counted, and the request never waits.  A
    request that finds another thread sending skips, and the next one sends.

    A background thread still wakes every ``interval`` seconds, and otherwise sleeps:
    when no request sent for half an interval (an idle app, a slow trickle) it sends
    what waits, so the last requests, and the ones still running (their start and
    events so far), reach the collector within 1.5 intervals; it is also the only
    thread that connects, with exponential backoff, so a request never waits for a
    connection.  While the collector is unreachable records wait in the bounded queue
    (then drop, counted); frames still waiting when a connection fails are counted as
    dropped, and the drops they reported go with the first frame on the next one.
    :meth:`flush` and :meth:`close` (at exit too) do wait for the socket, up to their
    timeout; what :meth:`close` could not deliver by then (frames still waiting, records
    still queued) is counted as dropped too, in ``dropped`` and ``unreported``, and at
    exit said in one ``hopscope:`` line on stderr (see :meth:`exit_note`).
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:7401",
        *,
        interval: float = 0.05,
        flush_at: int = 0,
        max_pending: int = MAX_PENDING,
        **kwargs: Any,
    ) -> None:
        self.family, self.address = parse_address(address)
        self._sock: socket.socket | None = None
        # Frames (or the unsent end of one) the socket did not take yet, oldest first,
        # each with the number of records it carries and the drops it reports: if it is
        # lost, its records are counted as dropped and its drops reported again.
        self._pending: deque[tuple[memoryview, int, int]] = deque()
        self._pending_bytes = 0
        self._max_pending = max_pending
        self._flush_at = flush_at or FLUSH_AT
        self._backoff = 0.05
        self._next_try = 0.0
        self._last_drain = 0.0
        self._info: dict[str, Any] = {}
        self._connect_lock = threading.Lock()
        self.connects = 0
        #: This process connected at least once (``connects`` counts the parent's too).
        self._connected_here = False
        self._url = address
        super().__init__(interval=interval, **kwargs)
        # A small queue must be sent before it is full, or a busy app would drop records
        # while the collector listens.
        self._flush_at = max(1, min(self._flush_at, self._max // 2))

    # -- hot path ---------------------------------------------------------------
    def emit(self, record: Record) -> None:
        if not self.start_live(record):
            self._count_dropped(1)

    def start_live(self, recording: Recording | Record) -> bool:
        """Queue ``recording`` (or, from :meth:`emit`, a record), sending what waits first
        when enough does; False when it cannot be queued."""
        queue = self._queue
        if len(queue) < self._flush_at and self._running:
            # Nearly every request: nothing to send yet, the thread runs, not closed.
            queue.append(recording)
            return True
        waiting = len(queue)
        if waiting >= self._flush_at and self._sock is not None:
            self._send_here()
            waiting = len(queue)
        if waiting < self._max and not self._closed:
            queue.append(recording)
            if self._thread is None:
                self._start()
            return True
        return False

    def _send_here(self) -> None:
        # Never wait for the lock: whoever holds it is sending this very queue.
        lock = self._drain_lock
        if lock.acquire(False):
            try:
                self._drain_locked()
            finally:
                lock.release()

    # -- sending ----------------------------------------------------------------
    def _ready(self) -> bool:
        return self._sock is not None

    def _drain_locked(self) -> None:
        self._last_drain = time.monotonic()
        sock = self._sock
        if sock is not None and _peer_closed(sock):
            # A collector that stopped (or was restarted) closed its end: a frame sent now
            # would vanish without an error, so reconnect first and the queue waits.
            self._failed()
            return
        if sock is not None and self._pending:
            try:
                self._push(sock)
            except OSError:
                self._failed()
                return
        super()._drain_locked()

    def _write(self, batch: list[Record], dropped: int) -> None:
        sock = self._sock
        assert sock is not None
        if self._pending and self._pending_bytes >= self._max_pending:
            self._lost(len(batch), dropped)  # not even marshalled
            return
        frame, unsent = _encode_frame(batch, dropped, self._info)
        if len(frame) - _FRAME.size > MAX_FRAME:
            # A collector refuses such a frame, and the connection with it: a record
            # with a huge attribute would cost every other request of its batch.
            frames, unsent = _frames_within(batch, dropped, self._info, MAX_FRAME)
        else:
            frames = [(frame, len(batch) - unsent, dropped + unsent)]
        if unsent:  # reported in a frame: counted here, not again with the next
            with self._drop_lock:
                self.dropped += unsent
        bound = True
        for frame, count, carried in frames:
            try:
                self._send_frame(sock, frame, count, carried, bound)
            except OSError:
                # Nothing of this frame went (send raises only then), and the frames
                # before it went whole: this one and the rest are lost, nothing more.
                at = [entry[0] for entry in frames].index(frame)
                for _, count, carried in frames[at:]:
                    self._lost(count, carried)
                self._failed()
                return
            bound = False  # the rest of a split batch is kept as its one frame would be

    def _send_frame(
        self, sock: socket.socket, frame: bytes, count: int, carried: int, bound: bool
    ) -> None:
        """Send ``frame`` (``count`` records, ``carried`` drops reported) or keep it
        (within ``max_pending`` if ``bound``)."""
        if self._pending:
            # Frames go out whole and in order: this one waits behind the others.
            if bound and self._pending_bytes + len(frame) > self._max_pending:
                self._lost(count, carried)
            else:
                self._pending.append((memoryview(frame), count, carried))
                self._pending_bytes += len(frame)
            return
        try:
            sent = sock.send(frame, _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(frame):
            if sent == 0 and len(frame) > self._max_pending:
                self._lost(count, carried)
                return
            # Begun frames must be finished, or the stream would be garbage: the rest
            # is kept even past max_pending (so at most one frame over it).
            rest = memoryview(frame)[sent:]
            self._pending.append((rest, count, carried))
            self._pending_bytes += len(rest)

    def _push(self, sock: socket.socket) -> bool:
        """Send what is pending, as far as the socket takes it now; True when all went."""
        pending = self._pending
        while pending:
            try:
                sent = sock.sendmsg([entry[0] for entry in list(pending)[:64]], (), _NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False
            while sent:
                view, count, carried = pending[0]
                if sent >= len(view):
                    pending.popleft()
                    sent -= len(view)
                    self._pending_bytes -= len(view)
                else:
                    pending[0] = (view[sent:], count, carried)
                    self._pending_bytes -= sent
                    sent = 0
        return True

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _failed(self) -> None:
        """The connection failed: what is pending never arrives whole (the collector
        throws away a frame cut short), so its records are counted as dropped and the
        drops its frames reported go with the first frame on the next connection.  A
        frame the socket took whole is the kernel's: it is not counted again."""
        self._drop_socket()
        records = reported = 0
        for _, count, carried in self._pending:
            records += count
            reported += carried
        self._pending.clear()
        self._pending_bytes = 0
        if records or reported:
            self._lost(records, reported)
        self._next_try = time.monotonic() + self._backoff

    # -- the background thread ----------------------------------------------------
    def _run(self) -> None:
        interval = self._interval
        while not self._closed:
            # Under load the requests send, and this thread only looks at the clock: it
            # sends only when no request did for half an interval.
            if (
                self._connect_when_due(2.0)
                and (self._queue or self._inflight or self._unreported or self._pending)
                and time.monotonic() - self._last_drain >= interval / 2
            ):
                self._drain()
            self._wake.wait(interval)
            self._wake.clear()

    def _connect(self, timeout: float = 2.0) -> socket.socket:
        if self.family == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        try:
            sock.connect(self.address)
            sock.sendall(WIRE_MAGIC)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _connect_when_due(self, timeout: float) -> bool:
        """Connect unless the backoff says not yet; True when connected."""
        if self._sock is not None:
            return True
        now = time.monotonic()
        if now < self._next_try or not self._connect_lock.acquire(False):
            return False
        try:
            if self._sock is not None:
                return True  # another thread just connected
            try:
                sock = self._connect(max(0.01, timeout))
            except OSError:
                self._next_try = now + self._backoff
                self._backoff = min(self._backoff * 2, 2.0)
                return False
            self._info = process_info(os.getpid())
            self._backoff = 0.05
            self.connects += 1
            self._connected_here = True
            self._sock = sock
            return True
        finally:
            self._connect_lock.release()

    # -- flush and close ----------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> None:
        """Send what is queued, waiting for the socket (not for the app) up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._closed:
            self._deliver(deadline)
            if not (self._queue or self._pending or self._unreported or self._ending()):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.005, left))

    def _deliver(self, deadline: float) -> None:
        """Connect if due, send what waits and wait for the socket to take it."""
        left = deadline - time.monotonic()
        if self._connect_when_due(min(2.0, left)) and self._drain_lock.acquire(
            timeout=max(0.0, left)
        ):
            try:
                # Pending frames first, so the batches sent now find room.
                self._finish_pending(deadline)
                self._drain_locked()
                self._finish_pending(deadline)
            finally:
                self._drain_lock.release()

    def _finish_pending(self, deadline: float) -> None:
        """With the drain lock held: wait (up to ``deadline``) until the socket took all."""
        while self._pending and (sock := self._sock) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _wait_writable(sock, left)
            if _peer_closed(sock):
                # A collector that stopped: the first send to it would succeed, and the
                # frames vanish uncounted (see _drain_locked).
                self._failed()
                return
            try:
                self._push(sock)
            except OSError:
                self._failed()

    def _last_drain_at_close(self, thread: threading.Thread | None) -> None:
        # One last delivery: at most one connection attempt (if the backoff allows).
        self._deliver(time.monotonic() + 5.0)

    def _forked(self) -> None:
        # The parent's connection is not ours to use or close.
        self._sock = None
        self._connect_lock = threading.Lock()
        self._pending = deque()
        self._pending_bytes = 0
        self._next_try = 0.0
        self._last_drain = 0.0
        self._connected_here = False

    def _closed_hook(self) -> None:
        self._next_try = float("inf")  # closed for good: never connect again
        # Close's last delivery is over (or gave up after its 5 s): what is still here
        # never reaches a collector.  With the drain lock, so that no request's send is
        # under way (one that starts now finds the sink closed).
        locked = self._drain_lock.acquire(timeout=2.0)
        try:
            self._drop_socket()
            if locked:
                self._abandon()
        finally:
            if locked:
                self._drain_lock.release()

    def _abandon(self) -> None:
        """Count as dropped the records of the frames still pending (a frame cut short
        is thrown away by the collector), of the queue and of the requests still
        running, as a failed connection counts its frames: so that records received
        plus drops counted is what the app recorded, also when the collector stopped
        reading or went away before the end."""
        records = reported = 0
        for _, count, carried in self._pending:
            records += count
            reported += carried
        self._pending.clear()
        self._pending_bytes = 0
        left: list[Record] = []
        inflight, self._inflight = self._inflight, []
        for recording in inflight:
            self._take(recording, left)
        queue = self._queue
        while queue:
            item = queue.popleft()
            if isinstance(item, Recording):
                self._take(item, left)
            else:
                left.append(item)
        records += len(left)
        if records or reported:
            self._lost(records, reported)

    def exit_note(self) -> str:
        """One ``hopscope:`` line when records were dropped that no collector heard of
        while this process had found one (it went away, or stopped reading, before the
        app exited).  A process that never found one says nothing: nobody was
        listening, as when no viewer runs."""
        if not (self._unreported and self._connected_here):
            return ""
        return (
            f"hopscope: {self._unreported} record(s) were dropped that the collector at "
            f"{self._url} never heard of (it went away or stopped reading before exit)"
        )


_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _wait_writable(sock: socket.socket, timeout: float) -> None:
    """Wait up to ``timeout`` seconds until ``sock`` takes more bytes.

    ``select.poll`` where there is one (it takes any descriptor number); eventlet's
    monkey-patching removes it, and its green ``select.select`` (no descriptor limit:
    its hub waits) is what is left there.  Looked up at each call: a program may
    monkey-patch after this module was imported."""
    poll = getattr(select, "poll", None)
    if poll is None:
        try:
            select.select((), (sock,), (), timeout)
        except (OSError, ValueError):  # a descriptor past a plain select()'s limit
            time.sleep(min(timeout, 0.005))
        return
    poller = poll()
    poller.register(sock, select.POLLOUT)
    poller.poll(timeout * 1000)


def _peer_closed(sock: socket.socket) -> bool:
    """True when the collector closed the connection (it never sends anything, so the
    socket reads as ended or failed); one non-blocking peek per batch, not per request."""
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def encode_frame(batch: list[Record], dropped: int, info: dict[str, Any]) -> bytes:
    return _encode_frame(batch, dropped, info)[0]


def _encode_frame(batch: list[Record], dropped: int, info: dict[str, Any]) -> tuple[bytes, int]:
    """The frame of ``batch`` and how many of its records it could not carry (counted
    in the frame's dropped count).  Marshalled whole (nearly always); when that fails,
    record by record, so that one record the app filled with what marshal refuses
    costs that record's odd values (or, at worst, that record), never the batch."""
    try:
        payload = marshal.dumps((1, info, dropped, batch))
    except Exception:  # ValueError: unmarshallable or too deep
        records = [_marshallable(r) for r in batch]
        kept = [r for r in records if r is not None]
        lost = len(records) - len(kept)
        payload = marshal.dumps((1, info, dropped + lost, kept))
        return _FRAME.pack(len(payload)) + payload, lost
    return _FRAME.pack(len(payload)) + payload, 0


def _frames_within(
    batch: list[Record], dropped: int, info: dict[str, Any], limit: int
) -> tuple[list[tuple[bytes, int, int]], int]:
    """``batch`` as frames of at most ``limit`` bytes each, ``(frame, records,
    dropped reported)``, and how many records went in none: those that alone are past
    the limit, or cannot be marshalled (only after the batch's frame was too big)."""
    room = limit - 64 * 1024  # for the envelope and the process info
    chunks: list[list[Record]] = []
    chunk: list[Record] = []
    size = unsent = 0
    for record in batch:
        safe = _marshallable(record)
        length = len(marshal.dumps(safe)) if safe is not None else room + 1
        if safe is None or length > room:
            unsent += 1
            continue
        if chunk and size + length > room:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(safe)
        size += length
    chunks.append(chunk)
    frames = []
    carried = dropped + unsent
    for chunk in chunks:
        payload = marshal.dumps((1, info, carried, chunk))
        frames.append((_FRAME.pack(len(payload)) + payload, len(chunk), carried))
        carried = 0
    return frames, unsent


_EXACT = (bool, int, float, str, bytes)
_ARITY = {"s": 9, "e": 5, "p": 6, "c": 10, "r": 11}
#: Containers :func:`_safe` follows inside a record (a request's ``"r"`` record is four
#: deep before its user spans' attributes); deeper ones become their repr or a
#: placeholder, well within marshal's own limit and the collector's recursion limit.
_SAFE_DEPTH = 64


def _marshallable(record: Record) -> Record | None:
    """User attributes may hold any object: fall back to its repr for the wire (None
    when even that cannot be marshalled: the record is then dropped, and counted)."""
    try:
        marshal.dumps([[record]])  # as deep as in a frame: marshal limits the depth
        return record
    except Exception:
        pass
    try:
        safe = tuple(_safe(item, _SAFE_DEPTH) for item in record)
        marshal.dumps([[safe]])
    except Exception:
        return None
    return safe


def _safe(value: Any, depth: int = _SAFE_DEPTH) -> Any:
    if value is None or type(value) in _EXACT:
        return value
    # marshal refuses subclasses such as IntEnum (http.HTTPStatus) and StrEnum.
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if depth <= 0:
        return safe_repr(value)
    if type(value) is tuple:
        # Kept a tuple: the collector tells a record's parts by their types.
        return tuple([_safe(v, depth - 1) for v in value])
    if isinstance(value, list | tuple):
        return [_safe(v, depth - 1) for v in value]
    if isinstance(value, dict):
        return {
            k if type(k) is str else _safe_key(k): _safe(v, depth - 1) for k, v in value.items()
        }
    return safe_repr(value)


def _safe_key(key: Any) -> str:
    try:
        return str(key)
    except Exception:
        return unshowable(key)


def decode_frame(payload: bytes) -> tuple[dict[str, Any], int, list[Record]]:
    """Inverse of :func:`encode_frame`, with the shape checked (marshal data is untrusted):
    a payload that is no batch raises ValueError; a record of no known shape in a batch
    is left out, and counted in the dropped count returned."""
    try:
        data = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        raise ValueError("not a hopscope batch (undecodable payload)") from None
    if not (isinstance(data, tuple) and len(data) == 4 and data[0] == 1):
        raise ValueError("not a hopscope batch")
    _, info, dropped, batch = data
    if not isinstance(info, dict) or not isinstance(dropped, int) or not isinstance(batch, list):
        raise ValueError("malformed hopscope batch")
    for record in batch:
        shape = record[0] if isinstance(record, tuple) and record else None
        if not isinstance(shape, str) or _ARITY.get(shape) != len(record):
            # One record of no known shape costs that record (counted as dropped), not
            # the batch of other requests it came with (nor the connection).
            kept = [r for r in batch if _well_shaped(r)]
            return info, dropped + len(batch) - len(kept), kept
    return info, dropped, batch


def _well_shaped(record: Any) -> bool:
    shape = record[0] if isinstance(record, tuple) and record else None
    return isinstance(shape, str) and _ARITY.get(shape) == len(record)


def sink_from_url(url: str) -> Sink:
    """``tcp://HOST:PORT``, ``unix:PATH``, ``file:PATH`` or ``memory:`` -> a sink."""
    if url.startswith("file:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("HOPSCOPE_SINK file: needs a path, e.g. file:trace.jsonl")
        return FileSink(path, append=True)
    if url == "memory:":
        return MemorySink()
    if url.startswith(("tcp://", "unix:")):
        return SocketSink(url)
    raise ValueError(
        f"HOPSCOPE_SINK must be tcp://HOST:PORT, unix:PATH, file:PATH or memory:, got {url!r}"
    )


_default: Sink | None = None
_default_lock = threading.Lock()

DEFAULT_COLLECTOR = "tcp://127.0.0.1:7401"


def default_sink() -> Sink:
    """The process-wide sink chosen by ``HOPSCOPE_SINK`` (default: the local collector)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = sink_from_url(os.environ.get("HOPSCOPE_SINK") or DEFAULT_COLLECTOR)
        return _default
