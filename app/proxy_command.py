"""Running ``hopscope proxy``: the listening socket, the server, and where records go.

The proxy itself is :class:`~hopscope.app.proxy.ProxyApp`; this module starts it under
uvicorn on a socket bound before anything else starts (a port in use is one line), with the
collector and tail its records go to, in a child process by default (why:
:class:`_ChildProcess`), and stops them in order on Ctrl+C or SIGTERM so the last records
land and the summary line is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from hopscope.tracing.records import Record
from hopscope.tracing.sinks import Sink, SocketSink, _BatchingSink

from .accept import raise_open_files_limit
from .collector import tune_gc
from .proxy import ProxyApp, ProxyHttpProtocol
from .proxy_config import ProxyError, bind, check_timeout, parse_listen, parse_upstream

__all__ = ["proxy_server", "run_proxy"]


class _LocalSink(_BatchingSink):
    """Hands batches to the in-process collector's loop, skipping the socket round trip.

    A batching sink like the others (bounded queue, drain thread, requests taken as
    recordings); its "write" delivers the batch on the collector's loop exactly as a
    SocketSink batch would arrive there.
    """

    def __init__(
        self,
        deliver: Callable[[dict[str, Any], int, list[Record]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        from hopscope.tracing.records import process_info

        self._deliver = deliver
        self._loop = loop
        self._info = process_info(os.getpid())
        super().__init__()

    def _write(self, batch: list[Record], dropped: int) -> None:
        self._loop.call_soon_threadsafe(self._deliver, self._info, dropped, batch)


@contextlib.contextmanager
def _quiet_signals(server: Any) -> Iterator[None]:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it
    found: make that one only ask ``server`` to stop, so SIGTERM ends the proxy as
    cleanly as Ctrl+C (the last records delivered, the trace file closed, the summary
    printed).  Asking, not nothing: a signal that comes before uvicorn has set its own
    handlers (it starts the lifespan first) was lost, and the proxy served on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_: Any) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: Said after a collector's error about its address (port in use, bad address), and only then.
_ADDRESS_HINT = "--collector picks another address"


class _Recording:
    """The collector and tail the proxy's records go to: started here, stopped here."""

    url: str
    sink: Sink

    def stop(self) -> str:
        """Stop; returns the end-of-run summary."""
        raise NotImplementedError


class _InProcess(_Recording):
    """Collector and tail on a thread of this process; ``sink_kind`` says how the proxy's
    records reach them: ``local`` (handed to the collector's loop) or ``socket`` (a
    SocketSink to the collector's port, as an app would)."""

    def __init__(
        self, address: str, output: str | None, sink_kind: str, out: TextIO | None
    ) -> None:
        from .collector import BackgroundCollector, CollectorError, OutputFileError
        from .tail import Tail

        self.tail = tail = Tail(out)

        def consume(events: list[dict[str, Any]]) -> None:
            with contextlib.suppress(BrokenPipeError):
                tail.feed(events)

        def take(records: list[Any], info: dict[str, Any], dropped: int) -> int:
            with contextlib.suppress(BrokenPipeError):
                return tail.feed_records(records, info, dropped)
            return 0

        try:
            self.background = BackgroundCollector(
                address, consume, output=output, records=take
            ).start()
        except OutputFileError as exc:
            raise ProxyError(str(exc)) from None
        except CollectorError as exc:
            raise ProxyError(f"{exc}; {_ADDRESS_HINT}") from None
        self.url = self.background.url
        if sink_kind == "socket":
            self.sink = SocketSink(self.url)
        else:
            loop = self.background._loop
            assert loop is not None
            self.sink = _LocalSink(self.background.collector._deliver, loop)

    def stop(self) -> str:
        self.sink.flush()
        time.sleep(0.1)  # the last batch of an app upstream, if it is still on its way
        self.sink.close()
        self.background.stop()
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.tail.close()  # lines still held for late spans
        dropped = self.background.collector.dropped + self.sink.dropped
        note = f", {dropped} events dropped" if dropped else ""
        return f"hopscope proxy: stopped after {self.tail.printed} request(s){note}"


class _ChildProcess(_Recording):
    """``hopscope tail --listen`` in a child process, fed by a SocketSink.

    Why (measured with ``bench/proxy.py --variants`` on a 2-CPU machine): decoding records
    and folding them into tail lines costs about as much CPU per request as proxying it.
    On a thread of the proxy's process that work holds the GIL in 5 ms slices, and the
    proxy's p99 latency doubled; in a child process throughput was the same or better
    and p99 halved, and where a spare core exists the work runs in parallel.  The child
    ignores SIGINT so that Ctrl+C in a terminal stops the proxy first: the proxy then
    delivers its last records and stops the child with SIGTERM.
    """

    def __init__(self, address: str, output: str | None, otlp: str | None = None) -> None:
        import subprocess

        from .child import ChildError, spawn, wait_line
        from .collector import OutputFileError

        argv = [sys.executable, "-m", "hopscope.app", "tail", "--listen", address]
        if output is not None:
            argv += ["-o", output]
        if otlp is not None:
            argv += ["--otlp", otlp]
        try:
            self.proc = spawn(argv, stderr=subprocess.PIPE, with_parent=True)
        except ChildError as exc:
            raise ProxyError(str(exc)) from None
        assert self.proc.stderr is not None
        first, self._said = wait_line(self.proc, self.proc.stderr.fileno(), timeout=30)
        match = (first or "").partition("listening on ")[2].partition(";")[0]
        if not match:
            self._said += self._stop()
            said = self._said.decode(errors="replace").strip().splitlines()
            reason = (first or (said[-1] if said else "")).strip().removeprefix("Error: ")
            if OutputFileError.said(output, reason):
                raise ProxyError(reason)
            reason = reason or "the collector did not start"
            raise ProxyError(f"{reason}; {_ADDRESS_HINT}")
        self.url = match
        self.sink = SocketSink(self.url)

    def _stop(self) -> bytes:
        """Stop the child (SIGTERM, then SIGKILL) and return the rest of its stderr."""
        from .child import stop

        stop(self.proc, 10.0, signal.SIGTERM)
        assert self.proc.stderr is not None
        with self.proc.stderr:
            return self.proc.stderr.read()

    def stop(self) -> str:
        self.sink.flush()
        time.sleep(0.1)
        self.sink.close()
        err = (self._said + self._stop()).decode(errors="replace")
        lines = err.strip().splitlines() or [""]
        # The child's stderr is only read now: its --otlp warning and summary come here.
        said = [line for line in lines[:-1] if "OTLP" in line] + lines[-1:]
        return "\n".join(line.replace("hopscope: ", "hopscope proxy: ", 1) for line in said)


def proxy_server(app: ProxyApp) -> Any:
    """A ``uvicorn.Server`` for the proxy (every command that serves it uses this one):
    the observing httptools protocol, no headers of uvicorn's own (a proxy adds no
    Server or Date), no X-Forwarded-* trust (the proxy sets them for its upstream), and
    on the sockets it is given no more clients than descriptors allow
    (:class:`~hopscope.app.accept.GatedServer`)."""
    import uvicorn

    from .accept import GatedServer

    config = uvicorn.Config(
        app,
        http=ProxyHttpProtocol,
        ws="websockets-sansio",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    return GatedServer(config)


def run_proxy(
    upstream: str,
    *,
    listen: str = "127.0.0.1:8080",
    output: str | None = None,
    collector: str = "127.0.0.1:7401",
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    sink_kind: str = "process",
    out: TextIO | None = None,
    server_timing: bool = False,
    otlp: str | None = None,
    insecure: bool = False,
    keep_host: bool = False,
) -> None:
    """Serve the proxy until SIGINT/SIGTERM, printing a tail line per request.

    Starts the collector (apps upstream send their spans to it), so the proxy's spans
    and the app's meet in one tail and one ``-o`` file.  ``sink_kind`` picks where it
    runs: ``process`` (the default, see :class:`_ChildProcess`), or in this process with
    records handed over (``local``) or sent to its port (``socket``, see
    :class:`_InProcess`).  Raises :class:`ProxyError` with a one-line reason.
    """
    target = parse_upstream(upstream)
    host, port = parse_listen(listen)
    check_timeout("--connect-timeout", connect_timeout)
    check_timeout("--read-timeout", read_timeout)
    sock = bind(host, port)
    recording: _Recording
    try:
        if sink_kind == "process":
            recording = _ChildProcess(collector, output, otlp)
        else:
            recording = _InProcess(collector, output, sink_kind, out)
    except BaseException:
        sock.close()
        raise
    app = ProxyApp(
        target,
        recording.sink,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        server_timing=server_timing,
        insecure=insecure,
        keep_host=keep_host,
    )
    raise_open_files_limit()  # (after the recording child started: it keeps the shell's)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(
        f"hopscope proxy: http://{shown}:{bound[1]} -> {target}; "
        f"apps send traces to HOPSCOPE_SINK={recording.url} (Ctrl+C to stop)",
        file=sys.stderr,
        flush=True,
    )
    server = proxy_server(app)
    tune_gc()
    try:
        with _quiet_signals(server):
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        summary = recording.stop()
    print(summary, file=sys.stderr)
