"""``hopscope demo``: every hop of a request, on a demo app, started and stopped together.

The demo app runs as a real uvicorn process with hopscope's server hook, behind
hopscope's proxy, driven by a traffic generator that records the client hop, all sending
to one collector: each request is one trace from the client's first byte to the app's
background work.  Only the ports are picked for the user.  Everything started here is
stopped here, on success, error, Ctrl+C or the UI's ``q``: the traffic stops first, then
the proxy, then the app process (terminated, then killed if it lingers), and the
collector last, once the final records are in.

Two ways to watch: text lines (:func:`run_demo`, ``--headless``) or the UI
(:func:`build_demo_app`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import click
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import notice

from ..child import ChildError, ChildProcess
from ..collector import BackgroundCollector, wait_quiet
from ..tail import Tail
from ..ui import Session, live_source
from .engine import Demo, DemoError, listen
from .traffic import TrafficError

__all__ = ["DemoError", "build_demo_app", "run_demo"]

#: How long to wait for the last requests' records once the traffic has stopped.
SETTLE_TIMEOUT = 15.0
#: Seconds a finished request's line waits for its late spans (``hopscope tail``: 0.3).
HOLD = 1.0
#: Seconds the demo's engine may take to stop its traffic, proxy and app before it is
#: killed (more than its own timeouts add up to, so it never leaves the app behind).
ENGINE_STOP = 30.0


def run_demo(
    *,
    requests: int | None = None,
    port: int = 0,
    output: str | None = None,
    delay: float = 0.2,
    out: Any = None,
    otlp: str | None = None,
    server_timing: bool = False,
) -> int:
    """Run the demo printing a line per request; returns the number of lines printed.

    Raises :class:`DemoError` (or the collector's ``CollectorError``) with a one-line
    reason.  Ctrl+C ends it cleanly.
    """
    # Four hops report each request from three senders (the client, the proxy, the app
    # process), each in its own batches: hold lines a little longer than a tail does, so
    # a busy machine still prints whole requests.
    tail = Tail(out, hold=HOLD)
    demo: Demo | None = None
    sender = _sender(otlp)

    def consume(events: list[dict[str, Any]]) -> None:
        if sender is not None:
            sender.feed(events)
        try:
            tail.feed(events)
        except BrokenPipeError:  # ``hopscope demo | head``: the reader is done
            if demo is not None:
                demo.traffic.stop.set()

    with contextlib.ExitStack() as stack:
        public = stack.enter_context(listen(port))
        collector = BackgroundCollector("127.0.0.1:0", consume, output=output).start()

        def stop_collector() -> None:
            wait_quiet(lambda: collector.collector.frames)
            collector.stop()
            with contextlib.suppress(BrokenPipeError):
                tail.close()
            if sender is not None:
                sender.close()
                click.echo(f"hopscope: {sender.summary()}", err=True)

        stack.callback(stop_collector)
        try:
            demo = Demo(stack, public, collector.url, delay=delay, server_timing=server_timing)
            click.echo(
                f"hopscope demo: open {demo.url} (hopscope's proxy; app on {demo.app_url}, "
                f"collector on {collector.url}) (Ctrl+C to stop)",
                err=True,
            )
            try:
                sent = demo.traffic.run(requests)
            except TrafficError as exc:
                raise DemoError(demo.failure(exc)) from None
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while tail.printed < sent and not demo.traffic.stop.is_set():
                if time.monotonic() > deadline:
                    click.echo(
                        f"hopscope demo: only {tail.printed} of {sent} requests were reported",
                        err=True,
                    )
                    break
                time.sleep(0.05)
        except KeyboardInterrupt:
            if demo is not None:
                demo.traffic.stop.set()
    return tail.printed


def _sender(url: str | None) -> Any:
    """An OTLP sender for ``--otlp URL`` (a bad URL is a one-line error), or None."""
    if url is None:
        return None
    from ..otlp_sender import OtlpSender

    try:
        return OtlpSender(url, warn=lambda line: click.echo(f"hopscope: {line}", err=True))
    except ValueError as exc:
        raise DemoError(str(exc)) from None


def build_demo_app(
    *,
    requests: int | None = None,
    port: int = 0,
    output: str | None = None,
    delay: float = 0.2,
    max_requests: int = 50_000,
    otlp: str | None = None,
    server_timing: bool = False,
) -> Session:
    """The demo under the UI, as a :class:`~hopscope.app.ui.Session` (not yet running).

    The app, the proxy and the traffic run in a helper process (see
    :mod:`~hopscope.app.demo.engine`), and the traffic starts now (until ``requests``
    were sent, or the session closes).  Raises :class:`DemoError` or ``CollectorError``.
    """
    stack = contextlib.ExitStack()
    try:
        public = stack.enter_context(listen(port))
        source, feed = live_source(stack, "127.0.0.1:0", "demo", output=output, otlp=otlp)
        args = ["--fd", str(public.fileno()), "--sink", feed.url, "--delay", repr(delay)]
        if server_timing:
            args.append("--server-timing")
        if requests is not None:
            args += ["--requests", str(requests)]
        engine = ChildProcess("hopscope.app.demo.engine", args, pass_fds=(public.fileno(),))
        try:
            urls = engine.start()
        except ChildError as exc:
            raise DemoError(str(exc)) from None
        stack.callback(engine.stop, ENGINE_STOP)
        public.close()  # the engine has its own copy

        def on_frame(message: Any) -> None:
            if isinstance(message, tuple) and len(message) == 3 and message[0] == "notice":
                source.push([notice(str(message[1]), str(message[2]))])

        def on_exit(reason: str) -> None:
            source.push([notice(f"the demo stopped: {reason}", "error")])

        engine.follow(on_frame, "hopscope-demo-engine", on_exit)
        source.description = f"demo {urls['proxy']}"
        app = HopscopeApp(
            source, title="hopscope demo", max_requests=max_requests, recording=output
        )
        urls = {**urls, "collector": feed.url}
        return Session(app, stack, urls)
    except BaseException:
        stack.close()
        raise
