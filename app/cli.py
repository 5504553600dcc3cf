"""The ``hopscope`` command.

User errors (a bad address, a port in use, an unreadable file) end with one line on
stderr and exit status 1, never a traceback; usage errors exit 2 as click does.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any

import click
from hopscope.tracing.tracefile import (
    SUMMARY_CUT_OFF,
    LoadReport,
    TraceFileError,
    read_events,
)

from .collector import DEFAULT_ADDRESS, BackgroundCollector, CollectorError, tune_gc
from .tail import Tail

__all__ = ["main"]

#: Events folded at once when reading a file: bounds memory on a huge file.
FILE_BATCH = 2048


def _ui_options(function: Any) -> Any:
    """``--ui/--headless`` and ``--max-requests``, shared by the commands with a UI."""
    function = click.option(
        "--max-requests",
        type=click.IntRange(min=1),
        default=50_000,
        show_default=True,
        metavar="N",
        help="Requests the UI keeps (the oldest go first; -o files keep everything).",
    )(function)
    return click.option(
        "--ui/--headless",
        "ui",
        default=None,
        help="The terminal UI, or one text line per request.  Default: the UI when stdin "
        "and stdout are a terminal, text lines otherwise (pipes, CI, tests).",
    )(function)


def _check_otlp(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from .otlp_sender import traces_url

        try:
            traces_url(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _otlp_option(function: Any) -> Any:
    """``--otlp URL``, shared by the live commands."""
    return click.option(
        "--otlp",
        metavar="URL",
        callback=_check_otlp,
        help="Also send finished traces to this OpenTelemetry collector (OTLP/HTTP JSON: "
        "http://HOST:4318 or .../v1/traces).  Never slows the command down.",
    )(function)


def _server_timing_option(function: Any) -> Any:
    """``--server-timing``, for the commands that serve or proxy an app."""
    return click.option(
        "--server-timing",
        is_flag=True,
        help="Add a Server-Timing header (server, proxy durations) to responses, "
        "for browser devtools.",
    )(function)


def want_ui(flag: bool | None) -> bool:
    """``--ui``/``--headless`` when given; otherwise the UI only on a terminal, so that
    pipes, CI and tests get text lines instead of a screen waiting for keys.

    When the answer is the UI, the user's config file (keys) is checked here, before
    anything starts: a bad one is one line and exit status 1, not a traceback later.
    """
    ui = flag if flag is not None else sys.stdin.isatty() and sys.stdout.isatty()
    if ui:
        from hopscope.tui.keymap import ConfigError, load_keymap

        try:
            load_keymap()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    return ui


def _run_session(build: Any, errors: tuple[type[Exception], ...], **options: Any) -> int:
    """Build a UI session (errors before any screen: one line, exit 1), then run it."""
    try:
        session = build(**options)
    except errors as exc:
        raise click.ClickException(str(exc)) from None
    return int(session.run())


def _version() -> str:
    try:
        return version("hopscope")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="hopscope", message="%(prog)s %(version)s")
def main() -> None:
    """hopscope: see each request's life across client, proxy, server and app.

    Instrument an app with hopscope.tracing.wrap(app), then run "hopscope watch"
    to see its requests, or "hopscope demo" to see it all on a built-in app.

    The live commands (demo, run, proxy, watch) and view open a terminal UI when
    stdin and stdout are a terminal, and print one line per request otherwise;
    --ui and --headless choose.
    """
    _escape_what_stdout_cannot_encode()


def _escape_what_stdout_cannot_encode() -> None:
    """Print what an ASCII-only stdout cannot encode as backslash escapes, not crash.

    Paths, headers and bodies a server recorded hold any character (U+FFFD for bytes
    that were not UTF-8), and ``PYTHONIOENCODING=ascii`` or an old locale leaves stdout
    strict: a ``UnicodeEncodeError`` half-way through the output.  UTF streams encode
    every character already (``surrogateescape`` there is left alone).
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        try:
            encoding = codecs.lookup(stream.encoding).name
        except (AttributeError, LookupError, TypeError):
            continue
        if reconfigure is None or encoding.startswith("utf-"):
            continue
        if getattr(stream, "errors", None) in ("strict", "surrogateescape"):
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


@main.command()
@click.argument("file", required=False)
@click.option(
    "--listen",
    metavar="ADDR",
    help=f"Receive traces from running apps on HOST:PORT or unix:PATH "
    f"(the default, on {DEFAULT_ADDRESS}).",
)
@click.option("-o", "--output", metavar="FILE", help="Also save what is received to a trace file.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow --listen on a non-loopback address (only on networks you trust).",
)
@_otlp_option
def tail(
    file: str | None, listen: str | None, output: str | None, allow_remote: bool, otlp: str | None
) -> None:
    """Print one line per finished request.

    With FILE, for the requests saved in a trace file (or a HAR); otherwise live, for
    the requests apps send to the collector (until Ctrl+C).
    """
    if file is not None:
        if listen is not None or output is not None or otlp is not None:
            raise click.UsageError("FILE cannot be combined with --listen, --output or --otlp")
        _tail_file(file)
    else:
        _tail_live(listen or DEFAULT_ADDRESS, output, allow_remote, otlp)


def _tail_trace_file(path: str) -> None:
    tail = Tail(live=False)
    report = LoadReport()
    batch: list[dict[str, Any]] = []
    try:
        for event in read_events(path, report):
            batch.append(event)
            if len(batch) >= FILE_BATCH:
                tail.feed(batch)
                batch = []
        tail.feed(batch)
        tail.close()
    except TraceFileError as exc:
        raise click.ClickException(str(exc)) from None
    except BrokenPipeError:
        _quiet_stdout()
        return
    problems = []
    skipped = len(report.malformed_lines) + tail.malformed
    if skipped:
        problems.append(f"skipped {skipped} malformed line(s)")
    if report.truncated_last_line:
        problems.append("the last line was cut off")
    if report.summary_cut_off:
        problems.append(SUMMARY_CUT_OFF)
    if tail.unfinished():
        problems.append(f"{tail.unfinished()} request(s) never finished")
    if problems:
        click.echo(f"hopscope: {path}: " + "; ".join(problems), err=True)


def _tail_live(
    address: str,
    output: str | None,
    allow_remote: bool,
    otlp: str | None = None,
    otlp_listen: str | None = None,
) -> None:
    tail = Tail()
    stop = threading.Event()
    sender = None
    processes: dict[Any, Any] = {}  # pid -> server software, of every app that reported
    if otlp is not None:
        from .otlp_sender import OtlpSender

        sender = OtlpSender(otlp, warn=lambda message: click.echo(f"hopscope: {message}", err=True))

    def consume(events: list[dict[str, Any]]) -> None:
        if sender is not None:
            sender.feed(events)
        if stop.is_set():
            return
        try:
            tail.feed(events)
        except BrokenPipeError:  # ``hopscope tail | head``: the reader is done
            _quiet_stdout()
            stop.set()

    def take(records: list[Any], info: dict[str, Any], dropped: int) -> int:
        if stop.is_set():
            return 0
        try:
            return tail.feed_records(records, info, dropped)
        except BrokenPipeError:
            _quiet_stdout()
            stop.set()
            return 0

    try:
        collector = BackgroundCollector(
            address,
            consume,
            output=output,
            allow_remote=allow_remote,
            records=take if sender is None else None,
            warn=lambda message: click.echo(f"hopscope: {message}", err=True),
            hello=lambda info: processes.setdefault(
                info.get("process.pid"), info.get("server.software")
            ),
        ).start()
    except CollectorError as exc:
        if sender is not None:
            sender.close(0)
        raise click.ClickException(str(exc)) from None
    listener = None
    if otlp_listen is not None:
        try:
            listener = _otlp_listener(collector, otlp_listen, consume, allow_remote)
        except CollectorError as exc:
            collector.stop()
            if sender is not None:
                sender.close(0)
            raise click.ClickException(str(exc)) from None
    also = f" and OTLP/HTTP on {listener.url}" if listener is not None else ""
    tune_gc()  # a long-running recorder of its own (the proxy's child is one)
    click.echo(
        f"hopscope: listening on {collector.url}{also}; "
        f"start apps with HOPSCOPE_SINK={collector.url} (Ctrl+C to stop)",
        err=True,
    )
    with _stop_on_sigterm(stop):
        try:
            while not stop.wait(0.25):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if listener is not None:
                _on_loop(collector, listener.stop())
            collector.stop()
    with contextlib.suppress(BrokenPipeError):
        tail.close()
    if sender is not None:
        sender.close()
        click.echo(f"hopscope: {sender.summary()}", err=True)
    dropped, rejected = collector.collector.dropped, collector.collector.rejected
    note = f", {dropped} events dropped by apps" if dropped else ""
    if rejected:
        note += f", {rejected} connection(s) dropped for bad data"
    click.echo(
        f"hopscope: stopped after {tail.printed} request(s){_senders(processes)}{note}", err=True
    )


#: At most this many pids in the stop line.
SHOWN_PIDS = 20


def _senders(processes: dict[Any, Any]) -> str:
    """``from pid 12, 13 (uvicorn/0.30.1), 14 (gunicorn/23.0.0)``: which workers reported,
    so a team sees that every one of them reached the collector."""
    by_server: dict[str, list[str]] = {}
    for pid, software in list(processes.items())[:SHOWN_PIDS]:
        by_server.setdefault(software or "", []).append(str(pid))
    parts = [
        ", ".join(pids) + (f" ({server})" if server else "") for server, pids in by_server.items()
    ]
    more = len(processes) - SHOWN_PIDS
    if more > 0:  # workers recycled all day long: the line stays a line
        parts.append(f"and {more} more")
    return ", from pid " + ", ".join(parts) if parts else ""


def _otlp_listener(
    collector: BackgroundCollector, address: str, consume: Any, allow_remote: bool
) -> Any:
    """OTLP/HTTP on ``address``, served on the collector's own loop (its events go to the
    same ``-o`` file and consumer, from the same thread)."""
    from .feed import OtlpListener, _also_written

    listener = OtlpListener(
        address, _also_written(collector.collector, consume), allow_remote=allow_remote
    )
    try:
        _on_loop(collector, listener.start())
    except BaseException:
        listener.sock.close()
        raise
    return listener


def _on_loop(collector: BackgroundCollector, coroutine: Any) -> Any:
    import asyncio

    loop = collector._loop
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(15)


@main.command()
@click.option(
    "--listen",
    metavar="ADDR",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="Receive traces from running apps on HOST:PORT or unix:PATH.",
)
@click.option("-o", "--output", metavar="FILE", help="Also save what is received to a trace file.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow --listen on a non-loopback address (only on networks you trust).",
)
@_otlp_option
@click.option(
    "--otlp-listen",
    metavar="HOST:PORT",
    is_flag=False,
    flag_value="127.0.0.1:4318",
    default=None,
    help="Also take OpenTelemetry traces (OTLP/HTTP, POST /v1/traces) from apps "
    "instrumented with OpenTelemetry; alone, on 127.0.0.1:4318.",
)
@_ui_options
def watch(
    listen: str,
    output: str | None,
    allow_remote: bool,
    ui: bool | None,
    max_requests: int,
    otlp: str | None,
    otlp_listen: str | None,
) -> None:
    """Watch the requests of apps you wrapped in code (hopscope.tracing.wrap(app)).

    Only the collector runs here: start your app as usual (it sends to 127.0.0.1:7401
    unless HOPSCOPE_SINK says otherwise).  q or Ctrl+C stops; --headless prints one
    line per request, as "hopscope tail" does.
    """
    if not want_ui(ui):
        _tail_live(listen, output, allow_remote, otlp, otlp_listen)
        return
    from .ui import build_watch_app

    _run_session(
        build_watch_app,
        (CollectorError,),
        listen=listen,
        output=output,
        allow_remote=allow_remote,
        max_requests=max_requests,
        otlp=otlp,
        otlp_listen=otlp_listen,
    )


@main.command()
@click.argument("file")
@_ui_options
@click.option("--play", is_flag=True, help="Feed the requests in at their recorded pace.")
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    metavar="N",
    help="With --play: N times faster than recorded.",
)
def view(file: str, ui: bool | None, max_requests: int, play: bool, speed: float) -> None:
    """Look at the requests saved in FILE: a hopscope trace file (-o, Ctrl+S) or a HAR
    file saved by a browser.  Read-only; --headless prints one line per request.

    --play feeds them in as they happened (space pauses, . steps one request, [ and ]
    seek 10 s back and on)."""
    if want_ui(ui):
        from .ui import build_view_app

        _run_session(
            build_view_app,
            (TraceFileError,),
            path=file,
            max_requests=max_requests,
            play=play,
            speed=speed,
        )
        return
    if play:
        raise click.UsageError("--play needs the UI (not --headless).")
    _tail_file(file)


#: How every trace file hopscope writes starts (``tracefile.header_line``).
_HEADER_START = b'{"format":"hopscope",'


def _tail_file(path: str) -> None:
    """One line per request of a trace file or of a HAR (``tail FILE``, ``view
    --headless``)."""
    from hopscope.tui.source import har_events

    if path == "-":  # the file on stdin (``... | hopscope view -``)
        path = "/dev/stdin"
    # A trace file is not read whole to be told apart, and a pipe (``<(zcat ...)``) is
    # read once: as a trace file, as tail always read it.
    is_trace_file = True  # or read_events says why it is not, in its words
    if os.path.isfile(path):
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            is_trace_file = handle.read(len(_HEADER_START)) == _HEADER_START
    try:
        events = None if is_trace_file else har_events(path)
    except TraceFileError as exc:
        raise click.ClickException(str(exc)) from None
    if events is None:
        _tail_trace_file(path)
        return
    tail = Tail(live=False)
    try:
        tail.feed(events)
        tail.close()
    except BrokenPipeError:
        _quiet_stdout()


@main.command()
@click.option(
    "--requests",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Stop the traffic after this many requests (default: run until stopped).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default="a free port",
    help="Port of hopscope's proxy in front of the demo app, on 127.0.0.1.",
)
@click.option("-o", "--output", metavar="FILE", help="Also save the traces to a trace file.")
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Seconds between requests.",
)
@_otlp_option
@_server_timing_option
@_ui_options
def demo(
    requests: int | None,
    port: int,
    output: str | None,
    delay: float,
    otlp: str | None,
    server_timing: bool,
    ui: bool | None,
    max_requests: int,
) -> None:
    """See every hop of a request on a built-in demo app.

    The app runs under uvicorn in a child process, instrumented with
    hopscope.tracing.wrap and hopscope's server hook, exactly as your own app would,
    behind hopscope's proxy; a traffic generator sends it every kind of request and
    records the client's side.  Each request is one trace: client, proxy, server, app.

    In the UI, q or Ctrl+C stops everything; with --headless one line is printed per
    request, and --requests ends the demo.
    """
    from .demo.run import DemoError, build_demo_app, run_demo

    options: dict[str, Any] = {
        "requests": requests, "port": port, "output": output, "delay": delay,
        "otlp": otlp, "server_timing": server_timing,
    }  # fmt: skip
    if want_ui(ui):
        _run_session(
            build_demo_app, (DemoError, CollectorError), max_requests=max_requests, **options
        )
        return
    try:
        run_demo(**options)
    except (DemoError, CollectorError) as exc:
        raise click.ClickException(str(exc)) from None


class _RunCommand(click.Command):
    """Everything after ``--`` is the command to run, untouched by option parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            index = args.index("--")
            ctx.meta["hopscope.run.command"] = args[index + 1 :]
            args = args[:index]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[OPTIONS]", "TARGET | -- COMMAND [ARGS]..."]


_TARGET_ONLY = ("port", "host", "factory", "app_dir", "no_proxy", "ws")


@main.command(cls=_RunCommand)
@click.argument("target", required=False)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
    help="Port to serve TARGET on (0: a free one).",
)  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve TARGET on.")
@click.option("--factory", is_flag=True, help="TARGET is a function that returns the app.")
@click.option(
    "--app-dir", default=".", show_default=True, metavar="DIR",
    help="Import TARGET's module from DIR.",
)  # fmt: skip
@click.option("--no-proxy", is_flag=True, help="Serve TARGET without hopscope's proxy in front.")
@click.option(
    "--ws", type=click.Choice(["auto", "none", "websockets", "websockets-sansio", "wsproto"]),
    default="auto", show_default=True,
    help="uvicorn's WebSocket implementation for an ASGI TARGET, its server hop recorded.",
)  # fmt: skip
@click.option(
    "--reload", is_flag=True,
    help="Serve TARGET anew when a *.py file changes, as uvicorn --reload does, on the "
    "same port: requests wait meanwhile; the proxy, the recording and the UI go on.  A "
    "change that does not load is one line, and the next save recovers.  Not with -- "
    "COMMAND (pass --reload to your server instead).",
)  # fmt: skip
@click.option(
    "--reload-dir", "reload_dirs", multiple=True, metavar="DIR",
    help="With --reload: watch DIR (repeatable; default: --app-dir).",
)  # fmt: skip
@click.option("-o", "--output", metavar="FILE", help="Also save the traces to a trace file.")
@_otlp_option
@_server_timing_option
@_ui_options
@click.pass_context
def run(
    ctx: click.Context,
    target: str | None,
    port: int,
    host: str,
    factory: bool,
    app_dir: str,
    no_proxy: bool,
    ws: str,
    reload: bool,
    reload_dirs: tuple[str, ...],
    output: str | None,
    ui: bool | None,
    max_requests: int,
    otlp: str | None,
    server_timing: bool,
) -> None:
    """Serve an app, or run any server command, with hopscope injected (no code change).

    \b
      hopscope run main:app            ASGI apps under uvicorn, WSGI apps under gunicorn
      hopscope run main:app --reload   served anew when a .py file changes
      hopscope run -- uvicorn main:app --workers 2
      hopscope run -- gunicorn -w 4 main:app
      hopscope run -- flask --app main run
      hopscope run -- python manage.py runserver

    The app the server loads is wrapped in every worker process.  The UI shows its
    requests (--headless: one line each); q or Ctrl+C stops the server and all its
    workers, and hopscope exits with the server's exit status.
    """
    from .run import (
        RunError,
        build_run_command_app,
        build_run_target_app,
        run_command,
        run_target,
    )

    command = ctx.meta.get("hopscope.run.command")
    if command is not None and (reload or reload_dirs):
        # One line, not click's usage text: the fix is in the command.
        option = "--reload" if reload else "--reload-dir"
        click.echo(f"Error: {option} applies to TARGET: pass it to your server instead", err=True)
        ctx.exit(2)
    if reload_dirs and not reload:
        raise click.UsageError("--reload-dir applies with --reload")
    if command is not None and target is not None:
        raise click.UsageError("give TARGET or -- COMMAND, not both")
    if command is None and target is None:
        raise click.UsageError("give TARGET (module:attribute) or -- COMMAND")
    if command is not None:
        for name in _TARGET_ONLY:
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                option = "--" + name.replace("_", "-")
                raise click.UsageError(f"{option} applies to TARGET: the command sets its own")
    served: dict[str, Any] = {
        "host": host, "port": port, "factory": factory, "app_dir": app_dir,
        "output": output, "proxy": not no_proxy, "otlp": otlp, "server_timing": server_timing,
        "reload_dirs": (list(reload_dirs) or [app_dir]) if reload else None, "ws": ws,
    }  # fmt: skip
    extra: dict[str, Any] = {"otlp": otlp, "server_timing": server_timing}
    try:
        if want_ui(ui):
            if command is not None:
                session = build_run_command_app(
                    command, output=output, max_requests=max_requests, **extra
                )
            else:
                assert target is not None
                session = build_run_target_app(target, max_requests=max_requests, **served)
            status = session.run()
        elif command is not None:
            status = run_command(command, output=output, **extra)
        else:
            assert target is not None
            status = run_target(target, **served)
    except RunError as exc:
        click.echo(f"Error: {exc}", err=True)  # as a ClickException, with its own status
        ctx.exit(exc.exit_code)
    ctx.exit(status)


@main.command()
@click.option(
    "--upstream", required=True, metavar="URL",
    help="The app to forward to: http://HOST:PORT, https://HOST[:PORT] or unix:PATH (a "
    "server bound to a Unix socket).",
)  # fmt: skip
@click.option(
    "--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
    help="Where the proxy accepts clients.",
)  # fmt: skip
@click.option("-o", "--output", metavar="FILE", help="Also save the traces to a trace file.")
@_ui_options
@click.option(
    "--collector", default=DEFAULT_ADDRESS, show_default=True, metavar="ADDR",
    help="Where instrumented apps send their spans (HOST:PORT or unix:PATH).",
)  # fmt: skip
@click.option(
    "--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
    show_default=True, help="Seconds to connect to the upstream (then 504).",
)  # fmt: skip
@click.option(
    "--read-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
    show_default=True, help="Seconds the upstream may stay silent (then 504).",
)  # fmt: skip
@click.option(
    "--insecure", is_flag=True,
    help="Do not verify an https upstream's certificate (a development server's own).",
)  # fmt: skip
@click.option(
    "--keep-host", is_flag=True,
    help="Send the client's Host upstream, not the upstream's own (as nginx's "
    "'proxy_set_header Host $http_host'): for apps that check it, such as Django's CSRF.",
)  # fmt: skip
@_otlp_option
@_server_timing_option
def proxy(
    upstream: str,
    listen: str,
    output: str | None,
    ui: bool | None,
    max_requests: int,
    collector: str,
    connect_timeout: float,
    read_timeout: float,
    insecure: bool,
    keep_host: bool,
    otlp: str | None,
    server_timing: bool,
) -> None:
    """Run a recording reverse proxy in front of an app (as nginx would be).

    Each request's client and proxy hops join the app's own spans in one trace.  The
    UI shows them (--headless: one line each); q or Ctrl+C stops the proxy.
    """
    from .proxy_command import run_proxy
    from .proxy_config import ProxyError

    options: dict[str, Any] = {
        "listen": listen, "output": output, "collector": collector,
        "connect_timeout": connect_timeout, "read_timeout": read_timeout,
        "otlp": otlp, "server_timing": server_timing, "insecure": insecure,
        "keep_host": keep_host,
    }  # fmt: skip
    if want_ui(ui):
        from .ui import build_proxy_app

        _run_session(
            build_proxy_app, (ProxyError,), upstream=upstream, max_requests=max_requests, **options
        )
        return
    try:
        run_proxy(upstream, **options)
    except ProxyError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("file")
@click.option(
    "--target",
    required=True,
    metavar="URL",
    help="Where to resend: http://HOST:PORT, https://HOST[:PORT] or unix:PATH.",
)
@click.option("--filter", "filter_text", metavar="EXPR", help="Only requests this filter selects.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Max requests/second.")
@click.option("--keep-order", is_flag=True, help="Print results in capture order.")
@click.option("-o", "--output", metavar="FILE", help="Save the replay as a trace file.")
@click.option("--header", multiple=True, metavar="NAME:VALUE", help="Add or replace a header.")
@click.option("--ignore", multiple=True, metavar="PATH", help="JSON field not compared: a.*.id")
@click.option("--ignore-header", multiple=True, metavar="NAME", help="Header not compared.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds per request.")  # fmt: skip
@click.option(
    "--insecure", is_flag=True,
    help="Do not verify an https target's certificate (a development server's own).",
)  # fmt: skip
@click.pass_context
def replay(ctx: click.Context, /, file: str, **options: Any) -> None:
    """Resend the requests saved in FILE (a trace file or a HAR) to --target, and
    report how each response differs from the captured one.

    Exit status: 0 when every response matches the capture, 1 when any differs or
    fails or FILE is damaged (what it holds is replayed), 2 when the replay cannot run
    (bad file or filter, unreachable target).
    """
    from .replay import ReplayError, run_replay

    try:
        status = run_replay(
            file,
            headers=options.pop("header"),
            ignore_headers=options.pop("ignore_header"),
            **options,
        )
    except ReplayError as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(2)
    ctx.exit(status)


@main.command()
@click.argument("file")
@click.option("--har", metavar="OUT", help="Write the requests as a HAR 1.2 file (- for stdout).")
@click.option("--otlp", metavar="OUT", help="Write the spans as OTLP/HTTP JSON (- for stdout).")
@click.option("--curl", metavar="ID", help="Print a curl command for request ID.")
@click.option("--httpie", metavar="ID", help="Print an HTTPie command for request ID.")
@click.option("--httpx", metavar="ID", help="Print a Python httpx script for request ID.")
@click.option("--base-url", metavar="URL", help="Send copied requests here (http://HOST:PORT).")
@click.option("--no-redact", is_flag=True, help="Keep secret headers, cookies and parameters.")
def export(file: str, base_url: str | None, no_redact: bool, **forms: str | None) -> None:
    """Export a trace file or a HAR file as HAR or OpenTelemetry, or copy one request.

    ID is the request's number (1 = the first to start; #N also works) or the first
    4+ hex digits of its trace id.  Secrets are redacted unless --no-redact.
    """
    from .export import ExportError, print_result, run_export

    given = {name: value for name, value in forms.items() if value is not None}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --har, --otlp, --curl, --httpie, --httpx")
    form, value = next(iter(given.items()))
    options: dict[str, Any] = {form: value} if form in ("har", "otlp") else {"copy": (form, value)}
    try:
        print_result(run_export(file, base_url=base_url, redact=not no_redact, **options))
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Any:
    """Let ``kill`` end a live tail as cleanly as Ctrl+C does (output file closed)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the exit flush stays silent."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
