"""``hopscope run``: serve an app, or run any server command, with hopscope injected.

Two forms, one supervisor:

* ``hopscope run module:app`` serves the app in a child process
  (:mod:`hopscope.app.serve`: uvicorn for ASGI, gunicorn for WSGI), wrapped, with the
  server hop recorded, behind hopscope's proxy unless ``--no-proxy``.
* ``hopscope run -- COMMAND ...`` runs the command with the bootstrap folder first on
  ``PYTHONPATH``: its ``sitecustomize`` patches the server in every Python process of the
  command (:mod:`hopscope.tracing.inject`), so each worker records with its own pid.

Either way the collector runs in this process on a free loopback port, the child finds it
through ``HOPSCOPE_SINK``, and a line is printed per finished request.

The child leads a process group of its own, and is stopped in stages:

1. Ctrl+C (SIGINT) or SIGTERM goes to the leader alone, as ``kill`` would (SIGHUP becomes
   SIGTERM), so the server stops its workers its own way.  Not to the whole group, as a
   terminal's Ctrl+C is: gunicorn's gthread workers that get SIGINT from the terminal and
   SIGQUIT from their master at once can deadlock (``handle_quit`` re-entered inside
   ``ThreadPoolExecutor.shutdown``; seen here).
2. After :data:`ESCALATE_AFTER` seconds, SIGTERM to the whole group: some workers ignore
   what their master sends on a quick shutdown (uvicorn's ``UvicornWorker`` under gunicorn
   27 waits out the 30 s graceful timeout), but every server stops on SIGTERM.
3. After :data:`STOP_GRACE` seconds, or at a second Ctrl+C, SIGKILL to the whole group.

Whatever the leader leaves behind in its group is stopped too (SIGTERM, then SIGKILL)
before :func:`run_target`/:func:`run_command` return the child's exit status.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .collector import BackgroundCollector, CollectorError
from .tail import Tail

__all__ = [
    "BOOTSTRAP_DIR",
    "ESCALATE_AFTER",
    "STOP_GRACE",
    "RunError",
    "run_command",
    "run_target",
]

#: The folder put first on the command's PYTHONPATH: it holds only ``sitecustomize.py``.
BOOTSTRAP_DIR = Path(__file__).parent / "bootstrap"
#: Seconds after a stop signal before the whole process group gets SIGTERM.
ESCALATE_AFTER = 3.0
#: Seconds after a stop signal before the whole process group gets SIGKILL.
STOP_GRACE = 10.0
#: At most this long, after the command exited, for its last records to arrive.
SETTLE_TIMEOUT = 3.0


class RunError(Exception):
    """``hopscope run`` cannot start; the message is one line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _say(message: str) -> None:
    print(f"hopscope: {message}", file=sys.stderr, flush=True)


# -- the collector and the tail ------------------------------------------------------------


class _Live:
    """The in-process collector, printing a tail line per finished request."""

    def __init__(self, output: str | None, out: TextIO | None) -> None:
        self.tail = Tail(out)
        self._lock = threading.Lock()
        self._quiet = False
        try:
            self.collector = BackgroundCollector("127.0.0.1:0", self._consume, output=output)
            self.collector.start()
        except CollectorError as exc:
            raise RunError(str(exc)) from None

    @property
    def url(self) -> str:
        return self.collector.url

    def _consume(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            if self._quiet:
                return
            try:
                self.tail.feed(events)
            except BrokenPipeError:  # ``hopscope run ... | head``: keep serving, stop printing
                self._quiet = True

    def stop(self) -> None:
        """Wait (briefly) until no more batches arrive, then stop listening."""
        frames = self.collector.collector
        deadline = time.monotonic() + SETTLE_TIMEOUT
        seen, quiet_since = frames.frames, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.3:
            time.sleep(0.05)
            if frames.frames != seen:
                seen, quiet_since = frames.frames, time.monotonic()
        self.collector.stop()
        with self._lock:
            if not self._quiet:
                with contextlib.suppress(BrokenPipeError):
                    self.tail.close()
        dropped = frames.dropped
        note = f", {dropped} events dropped" if dropped else ""
        _say(f"stopped after {self.tail.printed} request(s){note}")


# -- the child and its process group -------------------------------------------------------


class _Signals:
    """SIGINT, SIGTERM and SIGHUP, noted for the supervisor loop instead of raising."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _spawn(argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> Any:
    try:
        return subprocess.Popen(
            argv, env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL, start_new_session=True
        )
    except FileNotFoundError:
        raise RunError(f"command not found: {argv[0]}", 127) from None
    except PermissionError:
        raise RunError(f"cannot run {argv[0]}: permission denied", 126) from None
    except OSError as exc:
        raise RunError(f"cannot run {argv[0]}: {exc.strerror or exc}", 126) from None


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    """True while a process of the group runs (zombies waiting for init do not count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp.
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _stop_strays(pgid: int) -> None:
    """Stop what the leader left running in its group: SIGTERM, then SIGKILL."""
    if not _group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            break
        time.sleep(0.05)


def _supervise(
    proc: Any,
    signals: _Signals,
    ready_fd: int | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> tuple[int, bool]:
    """Wait for the child; returns (exit status, whether it was stopped by a signal we
    passed on).  ``on_ready`` gets the line the child writes on ``ready_fd``."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    stopping = False
    term_at: float | None = None
    kill_at: float | None = None
    pending = b""
    try:
        while proc.poll() is None:
            while signals.received:
                signum = signals.received.pop(0)
                if not stopping:
                    stopping = True
                    # SIGHUP means our terminal went away: ask for a normal stop.
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
                    term_at = time.monotonic() + ESCALATE_AFTER
                    kill_at = time.monotonic() + STOP_GRACE
                else:  # asked twice: no more waiting
                    _signal_group(pgid, signal.SIGKILL)
            now = time.monotonic()
            if term_at is not None and now > term_at:
                _signal_group(pgid, signal.SIGTERM)
                term_at = None
            if kill_at is not None and now > kill_at:
                _signal_group(pgid, signal.SIGKILL)
                kill_at = None
            if ready_fd is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.1)
                continue
            readable, _, _ = select.select([ready_fd], [], [], 0.1)
            if readable:
                data = os.read(ready_fd, 512)
                pending += data
                if not data or b"\n" in pending:
                    ready_fd = None  # said, or the child closed it: the caller closes it
                    if b"\n" in pending and on_ready is not None:
                        on_ready(pending.partition(b"\n")[0].decode(errors="replace"))
    finally:
        if proc.poll() is None:  # we are leaving on an error of our own
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        _stop_strays(pgid)
    status = proc.returncode
    return (128 - status if status < 0 else status), stopping


# -- hopscope run -- COMMAND ---------------------------------------------------------------


def _resolve(program: str) -> str:
    """``program`` on PATH, else next to this Python (a virtualenv that is not activated)."""
    if os.sep in program:
        return program
    found = shutil.which(program)
    if found is None:
        beside = os.path.join(os.path.dirname(sys.executable), program)
        if os.access(beside, os.X_OK):
            found = beside
    if found is None:
        raise RunError(f"command not found: {program}", 127)
    return found


def injected_env(sink_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: the bootstrap folder first on PYTHONPATH, the rest kept
    (spawned workers read the same PYTHONPATH), and the collector's address."""
    env = dict(os.environ if base is None else base)
    bootstrap = str(BOOTSTRAP_DIR)
    if not (BOOTSTRAP_DIR / "sitecustomize.py").is_file():
        raise RunError(f"hopscope is installed without {bootstrap}/sitecustomize.py: reinstall it")
    entries = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e and e != bootstrap]
    env["PYTHONPATH"] = os.pathsep.join([bootstrap, *entries])
    env["HOPSCOPE_SINK"] = sink_url
    return env


def run_command(argv: list[str], *, output: str | None = None, out: TextIO | None = None) -> int:
    """Run ``argv`` with hopscope injected until it exits or is stopped; returns its
    exit status.  Raises :class:`RunError` when it cannot start."""
    if not argv:
        raise RunError("nothing to run after --", 2)
    program = _resolve(argv[0])
    live = _Live(output, out)
    try:
        env = injected_env(live.url)
        shown = " ".join(argv)
        with _Signals() as signals:
            proc = _spawn([program, *argv[1:]], env)
            _say(f"running {shown} (traces to {live.url}; Ctrl+C to stop)")
            status, stopped = _supervise(proc, signals)
        if status and not stopped:
            _say(f"{shown} exited with status {status}")
        return status
    finally:
        live.stop()


# -- hopscope run TARGET -------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"{_host(host)}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise RunError(
                f"cannot serve on {where}: address already in use (see --port)"
            ) from None
        raise RunError(f"cannot serve on {where}: {exc.strerror or exc}") from None
    except (OverflowError, socket.gaierror) as exc:
        sock.close()
        raise RunError(f"cannot serve on {_host(host)}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{_host(host)}:{port}"


def run_target(
    target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    factory: bool = False,
    app_dir: str = ".",
    output: str | None = None,
    proxy: bool = True,
    out: TextIO | None = None,
) -> int:
    """Serve ``target`` (``module:attribute``) until it exits or is stopped; returns its
    exit status.  Raises :class:`RunError` when it cannot start."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        raise RunError(f"expected TARGET as module:attribute (e.g. main:app), got {target!r}", 2)
    if not os.path.isdir(app_dir):
        raise RunError(f"--app-dir {app_dir}: no such directory", 2)
    with contextlib.ExitStack() as stack:
        # Without the proxy the app takes the user's address; with it, the proxy does.
        public = stack.enter_context(_listen(host, port)) if proxy else None
        sock = stack.enter_context(_listen("127.0.0.1", 0) if proxy else _listen(host, port))
        pipe = _Pipe()
        stack.callback(pipe.close)
        live = _Live(output, out)
        stack.callback(live.stop)
        app_url = _url(sock)
        url = app_url
        if public is not None:  # started first: if it fails, there is no child to stop
            front = _Front(public, app_url, live.url)
            stack.callback(front.stop)
            url = _url(public)
        argv = [sys.executable, "-P", "-m", "hopscope.app.serve", target, "--app-dir", app_dir]
        argv += ["--fd", str(sock.fileno()), "--ready-fd", str(pipe.write)]
        if factory:
            argv.append("--factory")
        env = dict(os.environ, HOPSCOPE_SINK=live.url)

        def ready(line: str) -> None:
            kind, _, server = line.partition(" ")
            via = f" behind hopscope's proxy (app on {app_url})" if public is not None else ""
            _say(f"serving {target} ({kind.upper()}, {server}){via}: open {url} (Ctrl+C to stop)")

        with _Signals() as signals:
            proc = _spawn(argv, env, pass_fds=(sock.fileno(), pipe.write))
            # The child has its own copies; ours would keep the port and the pipe open.
            sock.close()
            pipe.close_write()
            status, stopped = _supervise(proc, signals, pipe.read, ready)
        if status and not stopped:
            _say(f"{target} exited with status {status}")
        return status


class _Pipe:
    """The pipe the child says "ready" on; each end closed once (fd numbers get reused)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()

    def close_write(self) -> None:
        if self.write >= 0:
            os.close(self.write)
            self.write = -1

    def close(self) -> None:
        self.close_write()
        if self.read >= 0:
            os.close(self.read)
            self.read = -1


class _Front:
    """hopscope's proxy in front of the app, on a thread and event loop of its own.

    Its spans reach the in-process collector through a SocketSink, like any app's.
    """

    def __init__(self, sock: socket.socket, app_url: str, sink_url: str) -> None:
        import uvicorn
        from hopscope.tracing.sinks import SocketSink

        from .proxy import ProxyApp, ProxyHttpProtocol

        self.sink = SocketSink(sink_url)
        config = uvicorn.Config(
            ProxyApp(app_url, self.sink),
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
        self.server = uvicorn.Server(config)
        # Not the main thread: uvicorn leaves signals alone, the supervisor handles them.
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="hopscope-proxy", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise RunError("hopscope's proxy did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sink.close()
