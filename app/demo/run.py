"""``hopscope demo``: collector, instrumented app and traffic, started and stopped together.

The app runs as a real uvicorn process sending to a real collector, as a user's app
would; only the ports are picked for the user.  Everything started here is stopped here,
on success, error or Ctrl+C: the app process is terminated (then killed if it lingers)
and the collector's port is closed before :func:`run_demo` returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

import click

from ..collector import BackgroundCollector
from ..tail import Tail
from .traffic import Traffic, TrafficError

__all__ = ["DemoError", "run_demo"]

#: How long to wait for the last requests' records once the traffic has stopped.
SETTLE_TIMEOUT = 15.0


class DemoError(Exception):
    """The demo cannot run; the message is one line."""


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(
                f"cannot serve the demo on 127.0.0.1:{port}: address already in use"
            ) from None
        raise DemoError(f"cannot serve the demo on 127.0.0.1:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _spawn(sock: socket.socket, sink_url: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HOPSCOPE_SINK=sink_url, PYTHONUNBUFFERED="1")
    fd = sock.fileno()
    # -P: the user's working directory must not shadow hopscope's or uvicorn's modules.
    command = [sys.executable, "-P", "-m", "hopscope.app.demo.server", "--fd", str(fd)]
    try:
        return subprocess.Popen(
            command, env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    except OSError as exc:
        raise DemoError(f"cannot start the demo app: {exc.strerror or exc}") from None


def _last_line(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "no output"


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_demo(
    *,
    requests: int | None = None,
    port: int = 0,
    output: str | None = None,
    delay: float = 0.2,
    out: Any = None,
) -> int:
    """Run the demo; returns the number of request lines printed.

    Raises :class:`DemoError` (or the collector's ``CollectorError``) with a one-line
    reason.  Ctrl+C ends it cleanly.
    """
    tail = Tail(out)
    progress = threading.Condition()
    traffic: Traffic | None = None

    def consume(events: list[dict[str, Any]]) -> None:
        try:
            tail.feed(events)
        except BrokenPipeError:
            if traffic is not None:
                traffic.stop.set()
        with progress:
            progress.notify_all()

    collector = BackgroundCollector("127.0.0.1:0", consume, output=output).start()
    proc: subprocess.Popen[bytes] | None = None
    log = tempfile.TemporaryFile()
    try:
        sock = _listen(port)
        try:
            proc = _spawn(sock, collector.url, log)
            app_port = sock.getsockname()[1]
        finally:
            sock.close()  # the app process has its own copy
        base_url = f"http://127.0.0.1:{app_port}"
        click.echo(
            f"hopscope demo: app on {base_url}, collector on {collector.url} (Ctrl+C to stop)",
            err=True,
        )
        traffic = Traffic(base_url, delay=delay)
        try:
            sent = traffic.run(requests)
        except TrafficError as exc:
            if proc.poll() is not None:
                raise DemoError(
                    f"the demo app exited with status {proc.returncode}: {_last_line(log)}"
                ) from None
            raise DemoError(str(exc)) from None
        deadline = time.monotonic() + SETTLE_TIMEOUT
        with progress:
            while tail.printed < sent and not traffic.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                progress.wait(min(left, 0.25))
        if tail.printed < sent and not traffic.stop.is_set():
            click.echo(
                f"hopscope demo: only {tail.printed} of {sent} requests were reported", err=True
            )
    except KeyboardInterrupt:
        if traffic is not None:
            traffic.stop.set()
    finally:
        try:
            if proc is not None:
                _stop_process(proc)
        finally:
            collector.stop()
            with contextlib.suppress(BrokenPipeError):
                tail.close()
            with contextlib.suppress(OSError):
                log.close()
    return tail.printed
