"""The collector: where apps' :class:`~hopscope.tracing.SocketSink` batches arrive.

Apps ship records undecoded (marshal frames) so that their own processes do as little
as possible; this process pays for decoding instead.  The wire format is not safe
against hostile peers (``marshal`` is not), which is why the collector listens on
loopback only unless told otherwise, and why every frame is size-checked and
shape-checked before use: a bad peer loses its connection, never the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from hopscope.tracing.records import event_count, to_events
from hopscope.tracing.sinks import (
    MAX_FRAME,
    WIRE_MAGIC,
    decode_frame,
    dropped_event,
    parse_address,
)
from hopscope.tracing.tracefile import TraceFileWriter

__all__ = [
    "DEFAULT_ADDRESS",
    "MAX_FRAME",
    "BackgroundCollector",
    "Collector",
    "CollectorError",
    "EventWriter",
    "OutputFileError",
    "tune_gc",
    "wait_quiet",
]

Event = dict[str, Any]
Consumer = Callable[[list[Event]], None]
#: ``(records, process_info, dropped) -> records it could not read`` (see Collector).
RecordConsumer = Callable[[list[Any], dict[str, Any], int], int]

DEFAULT_ADDRESS = "127.0.0.1:7401"
# MAX_FRAME (from the sinks): a frame past it closes its connection; no honest batch
# comes near it, and a SocketSink splits one that would.

#: A peer that connects but does not say the magic within this long is dropped.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a frame may take from its first byte to its last.  Why: a peer that stops in
#: the middle of a frame (a half-written batch, a stray client that sent the magic and
#: a few bytes) held its connection, its buffer and a handler for good, silently.  A
#: SocketSink writes each frame in one go, over loopback (a 64 MiB one in well under a
#: second); between frames a peer may stay silent as long as it likes (an idle app
#: sends nothing).
FRAME_TIMEOUT = 30.0

_LENGTH = struct.Struct("!I")


class _Broken(Exception):
    """A peer stopped in the middle of the handshake or a frame (the message says how)."""


class CollectorError(Exception):
    """The collector cannot run (bad address, port in use); the message is one line."""


class OutputFileError(CollectorError):
    """The collector's ``-o`` file cannot be written: the address is not the problem,
    so a caller's "pick another address" hint does not belong with it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{self.prefix(path)}{reason}")
        self.path = path

    @staticmethod
    def prefix(path: str) -> str:
        """How the message starts; a collector in a child process says only its line
        (``Error: cannot write PATH: ...``), and :meth:`said` tells it from the others."""
        return f"cannot write {path}: "

    @classmethod
    def said(cls, path: str | None, line: str) -> bool:
        """Whether ``line`` (a child collector's one-line error) is this error for ``path``."""
        return path is not None and line.removeprefix("Error: ").startswith(cls.prefix(path))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EventWriter:
    """Writes events as a trace file, in the same format a FileSink writes (mode 0600),
    summaries included (:class:`~hopscope.tracing.tracefile.TraceFileWriter`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._writer = TraceFileWriter.create(self.path)
        except OSError as exc:
            raise OutputFileError(self.path, str(exc.strerror or exc)) from None

    def write(self, events: list[Event]) -> None:
        # Written per batch (no buffer) so that ``hopscope tail FILE`` on a live file sees
        # whole lines.
        if events:
            self._writer.write(events)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._writer.close()


class Collector:
    """An asyncio server that turns SocketSink frames into wire events for ``consumer``.

    ``consumer`` is called on the collector's event loop with each batch's events, in
    arrival order per connection; it should be quick (printing a line is fine).  With
    neither a consumer nor an ``output`` file nobody reads the events, so records are
    only counted (:attr:`events` says how many events they stand for), not decoded.
    ``address`` takes what :func:`~hopscope.tracing.sinks.parse_address` takes; port 0
    picks a free port (read :attr:`url` after :meth:`start`).

    ``records``, when given, takes each batch's records undecoded instead of
    ``consumer`` taking its events, as long as no ``output`` file wants the events:
    a reader that needs a few fields of each request (``tail``, e.g.
    :meth:`~hopscope.app.tail.Tail.feed_records`) then skips making events, which in
    the proxy's recording child cost more than all the rest.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        consumer: Consumer | None = None,
        *,
        output: str | os.PathLike[str] | None = None,
        max_frame: int = MAX_FRAME,
        allow_remote: bool = False,
        records: RecordConsumer | None = None,
        warn: Callable[[str], None] | None = None,
        hello: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        try:
            self.family, self._address = parse_address(address)
        except ValueError as exc:
            raise CollectorError(str(exc)) from None
        if self.family == "tcp" and not allow_remote and not _is_loopback(self._address[0]):
            raise CollectorError(
                f"refusing to listen on non-loopback address {self._address[0]!r}: "
                "the trace wire format is not safe against untrusted peers"
            )
        self.consumer = consumer
        self.records = records
        self.warn = warn
        #: Told each connection's process info (pid, server) with its first frame, so a
        #: team sees every worker that reports, and each one again after it reconnected.
        self.hello = hello
        self.max_frame = max_frame
        #: See HANDSHAKE_TIMEOUT and FRAME_TIMEOUT (attributes, so tests can shorten them).
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.frame_timeout = FRAME_TIMEOUT
        self._output = output
        self.writer: EventWriter | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.WriteTransport] = set()
        self.url = ""
        # Counters, for tests and the end-of-run summary.
        self.connections = 0
        self.frames = 0
        self.events = 0  # wire events made (records taken by ``records`` are not made into any)
        self.dropped = 0
        self.rejected = 0

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Bind and listen; raises :class:`CollectorError` with a one-line reason."""
        if self._output is not None and self.writer is None:
            self.writer = EventWriter(self._output)
        try:
            if self.family == "unix":
                path = self._address
                _clear_stale_socket(path)
                self._server = await asyncio.start_unix_server(self._handle, path)
                os.chmod(path, 0o600)
                self.url = f"unix:{path}"
            else:
                host, port = self._address
                self._server = await asyncio.start_server(self._handle, host, port)
                bound = self._server.sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                self.url = f"tcp://{shown}:{bound[1]}"
        except OSError as exc:
            self._close_writer()
            raise CollectorError(_bind_error(self.family, self._address, exc)) from None
        except CollectorError:
            self._close_writer()
            raise

    async def stop(self) -> None:
        """Stop listening, drop open connections and close the output file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Closing the transports ends each handler at its next read; cancelling the
        # handler tasks instead makes asyncio (3.11) log every one of them.
        for transport in list(self._transports):
            transport.abort()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=5)
            for task in pending:
                task.cancel()
        if server is not None:
            await server.wait_closed()
        if self.family == "unix" and self.url:
            with contextlib.suppress(OSError):
                os.unlink(self._address)
        self._close_writer()

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- connections -------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        transport = writer.transport
        self._transports.add(transport)
        self.connections += 1
        try:
            await self._read(reader)
        except _Broken as exc:  # went away or stopped mid-frame: what it sent is lost
            self._reject(str(exc))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away, or said nothing: both are its business
        finally:
            self._handlers.discard(task)
            self._transports.discard(transport)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        # A peer that says nothing (a port probe) is let go silently; one that began the
        # handshake or a frame and stopped is said (and counted), as a half frame is.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        async with asyncio.timeout_at(deadline):
            first = await reader.readexactly(1)
        magic = await self._complete(
            reader, first, len(WIRE_MAGIC), "the handshake", deadline, self.handshake_timeout
        )
        if magic != WIRE_MAGIC:
            self._reject("did not start with the hopscope handshake (not a hopscope app?)")
            return
        greeted = False
        frame_timeout = self.frame_timeout
        while True:
            try:
                # Silent between frames for as long as the app likes (see FRAME_TIMEOUT).
                first = await reader.readexactly(1)
            except asyncio.IncompleteReadError:
                return  # closed between frames: nothing lost
            deadline = loop.time() + frame_timeout
            head = await self._complete(
                reader, first, _LENGTH.size, "a frame", deadline, frame_timeout
            )
            (length,) = _LENGTH.unpack(head)
            if length > self.max_frame or length == 0:
                self._reject(f"sent a frame of {length} bytes (at most {self.max_frame})")
                return
            payload = await self._complete(reader, b"", length, "a frame", deadline, frame_timeout)
            try:
                info, dropped, records = decode_frame(payload)
            except Exception:  # marshal raises ValueError, EOFError, TypeError...
                self._reject("sent a frame that is not a hopscope batch")
                return
            self.frames += 1
            if not greeted and self.hello is not None:
                greeted = True
                with contextlib.suppress(Exception):  # a greeting must not stop the collector
                    self.hello(info)
            self._deliver(info, dropped, records)

    async def _complete(
        self,
        reader: asyncio.StreamReader,
        start: bytes,
        size: int,
        what: str,
        deadline: float,
        limit: float,
    ) -> bytes:
        """The rest of ``what`` (``size`` bytes in all, ``start`` read already), by
        ``deadline`` (loop time: ``limit`` seconds after it began), or the peer is
        dropped and said (:meth:`_handle`)."""
        try:
            async with asyncio.timeout_at(deadline):
                return start + await reader.readexactly(size - len(start))
        except asyncio.IncompleteReadError:
            raise _Broken("closed the connection in the middle of " + what) from None
        except TimeoutError:
            raise _Broken(f"began {what} and did not end it within {limit:g} s") from None

    def _reject(self, reason: str) -> None:
        """Count a peer dropped for breaking the protocol; say so once (``warn``), since a
        peer that keeps doing it must not flood the terminal."""
        self.rejected += 1
        if self.rejected == 1 and self.warn is not None:
            with contextlib.suppress(Exception):  # a warning must not stop the collector
                self.warn(
                    f"dropped a connection that {reason}; the collector carries on "
                    "(later ones are only counted)"
                )

    def _deliver(self, info: dict[str, Any], dropped: int, records: list[Any]) -> None:
        if self.records is not None and self.writer is None:
            failed = self.records(records, info, dropped)
            self.dropped += max(dropped, 0) + failed
            return
        if self.consumer is None and self.writer is None:
            # Nobody reads the events: decoding them would only take CPU from the apps
            # this collector shares the machine with.  Count what they would have been.
            try:
                self.events += sum(map(event_count, records))
            except Exception:
                self.rejected += 1
            self.dropped += max(dropped, 0)
            return
        events: list[Event] = []
        for record in records:
            try:
                events.extend(to_events(record, info))
            except Exception:
                # A record of the right kind but the wrong shape: count it as lost.
                dropped += 1
        if dropped > 0:
            self.dropped += dropped
            events.insert(0, dropped_event(dropped, info))
        if not events:
            return
        self.events += len(events)
        if self.writer is not None:
            self.writer.write(events)
        if self.consumer is not None:
            self.consumer(events)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead collector; refuse if one is alive there."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # not a socket we can judge: let bind report it
    finally:
        probe.close()
    raise CollectorError(f"another collector is already listening on unix:{path}")


def _bind_error(family: str, address: Any, exc: OSError) -> str:
    where = f"unix:{address}" if family == "unix" else f"{address[0]}:{address[1]}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: address already in use (is another hopscope running?)"
    reason = exc.strerror or str(exc)
    return f"cannot listen on {where}: {reason}"


def tune_gc() -> None:
    """Fewer garbage collections, for hopscope's own long-running processes (the proxy,
    its recording child), never an app's.

    Why (measured, instructions per request under callgrind): each request makes a few
    hundred objects in the proxy and in the tail, nearly all gone by its end, and the
    collector's default pace (a pass every 700 allocations, and full passes over all
    that start-up imported) cost 3-6% of their work.  Freezing what start-up made takes
    it out of every later pass; a larger first threshold makes young-generation passes
    rarer, each still short (thousands of objects, well under a millisecond).
    """
    gc.freeze()
    gc.set_threshold(5000, 10, 10)


def wait_quiet(count: Callable[[], int], quiet: float = 0.3, timeout: float = 3.0) -> None:
    """Wait until ``count()`` (frames received) stays put for ``quiet`` seconds, at most
    ``timeout``: what apps flushed as they stopped has then arrived, before the
    collector closes its connections and its file."""
    deadline = time.monotonic() + timeout
    seen, since = count(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.05)
        current = count()
        if current != seen:
            seen, since = current, time.monotonic()


class BackgroundCollector:
    """A :class:`Collector` on its own event loop in a daemon thread.

    For callers that are not asyncio programs (the CLI, tests): :meth:`start` returns
    once the collector listens (or raises its :class:`CollectorError`), :meth:`stop`
    returns once it has stopped.  The consumer runs on the collector's thread.
    """

    def __init__(
        self, address: str = DEFAULT_ADDRESS, consumer: Consumer | None = None, **options: Any
    ) -> None:
        self.collector = Collector(address, consumer, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.collector.url

    def start(self, timeout: float = 10.0) -> BackgroundCollector:
        self._thread = threading.Thread(target=self._run, name="hopscope-collector", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise CollectorError("the collector did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            error, self._error = self._error, None
            raise error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), or printed if after start
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                print(f"hopscope: collector stopped: {exc}", file=sys.stderr)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self.collector.start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.collector.stop()

    def stop(self, timeout: float = 10.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundCollector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
