"""What the ASGI middleware adds per request on a real server, counted by callgrind.

Run: ``python bench/server_callgrind.py`` (add ``--split`` for where the added
instructions go).

bench/hotpath.py counts the middleware alone, stepped by hand; this counts the whole
server process: uvicorn (httptools, one process, no access log) serving the Starlette
hello world of bench/_common.py, bare and wrapped, under ``valgrind --tool=callgrind``
with all its threads (the event loop and the sink's).  The wrapped server's sink is a
real :class:`~hopscope.tracing.SocketSink` sending to a loopback reader in this process,
outside valgrind, as is the client: ``-c`` keep-alive connections, each sending its next
``GET /`` when the last answer is in (what ``wrk -c16`` does).

Counting: after a warm-up the count is zeroed (``callgrind_control --zero``), ``-n``
requests are made, the server is left idle for a moment (its sink's thread sends what
still waits, so the window holds the whole export of its requests), and the count is
dumped (``callgrind_control --dump``).  Start-up, imports and warm-up are not counted.
The idle moment's cost (timers: uvicorn's tick, the sink thread's wakeups) is taken
out: the same server is counted idle for a few seconds, and that rate times the idle
moment's length is subtracted.  (Not over the whole window: a busy loop's timers cost
next to nothing, and scaling the idle rate by a window's wall time, which follows the
machine's load, swung the figures by thousands per request.)

``--split`` adds servers whose sink does less than a SocketSink, each one step more:
``queue`` (recordings queued and let go untaken), ``take`` (records made, not
marshalled), ``marshal`` (frames made, not sent); each step's cost is the difference
to the one before.  The marshal and send C functions' inclusive counts in the full
server (``callgrind_annotate --inclusive=yes``) are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from _common import HOST, free_port, load_average, spawn, starlette_hello, stop, wait_ready

VARIANTS = ("bare", "wrapped")
#: Seconds of idle server counted, to take the cost of its timers out of the window.
IDLE = 3.0
#: The sink's interval under valgrind.  SocketSink's 50 ms let a busy server's requests
#: send every FLUSH_AT (128) of them themselves, in the request's thread; under
#: valgrind, some 40 times slower, 50 ms is a few requests, and its thread would send
#: small batches instead.  Scaled up, batches are made as on a real server.
INTERVAL = 2.0
SPLIT = ("queue", "take", "marshal")
#: C functions whose inclusive counts are shown for the wrapped server.
GROUPS = {
    "marshal.dumps": ("marshal_dumps",),
    "socket send": ("sock_send", "sock_sendmsg"),
    "futex (wakeups)": ("futex_wait", "futex_wake", "sem_timedwait", "pthread_cond_timedwait"),
}


# --------------------------------------------------------------------------------------
# the server (runs under valgrind)
# --------------------------------------------------------------------------------------


def make_sink(variant: str, address: str, interval: float) -> Any:
    from hopscope.tracing.sinks import SocketSink, encode_frame

    class QueueOnly(SocketSink):
        """Recordings queued as a SocketSink queues them, then let go untaken."""

        def _drain_locked(self) -> None:
            self._last_drain = time.monotonic()
            self._queue.clear()

    class TakeOnly(SocketSink):
        def _write(self, batch: list[Any], dropped: int) -> None:
            pass

    class MarshalOnly(SocketSink):
        def _write(self, batch: list[Any], dropped: int) -> None:
            encode_frame(batch, dropped, self._info)

    kinds = {"queue": QueueOnly, "take": TakeOnly, "marshal": MarshalOnly, "wrapped": SocketSink}
    return kinds[variant](address, interval=interval)


def serve(variant: str, port: int, address: str, interval: float) -> None:
    import uvicorn

    app = starlette_hello()
    if variant != "bare":
        from hopscope.tracing import wrap

        app = wrap(app, sink=make_sink(variant, address, interval))
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        http="httptools",
        loop="asyncio",
        access_log=False,
        log_level="warning",
        workers=None,
    )


# --------------------------------------------------------------------------------------
# the driver (outside valgrind)
# --------------------------------------------------------------------------------------


class Reader:
    """The collector's stand-in: accepts the sink's connection and reads all it sends."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                self.bytes += len(data)


def drive(port: int, requests: int, connections: int, timeout: float = 600.0) -> None:
    """``requests`` answered ``GET /`` over ``connections`` keep-alive connections."""
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    socks = []
    sent = min(connections, requests)
    for _ in range(sent):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.sendall(request)
        selector.register(sock, selectors.EVENT_READ, bytearray())
        socks.append(sock)
    done = 0
    deadline = time.monotonic() + timeout
    try:
        while done < requests:
            if time.monotonic() > deadline:
                raise SystemExit(f"server_callgrind: {done}/{requests} answers in {timeout}s")
            for key, _ in selector.select(1.0):
                sock, buffer = key.fileobj, key.data
                assert isinstance(sock, socket.socket)
                data = sock.recv(1 << 16)
                if not data:
                    raise SystemExit("server_callgrind: the server closed a connection")
                buffer += data
                while (head_end := buffer.find(b"\r\n\r\n")) >= 0:
                    head = bytes(buffer[:head_end])
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise SystemExit(f"server_callgrind: unexpected answer {head[:60]!r}")
                    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                    length = int(match[1]) if match else 0
                    if len(buffer) < head_end + 4 + length:
                        break
                    del buffer[: head_end + 4 + length]
                    done += 1
                    if sent < requests:
                        sock.sendall(request)
                        sent += 1
    finally:
        for sock in socks:
            selector.unregister(sock)
            sock.close()
        selector.close()


def control(option: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def measure(
    variant: str,
    n: int,
    warmup: int,
    connections: int,
    interval: float,
    workdir: str,
    reader: Reader,
) -> tuple[int, str]:
    """Instructions in the counted window of ``variant``'s server, and its dump file."""
    port = free_port()
    out = os.path.join(workdir, f"callgrind.{variant}")
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--cache-sim=no",
        "--branch-sim=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        os.path.abspath(__file__),
        "--serve",
        variant,
        "--port",
        str(port),
        "--sink",
        f"tcp://{HOST}:{reader.port}",
        "--interval",
        str(interval),
    ]
    # A fixed hash seed: dict probe counts (and so the count) follow it.
    env = {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    log = open(os.path.join(workdir, f"{variant}.log"), "w")
    proc = spawn(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, variant, bench="server_callgrind", timeout=600)
        drive(port, warmup, connections)
        settle = 1.5 * interval + 0.5
        time.sleep(settle)  # the sink connected and sent the warm-up's records
        control("--zero", proc.pid)
        drive(port, n, connections)
        began = time.monotonic()
        time.sleep(settle)  # its thread sends what the last requests left queued
        control("--dump", proc.pid)
        settled = time.monotonic() - began
        # The same server idle: what its timers cost per second of wall time.
        control("--zero", proc.pid)
        began = time.monotonic()
        time.sleep(IDLE)
        control("--dump", proc.pid)
        idle = time.monotonic() - began
    finally:
        stop(proc)
        log.close()
    dumps = sorted(glob.glob(out + ".*"), key=lambda name: int(name.rsplit(".", 1)[1]))
    if len(dumps) < 2:
        raise SystemExit(f"server_callgrind: no dumps of {variant} (see {workdir})")
    counted, idle_count = _total(dumps[-2]), _total(dumps[-1])
    return round(counted - idle_count / idle * settled), dumps[-2]


def _total(dump: str) -> int:
    with open(dump) as handle:
        for line in handle:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"server_callgrind: no totals in {dump}")


def groups(dump: str) -> dict[str, int]:
    """Inclusive counts of the :data:`GROUPS` C functions in a dump."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", dump],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    totals = dict.fromkeys(GROUPS, 0)
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+)\s.*?:(\w+)\b", line)
        if match is None:
            continue
        count, function = int(match[1].replace(",", "")), match[2]
        for name, functions in GROUPS.items():
            if function in functions:
                totals[name] = max(totals[name], count)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="counted requests per server")
    parser.add_argument("--warmup", type=int, default=500, help="requests before counting")
    parser.add_argument("-c", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--split", action="store_true", help="also the partial sinks")
    parser.add_argument(
        "--interval",
        type=float,
        default=INTERVAL,
        help=f"the sink's interval, in valgrind's slow seconds (default {INTERVAL})",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR")
    parser.add_argument("--serve", choices=(*VARIANTS, *SPLIT), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.sink, args.interval)
        return 0
    if args.n < 1 or args.warmup < 1 or args.c < 1:
        parser.error("-n, --warmup and -c must be positive")
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            raise SystemExit(f"server_callgrind: {tool} not found")
    variants = ["bare", *(SPLIT if args.split else ()), "wrapped"]
    reader = Reader()
    workdir = args.keep or tempfile.mkdtemp(prefix="server_callgrind.")
    os.makedirs(workdir, exist_ok=True)
    counts: dict[str, float] = {}
    dumps: dict[str, str] = {}
    try:
        for variant in variants:
            total, dumps[variant] = measure(
                variant, args.n, args.warmup, args.c, args.interval, workdir, reader
            )
            counts[variant] = total / args.n
        parts = groups(dumps["wrapped"])
    finally:
        with contextlib.suppress(OSError):
            reader.listener.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    bare, wrapped = counts["bare"], counts["wrapped"]
    print(
        f"uvicorn+httptools, Starlette hello world: instructions/request over {args.n} "
        f"requests, -c{args.c}, sink interval {args.interval:g}s (all server threads);"
        f" {load_average()}"
    )
    print(
        f"  bare {bare:9.0f}  wrapped {wrapped:9.0f}  added {wrapped - bare:8.0f} "
        f"({wrapped / bare:.3f}x)"
    )
    if args.split:
        before = bare
        for variant in (*SPLIT, "wrapped"):
            step = "send" if variant == "wrapped" else variant
            print(f"    {step:>8}: +{counts[variant] - before:7.0f}")
            before = counts[variant]
    for name, count in parts.items():
        print(f"  in wrapped, {name} (inclusive): {count / args.n:7.0f}")
    print(f"  sink bytes read: {reader.bytes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
