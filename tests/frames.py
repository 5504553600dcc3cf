"""What the sink tests share: for SocketSink, a frame reader, a collector in a process,
one in a thread of the test, and a way to fill a connection until frames wait in the
sink; for any sink, a request that cannot be recorded.

The wire: :data:`~hopscope.tracing.sinks.WIRE_MAGIC`, then frames, each a 4-byte
big-endian length and a marshalled batch (:func:`~hopscope.tracing.sinks.decode_frame`).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from hopscope.tracing.records import Record
from hopscope.tracing.sinks import WIRE_MAGIC, MemorySink, Recording, SocketSink, decode_frame

__all__ = [
    "FILL_LIMIT",
    "PAD",
    "ProcessCollector",
    "ThreadCollector",
    "Unrecordable",
    "fill",
    "listener",
    "read_frames",
    "record",
    "url_of",
]


def read_frames(file: IO[bytes]) -> Iterator[tuple[dict[str, Any], int, list[Record]]]:
    """The frames of one connection, read as a blocking ``file`` after its magic, until
    it ends: ``(process info, drops reported, records)`` each."""
    while len(head := file.read(4)) == 4:
        (length,) = struct.unpack("!I", head)
        yield decode_frame(file.read(length))


#: The collector :class:`ProcessCollector` runs: ``hold`` accepts one connection and
#: reads nothing until a line comes on its stdin, then reads what the socket has (until
#: it is quiet), reports and waits to be killed; ``read`` accepts one connection and
#: reads it to its end, then reports.  The report: the ids of the records of whole
#: frames, the drops they carried, and the bytes of a frame cut short (thrown away, as
#: ``hopscope tail --listen`` does).
COLLECTOR = r"""
import json, os, socket, struct, sys
from hopscope.tracing.sinks import WIRE_MAGIC, decode_frame

mode, where = sys.argv[1], sys.argv[2]
if where.startswith("unix:"):
    if os.path.exists(where[5:]):
        os.unlink(where[5:])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(where[5:])
else:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(where)))
    where = str(listener.getsockname()[1])
listener.listen()
print(where, flush=True)
listener.settimeout(20)
conn, _ = listener.accept()
if mode == "hold":
    sys.stdin.readline()
conn.settimeout(0.5 if mode == "hold" else 20)
data = bytearray()
while True:
    try:
        chunk = conn.recv(1 << 20)
    except TimeoutError:
        break
    if not chunk:
        break
    data += chunk
assert data[: len(WIRE_MAGIC)] == WIRE_MAGIC
at, ids, dropped = len(WIRE_MAGIC), [], 0
while at + 4 <= len(data):
    (length,) = struct.unpack_from("!I", data, at)
    if at + 4 + length > len(data):
        break
    info, count, batch = decode_frame(bytes(data[at + 4 : at + 4 + length]))
    dropped += count
    ids += [record[1] for record in batch]
    at += 4 + length
print(json.dumps({"ids": ids, "dropped": dropped, "cut": len(data) - at}), flush=True)
if mode == "hold":
    sys.stdin.readline()
"""


class ProcessCollector:
    """A collector in its own process (:data:`COLLECTOR`), on ``where`` (a TCP port, "0"
    for any, or ``unix:PATH``): one that can be killed, and started again there."""

    def __init__(self, mode: str, where: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", COLLECTOR, mode, where],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.where = self.proc.stdout.readline().strip()
        assert self.where, "the collector did not start"

    @property
    def url(self) -> str:
        return self.where if self.where.startswith("unix:") else f"tcp://127.0.0.1:{self.where}"

    def report(self) -> dict[str, Any]:
        """(``hold``) Read what the socket has now and report it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)

    def final(self) -> dict[str, Any]:
        """(``read``) What it read once the connection ended."""
        out, _ = self.proc.communicate(timeout=30)
        return dict(json.loads(out))


def listener(where: str) -> socket.socket:
    """A socket bound (not yet listening: a connect is refused) on ``where``, as for
    :class:`ProcessCollector`: a TCP port on 127.0.0.1 ("0" for any) or ``unix:PATH``."""
    if where.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where[5:])
        return sock
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if int(where):  # (a port given again, after a collector there stopped)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(where)))
    return sock


def url_of(sock: socket.socket) -> str:
    """The sink URL of a :func:`listener`."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class ThreadCollector:
    """A collector in a thread of the test, on a :func:`listener` (it listens from now):
    accepts connections and decodes their frames, a reader thread each.  ``paused``
    makes it stop reading (connections stay open), as a stuck collector would;
    ``keep_open`` keeps each connection open after the sink ended it, until
    :meth:`stop` (so the sink cannot tell from its socket that one is over)."""

    def __init__(self, sock: socket.socket, *, keep_open: bool = False) -> None:
        self.listener = sock
        self.url = url_of(sock)
        self.keep_open = keep_open
        self.magics: list[bytes] = []
        self.frames: list[tuple[dict[str, Any], int, list[Record]]] = []
        self.errors: list[BaseException] = []
        #: Connections the sink ended (read to their end).
        self.ended = 0
        self.paused = threading.Event()
        self.readers: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self._stop = self._closing = False
        sock.listen()
        sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def records(self) -> list[Record]:
        return [record for _, _, batch in list(self.frames) for record in batch]

    @property
    def ids(self) -> list[Any]:
        return [record[1] for record in self.records]

    @property
    def dropped(self) -> int:
        return sum(dropped for _, dropped, _ in list(self.frames))

    def _serve(self) -> None:
        while not (self._stop or self._closing):
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.keep_open:
                self.conns.append(conn)
            reader = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            self.readers.append(reader)
            reader.start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            if self._read(conn):
                self.ended += 1
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)
        finally:
            if not self.keep_open:
                conn.close()

    def _read_exactly(self, conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size and not self._stop:
            if self.paused.is_set():
                time.sleep(0.01)
                continue
            try:
                chunk = conn.recv(min(size - len(data), 65536))
            except TimeoutError:
                continue
            if not chunk:
                return data
            data += chunk
        return data

    def _read(self, conn: socket.socket) -> bool:
        """Read the frames of ``conn``; whether the sink ended it (not :meth:`stop`)."""
        conn.settimeout(0.1)
        self.magics.append(self._read_exactly(conn, len(WIRE_MAGIC)))
        if self.magics[-1] != WIRE_MAGIC:
            raise AssertionError("no magic")
        while not self._stop:
            head = self._read_exactly(conn, 4)
            if len(head) < 4:
                return not self._stop
            (length,) = struct.unpack("!I", head)
            payload = self._read_exactly(conn, length)
            if self._stop:
                return False  # stopped by force: the frame may be cut
            self.frames.append(decode_frame(payload))  # one at a time: wait_for() sees them
        return False

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        """Whether ``predicate()`` came true within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, force: bool = False) -> None:
        """Stop accepting; read on until the peer closes (or not, with ``force``); then
        close what is left, and raise what a reader met."""
        self._closing = True
        self._stop = force
        self.paused.clear()  # (a test that failed while paused: what is left is read)
        self.thread.join(timeout=5)
        for reader in self.readers:
            reader.join(timeout=10)
        self._stop = True
        for reader in self.readers:
            reader.join(timeout=5)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        assert not self.errors, self.errors


#: Records before the socket's buffers are full, at most (some 80 MB): a bound only.
FILL_LIMIT = 20_000
PAD = "x" * 4000


def record(n: int, pad: str = "") -> tuple[Any, ...]:
    """A point record numbered ``n`` (padded, to fill buffers sooner)."""
    return ("p", n, 1, 1, "tick", {"pad": pad} if pad else None)


def fill(sink: SocketSink) -> int:
    """Emit until frames wait in ``sink`` (made with ``flush_at=1``, its collector reading
    nothing): each record sends the one before it, as a frame of its own.  How many."""
    sink.emit(record(0))
    deadline = time.monotonic() + 10
    while sink.connects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.connects == 1
    emitted = 1
    while not sink._pending and emitted < FILL_LIMIT:
        sink.emit(record(emitted, PAD))
        emitted += 1
    assert sink._pending, "the socket never filled up"
    return emitted


class Unrecordable(Recording):
    """A request whose raw fields no start record can be made of (a client that is no
    pair): what an odd server could hand over.  Its ``sink``: a new one if not given."""

    interface = "asgi"

    def __init__(self, sink: MemorySink | None = None) -> None:
        self.sink = MemorySink() if sink is None else sink
        self.start, self.trace_id, self.span_id, self.parent_id, self.thread_id = 1, 2, 3, 0, 4
        self.request = ("GET", "http", "1.1", "/", b"", 42, None, [], "")
        self.items = []
        self.end_at = -1
        self.done = False
        self._state = -1
