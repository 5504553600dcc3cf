"""The commands' terminal UI: each live command built as a :class:`Session`.

A session is the UI app plus everything started for it (collector, proxy, servers,
traffic), registered on one exit stack and stopped in reverse when the UI closes.  The
builders start everything *before* the UI, so a port in use or a bad file is a one-line
error with no screen drawn; tests build the same sessions and drive the app with
Textual's pilot instead of a terminal.

Live events come from :class:`~hopscope.app.feed.CollectorFeed` (a collector in a child
process), pushed into a :class:`~hopscope.tui.source.QueueSource`.  What measures time
(the proxy, the demo's client) runs in helper processes too (:mod:`hopscope.app.child`):
in the UI's process it would be stamped late by whatever the UI was drawing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from hopscope.tracing.tracefile import TraceFileError
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import PlaybackSource, QueueSource, notice, open_file

from .collector import CollectorError, OutputFileError
from .feed import CollectorFeed

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "Session",
    "build_proxy_app",
    "build_view_app",
    "build_watch_app",
    "live_source",
]

DEFAULT_MAX_REQUESTS = 50_000


class Session:
    """A UI app and what was started for it; :meth:`close` stops it all (once)."""

    def __init__(
        self,
        app: HopscopeApp,
        stack: contextlib.ExitStack,
        urls: dict[str, str] | None = None,
    ) -> None:
        self.app = app
        self.stack = stack
        self.urls = urls or {}
        """Where things listen (``collector``, ``proxy``, ``app``): for tests and messages."""
        self.exit_status = 0
        self.messages: list[str] = []
        """Lines for stderr once the UI is gone (while it runs, the screen is the UI's)."""

    def close(self) -> None:
        self.stack.close()

    def run(self) -> int:
        """Run the UI in this terminal until ``q`` or Ctrl+C, then stop everything."""
        try:
            asyncio.run(self._run())
        finally:
            self.close()
        for message in self.messages:
            print(message, file=sys.stderr)
        return self.exit_status

    async def _run(self) -> None:
        # kill, a closed terminal, or a SIGINT from outside end the UI like its `q`, so
        # the exit stack still stops what was started.
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(signum, self.app.exit)
                installed.append(signum)
        try:
            await self.app.run_async()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)


def live_source(
    stack: contextlib.ExitStack,
    address: str,
    description: str,
    *,
    output: str | None = None,
    allow_remote: bool = False,
    otlp: str | None = None,
    otlp_listen: str | None = None,
) -> tuple[QueueSource, CollectorFeed]:
    """A collector child listening on ``address`` (and on ``otlp_listen`` for OTLP/HTTP)
    and the UI source it feeds; with ``otlp``, finished traces also go to that OTLP/HTTP
    endpoint (from here, the one place that sees every event once).

    Raises :class:`~hopscope.app.collector.CollectorError`.  On close, the collector
    first waits for the last batches (what stopping apps flushed), so ``-o`` has them.
    """
    source = QueueSource(description)
    deliver: Callable[[list[dict[str, Any]]], None] = source.push
    sender = None
    if otlp is not None:
        from .otlp_sender import OtlpSender

        def warn(message: str) -> None:
            source.push([notice(message, "warning")])

        try:
            sender = OtlpSender(otlp, warn=warn)
        except ValueError as exc:
            raise CollectorError(str(exc)) from None
        stack.callback(sender.close)
        feed_otlp = sender.feed

        def both(events: list[dict[str, Any]]) -> None:
            feed_otlp(events)
            source.push(events)

        deliver = both

    def lost(reason: str) -> None:
        source.push([notice(f"the collector stopped: {reason}", "error")])

    feed = CollectorFeed(
        address, deliver, output=output, allow_remote=allow_remote, on_exit=lost,
        otlp_listen=otlp_listen,
    )  # fmt: skip
    feed.start()

    def close() -> None:
        feed.settle()
        feed.stop()

    stack.callback(close)
    return source, feed


def _app(source: Any, title: str, output: str | None, max_requests: int) -> HopscopeApp:
    return HopscopeApp(source, title=title, max_requests=max_requests, recording=output)


def build_watch_app(
    listen: str,
    *,
    output: str | None = None,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    allow_remote: bool = False,
    otlp: str | None = None,
    otlp_listen: str | None = None,
) -> Session:
    """``hopscope watch``: only the collector, for apps wrapped in code (and, with
    ``otlp_listen``, apps instrumented with OpenTelemetry).

    Raises :class:`~hopscope.app.collector.CollectorError`.
    """
    stack = contextlib.ExitStack()
    try:
        source, feed = live_source(
            stack, listen, "watch", output=output, allow_remote=allow_remote, otlp=otlp,
            otlp_listen=otlp_listen,
        )  # fmt: skip
        source.description = f"watch {feed.url}"
        app = _app(source, "hopscope watch", output, max_requests)
        return Session(app, stack, {"collector": feed.url})
    except BaseException:
        stack.close()
        raise


def build_view_app(
    path: str,
    *,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    play: bool = False,
    speed: float = 1.0,
) -> Session:
    """``hopscope view FILE``: a saved trace file or a HAR file, read-only; with
    ``play``, fed in at the recorded pace (``speed`` times faster).

    Raises :class:`~hopscope.tracing.TraceFileError` before any UI exists.
    """
    if path == "-":  # (without the UI, ``-`` reads the file from stdin)
        raise TraceFileError("reading FILE from stdin (-) needs --headless: the UI reads keys")
    source = PlaybackSource.open(path, speed=speed) if play else open_file(path, keep=max_requests)
    app = HopscopeApp(source, title="hopscope view", max_requests=max_requests)
    return Session(app, contextlib.ExitStack())


def build_proxy_app(
    upstream: str,
    *,
    listen: str = "127.0.0.1:8080",
    output: str | None = None,
    collector: str = "127.0.0.1:7401",
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    server_timing: bool = False,
    otlp: str | None = None,
    insecure: bool = False,
    keep_host: bool = False,
) -> Session:
    """``hopscope proxy`` with the UI: the proxy and the collector in helper processes.

    Raises :class:`~hopscope.app.proxy.ProxyError` with a one-line reason.
    """
    from .front import FrontProcess
    from .proxy_config import ProxyError, bind, parse_listen, parse_upstream

    target = parse_upstream(upstream)
    host, port = parse_listen(listen)
    stack = contextlib.ExitStack()
    try:
        sock = stack.enter_context(bind(host, port))
        bound = sock.getsockname()
        try:
            source, feed = live_source(stack, collector, "proxy", output=output, otlp=otlp)
        except CollectorError as exc:
            # The collector runs in a child: its error comes back as one line, not a type.
            if isinstance(exc, OutputFileError) or OutputFileError.said(output, str(exc)):
                raise ProxyError(str(exc)) from None
            raise ProxyError(f"{exc} (choose another with --collector)") from None
        front = FrontProcess(
            sock,
            str(target),
            feed.url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            server_timing=server_timing,
            insecure=insecure,
            keep_host=keep_host,
            on_exit=lambda reason: source.push(
                [notice(f"hopscope's proxy stopped: {reason}", "error")]
            ),
        )
        sock.close()  # the proxy's process has its own copy
        stack.callback(front.stop)
        shown = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        source.description = f"proxy {shown} → {target}"
        app = _app(source, "hopscope proxy", output, max_requests)
        return Session(app, stack, {"proxy": f"http://{shown}", "collector": feed.url})
    except BaseException:
        stack.close()
        raise
