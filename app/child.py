"""Helper processes for the UI commands: started, heard from, stopped, never left behind.

While the UI draws, its process is busy: anything timed in it (the proxy, the demo's
client) would be measured late by however long a frame took.  So the collector, the
proxy and the demo's traffic run in child processes, ``python -P -m MODULE ...``,
which all speak the same small protocol:

* stdout carries frames, a 4-byte big-endian length then a marshal payload; the first
  is ``("ready", info)`` or ``("error", one_line_reason)``, later ones are the child's
  business (event batches, notices);
* end of file on stdin means stop.  The parent closes the pipe to stop a child, and the
  pipe closes just as well when the parent dies without a word: a helper never outlives
  its UI.

Their stderr goes to a temporary file (the terminal belongs to the UI), read back for
the reason when one fails to start.

:func:`spawn`, :func:`wait_line` and :func:`stop` are the plain parts every command's
children share (the proxy's recording child, ``run``'s server, these helpers): one-line
errors when a program cannot start, a first line awaited with a bound, a stop that ends
in SIGKILL rather than a hang.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ChildError", "ChildProcess", "ParentLink", "read_frame", "spawn", "stop", "wait_line"]

_LENGTH = struct.Struct("!I")
#: Seconds to wait for a child to say it is ready (imports included).
START_TIMEOUT = 30.0


class ChildError(Exception):
    """A process could not start; the message is one line, ``exit_code`` what a shell
    would say (127: not found, 126: cannot run)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- starting and stopping any child (helpers, recorders, the user's server) ---------------


def _prctl() -> Any:
    """libc's ``prctl``, looked up in the parent: a child between fork and exec of a
    process with threads (the collector's) should not load libraries."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


def _dies_with(parent: int, prctl: Any) -> Callable[[], None]:
    """For the child, before exec (it outlives exec, not fork): on Linux a SIGTERM when
    ``parent`` dies, so a parent killed by SIGKILL leaves nothing behind.  Nothing else
    changes: the signal comes only then, and the child's own children do not get it.  A
    parent gone already (between fork and here) would never send it: then exit now."""

    def dies_with_parent() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os._exit(1)

    return dies_with_parent


def _with_parent(dies_with_parent: Callable[[], None]) -> Callable[[], None]:
    """For the child, before exec: no SIGINT (a terminal's Ctrl+C reaches the whole
    group; the parent stops it when it is ready to), and it dies with the parent."""

    def with_parent() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        dies_with_parent()

    return with_parent


def spawn(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    new_session: bool = False,
    with_parent: bool = False,
    dies_with_parent: bool = False,
    **streams: Any,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (stdin from /dev/null unless ``streams`` say otherwise), or raise
    :class:`ChildError`.  ``new_session``: the child leads its own process group (a
    server and its workers, stopped together); ``with_parent``: it ignores SIGINT and
    dies with this process (see :func:`_with_parent`); ``dies_with_parent``: only the
    latter (the user's server, whose signals are its own)."""
    streams.setdefault("stdin", subprocess.DEVNULL)
    preexec: Callable[[], None] | None = None
    if with_parent or dies_with_parent:
        preexec = _dies_with(os.getpid(), _prctl())
        if with_parent:
            preexec = _with_parent(preexec)
    try:
        return subprocess.Popen(
            argv,
            env=env,
            pass_fds=pass_fds,
            start_new_session=new_session,
            preexec_fn=preexec,
            **streams,
        )
    except FileNotFoundError:
        raise ChildError(f"command not found: {argv[0]}", 127) from None
    except PermissionError:
        raise ChildError(f"cannot run {argv[0]}: permission denied", 126) from None
    except OSError as exc:
        raise ChildError(f"cannot run {argv[0]}: {exc.strerror or exc}", 126) from None


def wait_line(
    proc: subprocess.Popen[Any], fd: int, timeout: float | None = None
) -> tuple[str | None, bytes]:
    """The first line the child writes on ``fd`` (None if it exits, closes ``fd`` or
    ``timeout`` passes first), and what came after it in the same reads."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = b""
    while b"\n" not in pending:
        if deadline is not None and time.monotonic() > deadline:
            return None, pending
        if not select.select([fd], [], [], 0.1)[0]:
            if proc.poll() is not None:
                return None, pending
            continue
        data = os.read(fd, 4096)
        if not data:
            return None, pending
        pending += data
    line, _, rest = pending.partition(b"\n")
    return line.decode(errors="replace"), rest


def stop(
    proc: subprocess.Popen[Any], timeout: float = 10.0, signum: int | None = None
) -> int | None:
    """Stop ``proc``: ``signum`` if given (else the caller already asked, e.g. by closing
    its stdin), then wait up to ``timeout`` and kill it if it lingers; returns its exit
    status."""
    if signum is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
    return proc.returncode


# -- the parent's side ----------------------------------------------------------------------


class ChildProcess:
    """``python -P -m module args`` as a helper: see the module docstring."""

    def __init__(self, module: str, args: Iterable[str], *, pass_fds: tuple[int, ...] = ()):
        self.argv = [sys.executable, "-P", "-m", module, *args]
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()
        self._thread: threading.Thread | None = None
        self.stopping = False
        """Set by :meth:`stop`: an end of file after it is expected."""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = START_TIMEOUT) -> Any:
        """Start and wait for the ready frame; returns its info, or raises ChildError."""
        try:
            self.proc = proc = spawn(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                pass_fds=self.pass_fds,
            )
        except ChildError as exc:
            raise ChildError(f"cannot start {self.argv[3]}: {exc}") from None
        assert proc.stdout is not None
        first = read_frame(proc.stdout.fileno(), timeout)
        if isinstance(first, tuple) and len(first) == 2 and first[0] == "ready":
            return first[1]
        reason = self.last_log_line()
        self.stop()
        if isinstance(first, tuple) and len(first) == 2 and first[0] == "error":
            raise ChildError(str(first[1]))
        raise ChildError(f"{self.argv[3]} did not start: {reason}")

    def follow(
        self,
        handle: Callable[[Any], None],
        name: str,
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        """Hand every later frame to ``handle``, on a thread of its own, until EOF;
        ``on_exit`` hears why if the child ends without being asked to."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()

        def run() -> None:
            while (message := read_frame(fd, None)) is not None:
                handle(message)
            if on_exit is not None and not self.stopping:
                on_exit(self.last_log_line())

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the child to stop (EOF on its stdin), kill it if it lingers; returns its
        exit status."""
        self.stopping = True
        proc = self.proc
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            stop(proc, timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if proc is not None and proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        with contextlib.suppress(OSError):
            self._log.close()
        return proc.returncode if proc is not None else None

    def last_log_line(self) -> str:
        try:
            self._log.flush()
            self._log.seek(0)
            lines = self._log.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            lines = []
        return lines[-1].strip() if lines else "no reason given"


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    parts: list[bytes] = []
    while size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        try:
            data = os.read(fd, size)
        except OSError:
            return None
        if not data:
            return None
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def read_frame(fd: int, timeout: float | None) -> Any:
    """The next message on ``fd`` (None at end of file, on timeout or a bad frame)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _read_exactly(fd, _LENGTH.size, deadline)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    payload = _read_exactly(fd, length, deadline)
    if payload is None:
        return None
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None


# -- the child's side -----------------------------------------------------------------------


class ParentLink:
    """A helper's end: frames to the parent, and the parent's request to stop.

    Made first thing in the child's ``main``: it keeps the real stdout for frames and
    points file descriptor 1 at stderr, so a stray print cannot corrupt the stream.  A
    terminal's Ctrl+C reaches the whole process group; the parent decides, so SIGINT is
    ignored, and SIGTERM counts as a stop request.
    """

    def __init__(self) -> None:
        self._out = os.dup(1)
        os.dup2(2, 1)
        self._lock = threading.Lock()
        self._eof = threading.Event()
        self._terminated = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch_stdin, name="hopscope-lifeline", daemon=True).start()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._terminated = True  # only a flag: a handler must not take locks

    def _watch_stdin(self) -> None:
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                self._eof.set()
                return

    def stopped(self) -> bool:
        """True once the parent asked to stop (or went away)."""
        return self._terminated or self._eof.is_set()

    def send(self, message: tuple[Any, ...]) -> None:
        """Write one frame (blocking: a parent that cannot keep up slows the child)."""
        payload = marshal.dumps(message)
        data = memoryview(_LENGTH.pack(len(payload)) + payload)
        with self._lock:
            while data:
                data = data[os.write(self._out, data) :]

    def wait(self, interval: float = 0.1) -> None:
        """Until the parent asks to stop."""
        while not self.stopped():
            self._eof.wait(interval)
