"""What the SocketSink tests share: a frame reader, a collector in a process, and a way
to fill a connection until frames wait in the sink.

The wire: :data:`~hopscope.tracing.sinks.WIRE_MAGIC`, then frames, each a 4-byte
big-endian length and a marshalled batch (:func:`~hopscope.tracing.sinks.decode_frame`).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from hopscope.tracing.records import Record
from hopscope.tracing.sinks import SocketSink, decode_frame

__all__ = ["FILL_LIMIT", "PAD", "ProcessCollector", "fill", "read_frames", "record"]


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
