"""``hopscope proxy``'s own work per request, counted without noise.

Run: ``python bench/proxy_hotpath.py`` (CPU microseconds, one pass each) or
``python bench/proxy_hotpath.py --callgrind`` (instructions per request, counted by
valgrind: the same on a busy machine as on an idle one, so small changes compare).
``--baseline DIR`` counts another source tree too (a directory holding hopscope/app,
hopscope/tracing, hopscope/tui), side by side.

Why: bench/proxy.py measures the proxy end to end with wrk, which on a shared 2-CPU
machine moves by tens of percent from run to run.  Here everything runs in one process
and one thread: a canned upstream (an asyncio protocol answering a fixed response), the
proxy as ``proxy_server`` makes it (its own listener under uvicorn's server, httptools,
uvloop), and 16 keep-alive clients.  Variants:

* ``clients``: the clients straight to the canned upstream (what the harness costs);
* ``uvicorn``: the clients to a bare ASGI hello under uvicorn (a server's share);
* ``norecord``: through the proxy, recordings dropped;
* ``proxy``: through the proxy, recordings taken every 200 requests and marshalled, as
  the drain thread of a SocketSink does;
* ``tail-records`` / ``tail-events``: the recording child's part, the marshalled batches
  of ``proxy`` decoded and folded into tail lines (written to /dev/null), straight from
  the records or through wire events.  The tail holds each line as the child's does
  (``hold``, 0.3 s of the records' own clock): live, about a thousand requests are held
  at any time, and what that costs is part of the child's work.

The proxy's share is ``proxy - clients``; the child's is ``tail-records``.

The records' times are those of the ``proxy`` run that made them: under ``--callgrind``
about 10 ms apart (valgrind runs it some fifty times slower), live 0.1-0.2 ms.  So
there the tail holds a few dozen requests rather than a thousand, and the lines' clock
text is rarely that of the line before (app/tail.py's ``_clock`` reuses it): the
child's count is about a tenth above what records made at live speed give.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import marshal
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("clients", "uvicorn", "norecord", "proxy", "tail-records", "tail-events")
CONNECTIONS = 16
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"date: Wed, 25 Nov 2026 20:00:00 GMT\r\nserver: uvicorn\r\n\r\nHello, world!"
)
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\n\r\n"


class Upstream(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            self.buffer = self.buffer.partition(b"\r\n\r\n")[2]
            self.transport.write(RESPONSE)


class Client(asyncio.Protocol):
    """Sends a request, waits for the whole response, ``left`` times."""

    def __init__(self, done: asyncio.Future[None], left: int) -> None:
        self.done = done
        self.left = left
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(b"Hello, world!"):
            self.buffer = b""
            self.left -= 1
            if self.left <= 0:
                self.transport.close()
                self.done.set_result(None)
            else:
                self.transport.write(REQUEST)


def _sink(variant: str, frames: list[bytes]) -> Any:
    from hopscope.tracing.sinks import Recording, Sink

    class BenchSink(Sink):
        def __init__(self) -> None:
            self.live: list[Any] = []

        def emit(self, record: Any) -> None:
            self.live.append(record)

        def start_live(self, recording: Recording) -> bool:
            if variant == "norecord":
                return True
            self.live.append(recording)
            if len(self.live) >= 200:
                self.drain()
            return True

        def drain(self) -> None:
            out: list[Any] = []
            keep = []
            for each in self.live:
                if isinstance(each, Recording):
                    if not each.take(out):
                        keep.append(each)
                else:
                    out.append(each)
            self.live = keep
            frames.append(marshal.dumps((1, {"process.pid": os.getpid()}, 0, out)))

    return BenchSink()


def _hello_server() -> Any:
    import uvicorn

    async def hello(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"13"), (b"content-type", b"text/plain; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"Hello, world!"})

    config = uvicorn.Config(
        hello, http="httptools", log_level="warning", access_log=False, lifespan="off",
        server_header=False, date_header=False,
    )  # fmt: skip
    return uvicorn.Server(config)


def serve_variant(variant: str, n: int, frames: list[bytes]) -> float:
    """Run ``n`` requests (after a warm-up) inside ``functools.reduce``; CPU s/request."""
    import uvloop
    from hopscope.app.proxy import ProxyApp

    try:
        from hopscope.app.proxy_command import proxy_server
    except ImportError:  # a --baseline tree from before the command had its own module
        from hopscope.app.proxy import proxy_server  # type: ignore[attr-defined,no-redef]

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def start() -> tuple[Any, int]:
        up = await loop.create_server(Upstream, "127.0.0.1", 0)
        up_port = up.sockets[0].getsockname()[1]
        if variant == "clients":
            return None, up_port
        if variant == "uvicorn":
            server = _hello_server()
        else:
            server = proxy_server(ProxyApp(f"http://127.0.0.1:{up_port}", _sink(variant, frames)))
            server.config.lifespan = "off"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        loop.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        return server, sock.getsockname()[1]

    async def clients(port: int, total: int) -> None:
        waits = []
        for _ in range(CONNECTIONS):
            done: asyncio.Future[None] = loop.create_future()
            waits.append(done)
            await loop.create_connection(
                functools.partial(Client, done, total // CONNECTIONS), "127.0.0.1", port
            )
        await asyncio.gather(*waits)

    server, port = loop.run_until_complete(start())
    loop.run_until_complete(clients(port, 800))  # warm-up
    if variant in ("norecord", "proxy"):
        from hopscope.app import collector

        if hasattr(collector, "tune_gc"):
            collector.tune_gc()  # as ``hopscope proxy`` does
    frames.clear()
    started = time.thread_time()
    # Everything inside functools.reduce is what --callgrind counts.
    functools.reduce(lambda *_: loop.run_until_complete(clients(port, n)), [0, 0])
    used = time.thread_time() - started
    if server is not None:
        server.should_exit = True
        loop.run_until_complete(asyncio.sleep(0.3))
    return used / n


def tail_variant(variant: str, frames: list[bytes]) -> tuple[float, int]:
    from hopscope.app import collector
    from hopscope.app.tail import Tail
    from hopscope.tracing.records import to_events

    if hasattr(collector, "tune_gc"):
        collector.tune_gc()  # as the recording child does
    # An older tree (--baseline) has no feed_records: its child made events.
    by_records = variant == "tail-records" and hasattr(Tail, "feed_records")
    requests = 0

    def run(*_: Any) -> None:
        nonlocal requests
        with open(os.devnull, "w") as out:
            tail = Tail(out, live=False)  # the child's hold, on the records' clock
            for payload in frames:
                _, info, dropped, records = marshal.loads(payload)
                requests += len(records)
                if by_records:
                    tail.feed_records(records, info, dropped)
                else:
                    tail.feed([e for record in records for e in to_events(record, info)])
            tail.close()

    started = time.thread_time()
    functools.reduce(run, [0, 0])
    return (time.thread_time() - started) / max(requests, 1), requests


def child(variant: str, n: int, frames_path: str) -> None:
    if variant.startswith("tail-"):
        frames = marshal.loads(Path(frames_path).read_bytes())
        per, n = tail_variant(variant, frames)
    else:
        frames = []
        per = serve_variant(variant, n, frames)
        if variant == "proxy" and frames_path:
            Path(frames_path).write_bytes(marshal.dumps(frames))
    print(f"{variant} {n} {per}")


def run_child(
    variant: str, n: int, frames: str, callgrind: bool, tree: str, workdir: str
) -> tuple[float, int]:
    """(CPU µs or instructions per request, requests) of one variant in its own process."""
    argv = [sys.executable, str(Path(__file__)), "--child", variant, "-n", str(n)]
    argv += ["--frames", frames]
    out_file = os.path.join(workdir, f"callgrind.{variant}.{os.path.basename(tree) or 'cur'}")
    if callgrind:
        argv = [
            "valgrind", "-q", "--tool=callgrind", "--collect-atstart=no",
            "--toggle-collect=functools_reduce", f"--callgrind-out-file={out_file}", *argv,
        ]  # fmt: skip
    # One hash seed for every run: set and dict probes (header names, keys) then take
    # the same paths each time, and counts of two trees differ only by the trees.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if tree:
        env["PYTHONPATH"] = tree
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith(variant + " ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"proxy hotpath: {variant} failed:\n{done.stderr[-2000:]}")
    _, requests, per = lines[-1].split()
    if not callgrind:
        return float(per) * 1e6, int(requests)
    for line in Path(out_file).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) / int(requests), int(requests)
    raise SystemExit(f"proxy hotpath: no totals in {out_file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("-n", type=int, default=0, help="requests (default 2000 / 20000)")
    parser.add_argument("--baseline", metavar="PYTHONPATH", default="")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--frames", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.n or (2000 if args.callgrind else 20000)
    if args.child:
        child(args.child, n, args.frames)
        return
    trees = [("hopscope", "")] + ([("baseline", args.baseline)] if args.baseline else [])
    unit = "instructions" if args.callgrind else "CPU us"
    with tempfile.TemporaryDirectory() as workdir:
        results: dict[str, dict[str, float]] = {}
        for name, tree in trees:
            frames = os.path.join(workdir, f"frames.{name}")
            results[name] = {}
            for variant in VARIANTS:
                if variant in ("clients", "uvicorn") and name != "hopscope":
                    continue
                value, _ = run_child(variant, n, frames, args.callgrind, tree, workdir)
                results[name][variant] = value
        print(f"{unit} per request, {n} requests over {CONNECTIONS} keep-alive connections")
        print(f"{'variant':14}" + "".join(f"{name:>14}" for name, _ in trees))
        for variant in VARIANTS:
            row = [results[name].get(variant) for name, _ in trees]
            fmt = "{:>14.0f}" if args.callgrind else "{:>14.1f}"
            print(f"{variant:14}" + "".join(fmt.format(v) if v else f"{'-':>14}" for v in row))
        clients = results["hopscope"]["clients"]
        for name, _ in trees:
            mine = results[name]
            print(
                f"{name}: proxy's own {mine['proxy'] - clients:.0f}, recording in the proxy "
                f"{mine['proxy'] - mine['norecord']:.0f}, recording child (tail) "
                f"{mine['tail-records']:.0f} ({unit} per request)"
            )


if __name__ == "__main__":
    main()
