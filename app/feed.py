"""The collector in a child process, feeding the UI decoded events through a pipe.

Decoding records into events (:func:`~hopscope.tracing.records.to_events`) is the
collector's heaviest work, and in the UI's process it competes with the UI for the
GIL: at 2,000 requests/s an in-process collector left the UI about a fifth of a core.
Here a child process (see :mod:`hopscope.app.child`) listens, decodes and writes the
``-o`` file; the UI's process only unmarshals ready-made event lists, several times
cheaper than decoding them.  After the ready frame (the collector's URL) the child
sends ``("events", [event, ...])`` frames, one per :data:`FLUSH_INTERVAL` at most.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from .child import ChildError, ChildProcess, ParentLink
from .collector import Collector, CollectorError, _is_loopback, wait_quiet

__all__ = ["CollectorFeed", "OtlpListener", "main"]

Event = dict[str, Any]
Deliver = Callable[[list[Event]], None]

#: Seconds the child gathers events before writing them as one frame.
FLUSH_INTERVAL = 0.05
#: Events that make the child write at once, without waiting for the interval.
FLUSH_EVENTS = 5_000


# -- OTLP/HTTP beside the collector ---------------------------------------------------------


class OtlpListener:
    """:class:`~hopscope.app.otlp_receiver.OtlpReceiver` under uvicorn on the running
    loop, the collector's: apps instrumented with OpenTelemetry then report into the same
    stream (and ``-o`` file) as hopscope's own sinks, and ``deliver`` runs on the same
    thread as the collector's consumer, so neither needs a lock.

    The socket is bound in ``__init__``: a port in use is a one-line
    :class:`~hopscope.app.collector.CollectorError` before anything runs.
    """

    def __init__(self, address: str, deliver: Deliver, *, allow_remote: bool = False) -> None:
        import errno
        import socket

        from hopscope.tracing.sinks import parse_address

        try:
            family, where = parse_address(address)
        except ValueError as exc:
            raise CollectorError(f"--otlp-listen: {exc}") from None
        if family != "tcp":
            raise CollectorError(f"--otlp-listen {address}: give HOST:PORT")
        host, port = where
        if not allow_remote and not _is_loopback(host):
            raise CollectorError(
                f"refusing OTLP on non-loopback address {host!r} (--allow-remote allows it)"
            )
        self.deliver = deliver
        family_ = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family_, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(512)
        except OSError as exc:
            sock.close()
            in_use = exc.errno == errno.EADDRINUSE
            reason = "address already in use" if in_use else exc.strerror or str(exc)
            raise CollectorError(f"cannot take OTLP on {host}:{port}: {reason}") from None
        self.sock = sock
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/v1/traces"
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self.invalid = 0

    async def start(self) -> None:
        import uvicorn

        from .otlp_receiver import OtlpReceiver

        self.receiver = OtlpReceiver(self.deliver)
        config = uvicorn.Config(
            self.receiver,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
        )
        logging.getLogger("uvicorn.error").addFilter(self._once)
        self._server = server = uvicorn.Server(config)
        # _serve, not serve: serve() takes over SIGINT/SIGTERM on the main thread, and
        # here they belong to the collector's owner.
        self._task = asyncio.create_task(server._serve(sockets=[self.sock]))
        while not server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if not server.started:
            self.sock.close()
            raise CollectorError("the OTLP receiver did not start")

    def _once(self, record: logging.LogRecord) -> bool:
        """uvicorn logs each connection that is not HTTP; a peer sending garbage in a loop
        would fill the terminal, so the first is said in hopscope's words, the rest only
        counted (:attr:`invalid`)."""
        if record.getMessage() != "Invalid HTTP request received.":
            return True
        self.invalid += 1
        if self.invalid == 1:
            print(
                f"hopscope: OTLP/HTTP on {self.url}: dropped a connection that did not send "
                "valid HTTP; the collector carries on (later ones are not shown)",
                file=sys.stderr,
                flush=True,
            )
        return False

    async def stop(self) -> None:
        logging.getLogger("uvicorn.error").removeFilter(self._once)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait({self._task}, timeout=5)
        self.sock.close()


# -- the child ------------------------------------------------------------------------------


class _Batcher:
    """Gathers the collector's batches into frames for the parent."""

    def __init__(self, link: ParentLink, loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.loop = loop
        self.pending: list[Event] = []
        self.scheduled = False

    def consume(self, events: list[Event]) -> None:
        self.pending.extend(events)
        if len(self.pending) >= FLUSH_EVENTS:
            self.flush()
        elif not self.scheduled:
            self.scheduled = True
            self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.pending:
            events, self.pending = self.pending, []
            # Blocking: when the UI cannot keep up, the collector stops reading its
            # sockets, and the apps' sinks queue (then drop, counted) as they are built to.
            self.link.send(("events", events))


async def _serve(args: argparse.Namespace, link: ParentLink) -> int:
    batcher = _Batcher(link, asyncio.get_running_loop())
    collector = Collector(
        args.listen, batcher.consume, output=args.output, allow_remote=args.allow_remote
    )
    otlp: OtlpListener | None = None
    try:
        if args.otlp_listen:
            otlp = OtlpListener(
                args.otlp_listen, _also_written(collector, batcher.consume),
                allow_remote=args.allow_remote,
            )  # fmt: skip
        await collector.start()
        if otlp is not None:
            await otlp.start()
    except CollectorError as exc:
        await collector.stop()
        link.send(("error", str(exc)))
        return 1
    link.send(("ready", collector.url))
    try:
        while not link.stopped():
            await asyncio.sleep(0.1)
    finally:
        if otlp is not None:
            await otlp.stop()
        await collector.stop()
        batcher.flush()
    return 0


def _also_written(collector: Collector, consume: Deliver) -> Deliver:
    """Events from OTLP go where the collector's go: its ``-o`` file, then ``consume``."""

    def deliver(events: list[Event]) -> None:
        if collector.writer is not None:
            collector.writer.write(events)
        consume(events)

    return deliver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hopscope.app.feed")
    parser.add_argument("--listen", required=True, help="HOST:PORT or unix:PATH")
    parser.add_argument("--output", help="also write the events to this trace file")
    parser.add_argument("--allow-remote", action="store_true")
    parser.add_argument("--otlp-listen", help="also take OTLP/HTTP on this HOST:PORT")
    args = parser.parse_args(argv)
    link = ParentLink()
    try:
        return asyncio.run(_serve(args, link))
    except BrokenPipeError:  # the parent went away first
        return 0


# -- the parent -----------------------------------------------------------------------------


class CollectorFeed:
    """Starts the child collector and hands its event batches to ``deliver``.

    ``deliver`` runs on a reader thread of this process, and so does ``on_exit`` (with
    the child's last words) should the collector end before :meth:`stop`.  :meth:`start`
    returns once the child listens, or raises :class:`CollectorError` with its one-line
    reason.
    """

    def __init__(
        self,
        address: str,
        deliver: Deliver,
        *,
        output: str | None = None,
        allow_remote: bool = False,
        on_exit: Callable[[str], None] | None = None,
        otlp_listen: str | None = None,
    ) -> None:
        self.deliver = deliver
        self.on_exit = on_exit
        args = ["--listen", address]
        if otlp_listen is not None:
            args += ["--otlp-listen", otlp_listen]
        if output is not None:
            args += ["--output", output]
        if allow_remote:
            args.append("--allow-remote")
        self.child = ChildProcess("hopscope.app.feed", args)
        self.url = ""
        self.frames = 0
        """Event frames received (a live count: settling waits for it to stay put)."""
        self.events = 0

    def start(self) -> CollectorFeed:
        try:
            self.url = str(self.child.start())
        except ChildError as exc:
            raise CollectorError(str(exc)) from None
        self.child.follow(self._receive, "hopscope-feed", self.on_exit)
        return self

    def _receive(self, message: Any) -> None:
        if isinstance(message, tuple) and len(message) == 2 and message[0] == "events":
            events = message[1]
            if isinstance(events, list) and events:
                self.frames += 1
                self.events += len(events)
                self.deliver(events)

    def settle(self) -> None:
        """Wait briefly until no batch arrives (see :func:`wait_quiet`)."""
        wait_quiet(lambda: self.frames)

    def stop(self) -> None:
        """Stop the child (its file closed, its port free) and the reader thread."""
        self.child.stop()


if __name__ == "__main__":
    sys.exit(main())
