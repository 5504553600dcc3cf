"""``hopscope run``: serve an app, or run any server command, with hopscope injected.

Two forms, one supervisor:

* ``hopscope run module:app`` serves the app in a child process
  (:mod:`hopscope.app.serve`: uvicorn for ASGI, gunicorn for WSGI), wrapped, with the
  server hop recorded, behind hopscope's proxy unless ``--no-proxy``.
* ``hopscope run -- COMMAND ...`` runs the command with the bootstrap folder first on
  ``PYTHONPATH``: its ``sitecustomize`` patches the server in every Python process of the
  command (:mod:`hopscope.tracing.inject`), so each worker records with its own pid.

Either way the collector listens on a free loopback port and the child finds it through
``HOPSCOPE_SINK``.  Without the UI the collector runs in this process and a line is
printed per finished request, and the child keeps the terminal (stdin too: a
``breakpoint()`` in the app reads it, as it would without hopscope).  With the UI
(:func:`build_run_target_app`, :func:`build_run_command_app`) the collector and the
proxy run in helper processes (:mod:`hopscope.app.child`), the child's output is kept
off the screen, and the supervisor below runs on a thread, asked to stop by the UI
instead of a signal.

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
before :func:`run_target`/:func:`run_command` return the child's exit status.  If
hopscope itself is killed (SIGKILL: no time for any of this), the leader gets SIGTERM
from the kernel (Linux's ``PR_SET_PDEATHSIG``) and stops its workers its own way; a
small watchdog then stops what the leader left in the group (a server a shell started
without exec: see :func:`_watch_group`).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO, TypedDict, Unpack

from .child import ChildError, spawn, wait_line
from .collector import BackgroundCollector, CollectorError, wait_quiet
from .front import Front, FrontProcess
from .proxy_config import ProxyError
from .tail import Tail

if TYPE_CHECKING:
    from .ui import Session

__all__ = [
    "BOOTSTRAP_DIR",
    "ESCALATE_AFTER",
    "STOP_GRACE",
    "RunError",
    "TargetOptions",
    "build_run_command_app",
    "build_run_target_app",
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

    def __init__(self, output: str | None, out: TextIO | None, otlp: str | None = None) -> None:
        self.tail = Tail(out)
        self._lock = threading.Lock()
        self._quiet = False
        self.sender = _sender(otlp)
        try:
            # Without an OTLP export only tail lines read the records: the proxy's are then
            # folded without making events (Tail.feed_records).
            records = self._records if self.sender is None else None
            self.collector = BackgroundCollector(
                "127.0.0.1:0", self._consume, output=output, records=records
            )
            self.collector.start()
        except CollectorError as exc:
            raise RunError(str(exc)) from None

    @property
    def url(self) -> str:
        return self.collector.url

    def _consume(self, events: list[dict[str, Any]]) -> None:
        if self.sender is not None:
            self.sender.feed(events)
        with self._lock:
            if self._quiet:
                return
            try:
                self.tail.feed(events)
            except BrokenPipeError:  # ``hopscope run ... | head``: keep serving, stop printing
                self._quiet = True

    def _records(self, records: list[Any], info: dict[str, Any], dropped: int) -> int:
        with self._lock:
            if self._quiet:
                return 0
            try:
                return self.tail.feed_records(records, info, dropped)
            except BrokenPipeError:
                self._quiet = True
                return 0

    def stop(self, summary: bool = True) -> None:
        """Wait (briefly) until no more batches arrive, then stop listening; ``summary``
        False when nothing ran (the error that stopped the start is the one line)."""
        frames = self.collector.collector
        wait_quiet(lambda: frames.frames, timeout=SETTLE_TIMEOUT)
        self.collector.stop()
        with self._lock:
            if not self._quiet:
                with contextlib.suppress(BrokenPipeError):
                    self.tail.close()
        if self.sender is not None:
            self.sender.close()
            if summary:
                _say(self.sender.summary())
        if not summary:
            return
        dropped = frames.dropped
        note = f", {dropped} events dropped" if dropped else ""
        _say(f"stopped after {self.tail.printed} request(s){note}")


def _sender(url: str | None) -> Any:
    """An :class:`~hopscope.app.otlp_sender.OtlpSender` for ``--otlp URL`` (its first
    failure is one warning line; it never stops the run), or None."""
    if url is None:
        return None
    from .otlp_sender import OtlpSender

    try:
        return OtlpSender(url, warn=_say)
    except ValueError as exc:
        raise RunError(str(exc)) from None


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


def _spawn(
    argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = (), **streams: Any
) -> Any:
    """Start the child as the leader of a new process group, sent SIGTERM if hopscope
    dies (SIGKILL gives it no time to stop the group); ``streams`` may redirect its
    ``stdout`` and ``stderr`` (the UI owns the terminal)."""
    try:
        proc = spawn(
            argv, env=env, pass_fds=pass_fds, new_session=True, dies_with_parent=True, **streams
        )
    except ChildError as exc:
        raise RunError(str(exc), exc.exit_code) from None
    _watch_group(proc.pid)
    return proc


#: The watchdog of a server's process group (see :func:`_watch_group`), run as
#: ``python -I -S -c _WATCHDOG PGID GRACE``: it detaches (a double fork: hopscope keeps
#: no child of it), then waits for end of file on its stdin, a pipe whose other end
#: only hopscope holds.  A byte first means hopscope stopped the group itself; end of
#: file alone means hopscope died: then, once the leader is gone (it got its SIGTERM
#: from PR_SET_PDEATHSIG) or GRACE seconds passed, what is left of the group gets
#: SIGTERM, and SIGKILL if it lingers.
_WATCHDOG = """
import os, signal, sys, time
if os.fork():
    os._exit(0)
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
try:
    if os.read(0, 1):
        sys.exit()
except OSError:
    sys.exit()
def running(pid=None):
    for name in [str(pid)] if pid else os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name, "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except (OSError, ValueError):
            continue
        if fields[0] not in (b"Z", b"X") and (pid or int(fields[2]) == pgid):
            return True
    return False
def wait(seconds, alive):
    deadline = time.monotonic() + seconds
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive()
wait(grace, lambda: running(pgid))
for signum in (signal.SIGTERM, signal.SIGKILL):
    if not running():
        break
    try:
        os.killpg(pgid, signum)
    except OSError:
        break
    wait(3.0, running)
"""
#: Write ends of the watchdogs' pipes, by process group (see :func:`_release_watchdog`).
_watchdogs: dict[int, int] = {}


def _watch_group(pgid: int) -> None:
    """Start the watchdog of process group ``pgid`` (see :data:`_WATCHDOG`).

    Why: PR_SET_PDEATHSIG reaches only the process hopscope started.  When that is a
    shell that runs the server rather than exec it (``sh -c "cd src && uvicorn
    main:app"``), a SIGKILLed hopscope took the shell with it and left the server
    running, holding its port.  Nothing changes while hopscope runs: the watchdog
    only reads its pipe.  Without it (it could not start) the leader still gets its
    SIGTERM, as before."""
    if sys.platform != "linux":
        return
    read, write = os.pipe()
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pgid), str(STOP_GRACE)],
            stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # (no Ctrl+C, no SIGHUP from the terminal)
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        os.close(write)
        return
    finally:
        os.close(read)
    # Kept from here on, whatever the wait below says: a watchdog that got its pipe
    # takes the write end's close for hopscope's death (and stops the server).
    _watchdogs[pgid] = write
    with contextlib.suppress(subprocess.TimeoutExpired):
        helper.wait(10)  # (the intermediate: it exits at once)


def _release_watchdog(pgid: int) -> None:
    """The group is stopped: its watchdog ends without a signal (see :data:`_WATCHDOG`)."""
    write = _watchdogs.pop(pgid, None)
    if write is not None:
        with contextlib.suppress(OSError):
            os.write(write, b".")
        os.close(write)


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
    try:
        if not _group_alive(pgid):
            return
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                _signal_group(pgid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        _release_watchdog(pgid)


def _read_ready(fd: int, pending: bytes, timeout: float) -> tuple[bytes, bool]:
    """``pending`` and what came on the ready pipe within ``timeout``; True once a whole
    line came or the pipe closed."""
    if not select.select([fd], [], [], timeout)[0]:
        return pending, False
    data = os.read(fd, 512)
    pending += data
    return pending, not data or b"\n" in pending


def _supervise(
    proc: Any,
    signals: _Signals,
    ready_fd: int | None = None,
    on_ready: Callable[[str], None] | None = None,
    restart: Callable[[], bool] | None = None,
) -> tuple[int, bool]:
    """Wait for the child; returns (exit status, whether it was stopped by a signal we
    passed on).  ``on_ready`` gets the line the child writes on ``ready_fd``.
    ``restart`` (``--reload``) is asked every tenth of a second: once it says yes, the
    child is stopped as a Ctrl+C stops it (SIGTERM, then the group's SIGTERM and
    SIGKILL), and a signal that comes meanwhile only marks the stop as the user's."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    stopping = restarting = False
    term_at: float | None = None
    kill_at: float | None = None
    pending = b""
    try:
        while proc.poll() is None:
            while signals.received:
                signum = signals.received.pop(0)
                if not stopping:
                    stopping = True
                    if restarting:  # its SIGTERM is sent: the same staged stop goes on
                        continue
                    # SIGHUP means our terminal went away: ask for a normal stop.
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
                    term_at = time.monotonic() + ESCALATE_AFTER
                    kill_at = time.monotonic() + STOP_GRACE
                else:  # asked twice: no more waiting
                    _signal_group(pgid, signal.SIGKILL)
            if restart is not None and not (stopping or restarting) and restart():
                restarting = True
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                term_at = time.monotonic() + ESCALATE_AFTER
                kill_at = time.monotonic() + STOP_GRACE
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
            pending, said = _read_ready(ready_fd, pending, 0.1)
            if said:
                ready_fd = None  # said, or the child closed it: the caller closes it
                if b"\n" in pending and on_ready is not None:
                    on_ready(pending.partition(b"\n")[0].decode(errors="replace"))
        if ready_fd is not None and on_ready is not None and restart is not None:
            # Said just before it exited (a failure to load, under --reload).
            for _ in range(64):  # (what a pipe holds: no waiting, the child is gone)
                before = len(pending)
                pending, said = _read_ready(ready_fd, pending, 0)
                if said or len(pending) == before:
                    break
            if b"\n" in pending:
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
    found = shutil.which(program) if program else None
    if found is None and program:  # (an empty name would find the folder itself)
        beside = os.path.join(os.path.dirname(sys.executable), program)
        if os.access(beside, os.X_OK):
            found = beside
    if found is None:
        raise RunError(f"command not found: {program or repr(program)}", 127)
    return found


def injected_env(sink_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: the bootstrap folder first on PYTHONPATH, the rest kept
    (spawned workers read the same PYTHONPATH), and the collector's address.

    Empty entries are kept too: Python reads one as the current directory (a
    ``PYTHONPATH=$PYTHONPATH:src`` made while it was unset starts with one).
    """
    env = dict(os.environ if base is None else base)
    bootstrap = str(BOOTSTRAP_DIR)
    if not (BOOTSTRAP_DIR / "sitecustomize.py").is_file():
        raise RunError(f"hopscope is installed without {bootstrap}/sitecustomize.py: reinstall it")
    given = env.get("PYTHONPATH", "")
    entries = [e for e in given.split(os.pathsep) if e != bootstrap] if given else []
    env["PYTHONPATH"] = os.pathsep.join([bootstrap, *entries])
    env["HOPSCOPE_SINK"] = sink_url
    return env


#: The start of the name of a ``hopscope run``'s folder for what was said, its pid next.
_SAID_PREFIX = "hopscope-run-"


def _said_folder(stack: contextlib.ExitStack, env: dict[str, str]) -> None:
    """A folder, removed at the end, where the command's processes note the lines they
    said (:func:`hopscope.tracing.inject._first_to_say`): each is said once per run,
    not once per worker.  Those of runs that were killed (SIGKILL: nothing removed them)
    are removed here."""
    from hopscope.tracing.inject import SAID_ENV

    _remove_stale_said_folders()
    prefix = f"{_SAID_PREFIX}{os.getpid()}-"
    folder = stack.enter_context(
        tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
    )
    env[SAID_ENV] = folder


def _remove_stale_said_folders() -> None:
    where = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(where) if n.startswith(_SAID_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_SAID_PREFIX) :].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # that run is gone
            shutil.rmtree(os.path.join(where, name), ignore_errors=True)
        except (OSError, OverflowError):  # alive (another user's), or not a pid
            continue


def _command(argv: list[str]) -> list[str]:
    if not argv:
        raise RunError("nothing to run after --", 2)
    return [_resolve(argv[0]), *argv[1:]]


def run_command(
    argv: list[str],
    *,
    output: str | None = None,
    out: TextIO | None = None,
    otlp: str | None = None,
    server_timing: bool = False,
) -> int:
    """Run ``argv`` with hopscope injected until it exits or is stopped; returns its
    exit status.  Raises :class:`RunError` when it cannot start."""
    command = _command(argv)
    live = _Live(output, out, otlp)
    proc = None
    stack = contextlib.ExitStack()
    try:
        env = injected_env(live.url)
        _said_folder(stack, env)
        if server_timing:
            env["HOPSCOPE_SERVER_TIMING"] = "1"
        shown = " ".join(argv)
        with _Signals() as signals:
            proc = _spawn(command, env, stdin=None)  # a breakpoint() reads the terminal
            _say(f"running {shown} (traces to {live.url}; Ctrl+C to stop)")
            status, stopped = _supervise(proc, signals)
        if status and not stopped:
            _say(f"{shown} exited with status {status}")
        return status
    finally:
        live.stop(summary=proc is not None)
        stack.close()


# -- hopscope run TARGET -------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Before listen(): a connection accepted into the backlog before the server sets
        # TCP_NODELAY itself (gunicorn does, once its worker is up) keeps Nagle's
        # algorithm, and gunicorn's head and body writes then wait out the peer's
        # delayed ACK, some 40 ms every request of a connection the proxy keeps alive.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


class TargetOptions(TypedDict, total=False):
    """How ``hopscope run TARGET`` serves (its command-line options), given by keyword
    to :func:`run_target` and to :func:`build_run_target_app` alike; one left out takes
    its default in :class:`_Target`.  Why one list: each option reached both entry
    points, and the plan between them, written out again in each."""

    host: str
    port: int
    factory: bool
    app_dir: str
    output: str | None
    proxy: bool
    otlp: str | None
    server_timing: bool
    reload_dirs: list[str] | None
    ws: str


class _Target:
    """What ``run TARGET`` starts before its child, the same with or without the UI:
    the sockets, the ready pipe, the recording (``start_recording`` returns its sink
    URL; it reads ``output`` and ``otlp`` here) and the proxy (in a process of its own
    when ``separate``, see :mod:`hopscope.app.front`); under ``--reload``, what watches
    for changes (:meth:`reloader`).  Everything is registered on ``stack`` to be stopped
    in reverse."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        target: str,
        start_recording: Callable[[_Target], str],
        *,
        separate: bool = False,
        host: str = "127.0.0.1",
        port: int = 8000,
        factory: bool = False,
        app_dir: str = ".",
        output: str | None = None,
        proxy: bool = True,
        otlp: str | None = None,
        server_timing: bool = False,
        reload_dirs: list[str] | None = None,
        ws: str = "auto",
    ) -> None:
        module, sep, attribute = target.partition(":")
        if not sep or not module or not attribute:
            raise RunError(
                f"expected TARGET as module:attribute (e.g. main:app), got {target!r}", 2
            )
        if not os.path.isdir(app_dir):
            raise RunError(f"--app-dir {app_dir}: no such directory", 2)
        for folder in reload_dirs or ():
            if not os.path.isdir(folder):
                raise RunError(f"--reload-dir {folder}: no such directory", 2)
        self.target = target
        self.output = output
        self.otlp = otlp
        self.reload_dirs = reload_dirs
        self._stack = stack
        #: Under --reload the socket stays open here, for each new child.
        self.reload = reload_dirs is not None
        # Without the proxy the app takes the user's address; with it, the proxy does.
        public = stack.enter_context(_listen(host, port)) if proxy else None
        self.sock = stack.enter_context(_listen("127.0.0.1", 0) if proxy else _listen(host, port))
        self.pipe = _Pipe()
        stack.callback(lambda: self.pipe.close())  # (the last child's, under --reload)
        sink_url = start_recording(self)
        self.app_url = self.url = _url(self.sock)
        self.proxied = public is not None
        if public is not None:  # started first: if it fails, there is no child to stop
            self.url = _url(public)
            try:
                # The client's Host goes to the app (as without the proxy, --no-proxy):
                # the app's address is one hopscope chose, and apps that check the Host
                # (Django's CSRF Origin check) or build URLs from it see the one in use.
                front = (FrontProcess if separate else Front)(
                    public, self.app_url, sink_url, server_timing=server_timing, keep_host=True
                )
            except ProxyError as exc:
                raise RunError(str(exc)) from None
            stack.callback(front.stop)
            if separate:
                public.close()  # the proxy's process has its own copy
        argv = [sys.executable, "-P", "-m", "hopscope.app.serve", target, "--app-dir", app_dir]
        if factory:
            argv.append("--factory")
        if self.reload:  # (a failure to load: one line on the ready pipe, said by the parent)
            argv += ["--hand-over", "--brief-errors"]
        if ws != "auto":  # (uvicorn's --ws; serve refuses a library for a WSGI app)
            argv += ["--ws", ws]
        self.argv = argv
        self.env = dict(os.environ, HOPSCOPE_SINK=sink_url)
        if server_timing:  # read by hopscope's uvicorn/gunicorn hooks in the child
            self.env["HOPSCOPE_SERVER_TIMING"] = "1"

    def spawn(self, **streams: Any) -> Any:
        return self._spawn(self.argv, streams)

    def respawn(self, **streams: Any) -> Any:
        """A new child after a change (``--reload``), on the same listening socket: what
        connects meanwhile waits in its backlog.  A failure to load is one line on the
        ready pipe (see :mod:`hopscope.app.serve`), said by the caller."""
        self.pipe.close()
        self.pipe = _Pipe()
        return self._spawn(self.argv, streams)

    def _spawn(self, argv: list[str], streams: dict[str, Any]) -> Any:
        argv = [*argv, "--fd", str(self.sock.fileno()), "--ready-fd", str(self.pipe.write)]
        proc = _spawn(argv, self.env, (self.sock.fileno(), self.pipe.write), **streams)
        # The child has its own copies; ours would keep the port and the pipe open
        # (the port is kept under --reload: the next child serves it).
        if not self.reload:
            self.sock.close()
        self.pipe.close_write()
        return proc

    def serving(self, line: str) -> str:
        """What to say once the child's "ready" ``line`` came."""
        kind, _, server = line.partition(" ")
        via = f" behind hopscope's proxy (app on {self.app_url})" if self.proxied else ""
        return f"serving {self.target} ({kind.upper()}, {server}){via}: open {self.url}"

    def reloader(
        self, tell: _Tell, streams: dict[str, Any], pending: Callable[[], None] | None = None
    ) -> _Reloader | None:
        """Under ``--reload``, the :class:`_Reloader` of the children, its watcher started
        now (before the first child: a change while it loads counts); else None."""
        if self.reload_dirs is None:
            return None
        watcher = _Watcher(self.reload_dirs, tell)
        self._stack.callback(watcher.stop)
        return _Reloader(self, watcher, tell, streams, pending)


def run_target(target: str, *, out: TextIO | None = None, **options: Unpack[TargetOptions]) -> int:
    """Serve ``target`` (``module:attribute``) until it exits or is stopped; returns its
    exit status; the tail's lines go to ``out``.  ``reload_dirs`` (``--reload``): serve
    it anew after each change of a Python file there (see :class:`_Reloader`).  ``ws``:
    uvicorn's ``--ws`` for an ASGI app (hopscope's traced class of it).  Raises
    :class:`RunError` when it cannot start."""
    with contextlib.ExitStack() as stack:

        def start_recording(plan: _Target) -> str:
            live = _Live(plan.output, out, plan.otlp)
            stack.callback(live.stop)
            return live.url

        plan = _Target(stack, target, start_recording, **options)
        dirs = plan.reload_dirs
        watching = f"reloading on changes in {_folders(dirs)}; " if dirs else ""

        def ready(line: str) -> None:
            _say(f"{plan.serving(line)} ({watching}Ctrl+C to stop)")

        def pending() -> None:  # (the first start failed: said after why)
            served = f"{target} is not served until it loads: {plan.url} answers 502 meanwhile"
            _say(f"{served} ({watching}Ctrl+C to stop)")

        reloader = plan.reloader(_tell_stderr, {"stdin": None}, pending)

        with _Signals() as signals:
            proc = plan.spawn(stdin=None)  # a breakpoint() reads the terminal
            if reloader is not None:
                status, stopped = reloader.run(proc, signals, ready)
            else:
                status, stopped = _supervise(proc, signals, plan.pipe.read, ready)
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


# -- hopscope run TARGET --reload ----------------------------------------------------------

#: How a message is said: (text, severity): on stderr, or as a notice in the UI.
_Tell = Callable[[str, str], None]


def _tell_stderr(message: str, severity: str) -> None:
    _say(message)


class _Watcher:
    """The ``--reload`` folders, watched on a thread with watchfiles, as ``uvicorn
    --reload`` watches them: Python files (``*.py``; not hidden files, editors' swap
    files, ``__pycache__``, ``.git`` or virtualenvs).  watchfiles groups a burst of
    events (an editor's save, a ``git checkout``) into one change, reported once nothing
    moved for 50 ms: :meth:`take` then says which files changed."""

    def __init__(self, dirs: list[str], tell: _Tell) -> None:
        try:
            import watchfiles  # noqa: F401 (used on the thread)
        except ImportError:
            raise RunError(
                "--reload needs watchfiles (pip install watchfiles, or uvicorn[standard])"
            ) from None
        self.dirs = [os.path.abspath(d) for d in dict.fromkeys(dirs)]
        self._tell = tell
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed: dict[str, None] = {}  # (in the order they came)
        self._thread = threading.Thread(target=self._run, name="hopscope-reload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from watchfiles import Change, DefaultFilter, watch

        class PythonFiles(DefaultFilter):
            def __call__(self, change: Change, path: str) -> bool:
                name = os.path.basename(path)
                return (
                    name.endswith(".py")
                    and not name.startswith(".")
                    and super().__call__(change, path)
                )

        try:
            for changes in watch(
                *self.dirs,
                watch_filter=PythonFiles(),
                stop_event=self._stop,
                raise_interrupt=False,
                ignore_permission_denied=True,
            ):
                with self._lock:
                    self._changed.update(dict.fromkeys(path for _, path in changes))
        except Exception as exc:  # (out of inotify watches, a folder removed)
            if not self._stop.is_set():
                reason = " ".join(str(exc).split()) or type(exc).__name__
                self._tell(f"--reload stopped watching for changes: {reason}", "error")

    def take(self) -> str | None:
        """What changed since the last call, as said (``app.py changed``), or None; the
        changed files' cached bytecode is removed first (see :func:`_forget_bytecode`)."""
        with self._lock:
            paths, self._changed = list(self._changed), {}
        if not paths:
            return None
        for path in paths:
            _forget_bytecode(path)
        names = [_shown(path) for path in paths]
        if len(names) > 3:
            return f"{', '.join(names[:2])} and {len(names) - 2} more files changed"
        return f"{', '.join(names)} changed"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)  # (watchfiles looks at the event every 50 ms)


def _forget_bytecode(path: str) -> None:
    """Remove the ``__pycache__`` files of the changed ``path``, before the next child
    imports it.

    Why: a ``.pyc`` is taken as current when the source's mtime, in whole seconds, and
    size match what it recorded.  An edit that keeps the size (one character changed),
    saved within the second the ``.pyc`` was written, then loads the old code; removed,
    the new code is compiled again."""
    for optimization in ("", 1, 2):  # (PYTHONOPTIMIZE in the child's environment)
        try:
            cached = importlib.util.cache_from_source(path, optimization=optimization)
        except (NotImplementedError, ValueError):  # (no cache tag: no bytecode cached)
            return
        with contextlib.suppress(OSError):
            os.remove(cached)


def _folders(dirs: list[str]) -> str:
    return ", ".join(_shown(os.path.abspath(d)) for d in dict.fromkeys(dirs))


def _shown(path: str) -> str:
    """``path`` relative to the current folder when it is below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


class _Unavailable:
    """While no app runs under ``--reload`` (it failed to load, or exited), hopscope
    answers on the app's listening socket itself: each connection gets a 502 whose body
    is the line said on stderr (``cannot load app:app: app.py:7: SyntaxError: ...``).

    Why: nothing else accepts there meanwhile, so a request would wait in the backlog
    until the proxy gives up (a 504 after its read timeout, 60 s) or, with
    ``--no-proxy``, until the next good save.  Stopped before the next child starts:
    what connects after that waits in the backlog for it, as during any reload."""

    #: Seconds a connection may take to send its request head, and to close after.
    TIMEOUT = 2.0

    def __init__(self, sock: socket.socket, why: str) -> None:
        self._sock = sock
        body = f"hopscope: {why}\n".encode()
        self._head = (
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self._body = body
        # The children share the socket's file status (O_NONBLOCK): put back as found.
        self._blocking = os.get_blocking(sock.fileno())
        os.set_blocking(sock.fileno(), False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hopscope-502", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not select.select([self._sock], [], [], 0.05)[0]:
                    continue
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # (taken back by the client before we accepted it)
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(self.TIMEOUT)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            body = b"" if head.startswith(b"HEAD ") else self._body
            conn.sendall(self._head + body)
            conn.shutdown(socket.SHUT_WR)
            # What the client still sends (a request body) is read, not left unread: a
            # close with unread data resets the connection, and the reset can reach
            # the client before the answer.
            deadline = time.monotonic() + self.TIMEOUT
            while conn.recv(65536) and time.monotonic() < deadline:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        os.set_blocking(self._sock.fileno(), self._blocking)


class _Reloader:
    """``run TARGET --reload``: the child supervised as without it, then, after each
    change, stopped as Ctrl+C stops it and started again on the same listening socket
    (:meth:`_Target.respawn`).  The proxy, the collector and the UI or tail go on.  An
    app that fails to load, or exits, is one line, the first start too (as under
    ``uvicorn --reload``), requests meanwhile get a 502 that says why
    (:class:`_Unavailable`), and the next change starts it again.  Only a TARGET whose
    module does not exist ends the run at the first start, as without ``--reload``: a
    typo in the command, which no edit of a watched file fixes."""

    def __init__(
        self,
        plan: _Target,
        watcher: _Watcher,
        tell: _Tell,
        streams: dict[str, Any],
        pending: Callable[[], None] | None = None,
    ) -> None:
        self.plan = plan
        self.watcher = watcher
        self.tell = tell
        self.streams = streams
        #: Called once when the first start fails (headless: where to send requests).
        self.pending = pending
        self._asked = False  # this child was stopped for a change
        self._failed = False  # the last child could not load: say when one serves again
        self._served = False  # a child said it serves
        self._line: str | None = None
        self._loading = False  # a child started after a change has not said ready yet
        self._first: Callable[[str], None] | None = None

    def _restart(self) -> bool:
        why = self.watcher.take()
        if why is None:
            return False
        self.tell(f"reloading: {why}", "information")
        self._asked = True
        return True

    def _ready(self, line: str) -> None:
        self._line = line
        self._loading = False
        if line.startswith(("failed ", "missing ")):
            return
        if self._first is not None:
            first, self._first = self._first, None
            first(line)
        elif not self._served and self._failed:  # (the UI: its first start failed)
            self.tell(self.plan.serving(line), "information")
        elif self._failed:
            self.tell(f"serving {self.plan.target} again: open {self.plan.url}", "information")
        self._failed = False
        self._served = True

    def _wait(self, signals: _Signals, why: str) -> bool:
        """Until a change (True) or a stop (False), with no child running: requests
        are answered 502, ``why`` in the body."""
        unavailable = _Unavailable(self.plan.sock, why)
        try:
            while not signals.received:
                if self._restart():
                    return True
                time.sleep(0.1)
            return False
        finally:
            unavailable.stop()

    def _failure(self, status: int) -> str | None:
        """What to say when a child ended on its own; None: the run ends (TARGET's
        module does not exist, and nothing ever served)."""
        line = self._line or ""
        target = self.plan.target
        if line.startswith("missing ") and not self._served:
            self.tell(f"cannot load {target}: {line[8:]}", "error")
            return None
        if line.startswith(("failed ", "missing ")):
            return f"cannot load {target}: {line.partition(' ')[2]}; waiting for a change"
        return f"{target} exited with status {status}; waiting for a change"

    def run(
        self,
        proc: Any,
        signals: _Signals,
        first: Callable[[str], None] | None = None,
        said: str | None = None,
    ) -> tuple[int, bool]:
        """Like :func:`_supervise`, over each child in turn.  ``first`` gets the first
        ready line of a child that serves (None: it is told as a notice); ``said``: the
        first child's line when it was read already (the UI waited for it)."""
        self._first = first
        while True:
            self._asked = False
            self._line = None
            if said is not None:
                self._ready(said)
                said = None
            status, stopped = _supervise(
                proc, signals, self.plan.pipe.read, self._ready, self._restart
            )
            if stopped:
                # Stopped while a change stopped the app (its status is that of our
                # SIGTERM: uvicorn dies of it, 143), or while it loaded again (130):
                # the user stopped a server that ran, as after any Ctrl+C.
                return (0 if self._asked or self._loading else status), True
            if not self._asked:
                why = self._failure(status)
                if why is None:
                    return status, False
                self.tell(why, "error")
                if not self._served and not self._failed and self.pending is not None:
                    self.pending()
                self._failed = True
                if not self._wait(signals, why):
                    return 0, True
            while True:
                if signals.received:
                    return 0, True
                try:
                    proc = self.plan.respawn(**self.streams)
                    self._loading = True
                    break
                except RunError as exc:
                    why = f"{exc}; waiting for a change"
                    self.tell(why, "error")
                    self._failed = True
                    if not self._wait(signals, why):
                        return 0, True


# -- with the UI ---------------------------------------------------------------------------


class _Output:
    """The child's stdout and stderr while the UI owns the terminal: the last lines kept,
    to show when it fails (a pipe, not a file, so a chatty server costs no disk)."""

    def __init__(self, keep: int = 200) -> None:
        self.read, self.write = os.pipe()
        self.lines: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._run, name="hopscope-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.read, "rb", closefd=True) as pipe:
            for line in pipe:
                self.lines.append(line.decode(errors="replace").rstrip())

    def close_write(self) -> None:
        """Our copy of the write end: closed once the child has its own."""
        if self.write >= 0:
            os.close(self.write)
            self.write = -1

    def close(self) -> None:
        self.close_write()
        self._thread.join(1.0)  # until the group's last writer is gone (it was stopped)

    def last(self) -> str:
        lines = [line for line in self.lines if line.strip()]
        return lines[-1].strip() if lines else "no output"


def _wait_ready(proc: Any, fd: int) -> str | None:
    """The child's "ready" line, or None when it exited (or closed the pipe) first."""
    try:
        line, _ = wait_line(proc, fd)
        if line is None:
            proc.wait()
        return line
    except BaseException:  # Ctrl+C while the app loads: nothing may stay behind
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        _stop_strays(proc.pid)
        raise


class _Background:
    """The child supervised from a thread, because the UI has the main thread (and the
    keys): :meth:`stop` asks for the same staged stop a Ctrl+C starts without the UI."""

    def __init__(
        self,
        proc: Any,
        shown: str,
        source: Any,
        output: _Output,
        reloader: _Reloader | None = None,
        said: str | None = None,
    ) -> None:
        self.proc = proc
        self.shown = shown
        self.source = source
        self.output = output
        self.reloader = reloader
        self.said = said
        self.signals = _Signals()  # never entered: the UI, not a signal, asks to stop
        self.result = (0, False)
        self.thread = threading.Thread(target=self._run, name="hopscope-run", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.reloader is not None:
            self.result = self.reloader.run(self.proc, self.signals, said=self.said)
        else:
            self.result = _supervise(self.proc, self.signals)
        status, stopped = self.result
        if not stopped:
            message = f"{self.shown} exited with status {status}: {self.output.last()}"
            from hopscope.tui.source import notice

            self.source.push([notice(message, "error" if status else "warning")])

    def stop(self) -> tuple[int, bool]:
        if self.thread.is_alive():
            self.signals.received.append(signal.SIGINT)
        self.thread.join()
        return self.result


def _ui_session(
    stack: contextlib.ExitStack,
    proc: Any,
    shown: str,
    source: Any,
    output: _Output,
    title: str,
    recording: str | None,
    max_requests: int,
    urls: dict[str, str],
    reloader: _Reloader | None = None,
    said: str | None = None,
) -> Session:
    """The session for a supervised child: its exit status becomes hopscope's.  ``said``
    (``--reload``): the child's ready line, read already."""
    from hopscope.tui.app import HopscopeApp

    from .ui import Session

    background = _Background(proc, shown, source, output, reloader, said)
    app = HopscopeApp(source, title=title, max_requests=max_requests, recording=recording)
    session = Session(app, stack, urls)

    def finish() -> None:
        status, stopped = background.stop()
        session.exit_status = status
        if status and not stopped:
            session.messages += list(output.lines)[-20:]
            session.messages.append(f"hopscope: {shown} exited with status {status}")

    stack.callback(finish)
    return session


def _live_source(
    stack: contextlib.ExitStack, description: str, output: str | None, otlp: str | None = None
) -> Any:
    from .collector import CollectorError
    from .ui import live_source

    try:
        return live_source(stack, "127.0.0.1:0", description, output=output, otlp=otlp)
    except CollectorError as exc:
        raise RunError(str(exc)) from None


def _captured(
    stack: contextlib.ExitStack, start: Callable[..., Any], keep: bool = False
) -> tuple[Any, _Output]:
    """Start a child whose output is held while the UI owns the terminal (shown after);
    ``keep``: the pipe stays open for the next children (``--reload``)."""
    out = _Output()
    stack.callback(out.close)
    proc = start(stdout=out.write, stderr=out.write)
    if not keep:
        out.close_write()
    return proc, out


def build_run_command_app(
    argv: list[str],
    *,
    output: str | None = None,
    max_requests: int = 50_000,
    otlp: str | None = None,
    server_timing: bool = False,
) -> Session:
    """``hopscope run -- COMMAND`` with the UI: a :class:`~hopscope.app.ui.Session`.

    Raises :class:`RunError` when the command cannot start.
    """
    command = _command(argv)
    shown = " ".join(argv)
    stack = contextlib.ExitStack()
    try:
        source, feed = _live_source(stack, f"run {shown}", output, otlp)
        env = injected_env(feed.url)
        _said_folder(stack, env)
        if server_timing:
            env["HOPSCOPE_SERVER_TIMING"] = "1"
        proc, out = _captured(stack, lambda **streams: _spawn(command, env, **streams))
        return _ui_session(
            stack, proc, shown, source, out, "hopscope run", output, max_requests,
            {"collector": feed.url},
        )  # fmt: skip
    except BaseException:
        stack.close()
        raise


def build_run_target_app(
    target: str, *, max_requests: int = 50_000, **options: Unpack[TargetOptions]
) -> Session:
    """``hopscope run TARGET`` with the UI: a :class:`~hopscope.app.ui.Session`, built
    once the app serves (an app that fails to load fails here, with its own output on
    stderr, before any UI).  Under ``--reload`` each reload, and each failure to load,
    the first one too, is a notice (only a TARGET whose module does not exist fails
    here).  Raises :class:`RunError`."""
    stack = contextlib.ExitStack()
    try:
        box: list[Any] = []

        def start_recording(plan: _Target) -> str:
            box[:] = _live_source(stack, target, plan.output, plan.otlp)
            return str(box[1].url)

        plan = _Target(stack, target, start_recording, separate=True, **options)
        source, feed = box
        from hopscope.tui.source import notice  # (the UI's: not imported without it)

        def tell(message: str, severity: str) -> None:
            source.push([notice(message, severity)])

        reloader = plan.reloader(tell, {})
        proc, out = _captured(stack, plan.spawn, keep=reloader is not None)
        if reloader is not None:  # (the next children write where the first one does)
            reloader.streams = {"stdout": out.write, "stderr": out.write}
        line = _wait_ready(proc, plan.pipe.read)
        serves = line is not None and not line.startswith(("failed ", "missing "))
        if line is not None and line.startswith("missing "):  # (a typo in TARGET)
            proc.wait()
            _stop_strays(proc.pid)
            raise RunError(f"cannot load {target}: {line[8:]}")
        if line is None and reloader is None:
            status = proc.wait()
            _stop_strays(proc.pid)
            out.close()
            for text in out.lines:
                print(text, file=sys.stderr)
            status = 128 - status if status < 0 else status
            raise RunError(f"{target} exited with status {status}", status or 1)
        source.description = f"run {target} {plan.url}"
        if serves:  # (else, under --reload, the reloader says why, and waits for a change)
            source.push([notice(plan.serving(str(line)))])
        urls = {"app": plan.app_url, "collector": feed.url}
        if plan.proxied:
            urls["proxy"] = plan.url
        return _ui_session(
            stack, proc, target, source, out, "hopscope run", plan.output, max_requests,
            urls, reloader, line,
        )  # fmt: skip
    except BaseException:
        stack.close()
        raise
