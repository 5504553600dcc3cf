"""Accepting clients: no more at once than the process's descriptors allow.

A proxy holds two descriptors per client (its connection and the upstream's), so the
soft limit a shell gives (often 1024) is reached long before the machine's: the commands
that serve the proxy raise it (:func:`raise_open_files_limit`), and when what is left
still holds fewer than :data:`ACCEPT_ALL` clients, accept through :class:`Acceptor`,
which stops accepting at the budget as nginx does at its ``worker_connections``, instead
of taking clients it then cannot connect upstream (:class:`GatedServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

from uvicorn.server import Server

__all__ = ["ACCEPT_ALL", "Acceptor", "GatedServer", "client_budget", "raise_open_files_limit"]

#: Descriptors left for what is not a client's connection or its upstream one (the
#: collector's apps, the sink, files, a moment of slack).
RESERVED_FDS = 32
#: Seconds between looks at the open connections while accepting is paused.
PAUSE_CHECK = 0.02
#: With room for this many clients or more, the loop's own server accepts them (in C, a
#: burst at a time): only more than that many clients at once could use up the
#: descriptors, and :class:`Acceptor` costs a connection some 60,000 instructions more
#: (``bench/proxy_hotpath.py --callgrind -n 320``).  Twice the proxy's listen backlog.
ACCEPT_ALL = 4096


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go's runtime does for
    every program.  Why: a proxy holds two descriptors per client (its connection and
    the upstream's), and a shell's soft limit (often 1024, 256 on macOS) is reached long
    before the machine's.  Never lowered; nothing is said when it cannot be raised."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def client_budget() -> int:
    """How many client connections may be open at once: half of the descriptors not in
    use yet, less :data:`RESERVED_FDS` (each client may need one upstream too)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):  # pragma: no cover
        return 1 << 30
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc
        used = 16
    return max(1, (soft - used - RESERVED_FDS) // 2)


class Acceptor:
    """Accepts clients on a listening socket while fewer than ``limit`` are open, and
    stops accepting (the kernel's backlog holds the rest, as with nginx at its
    ``worker_connections``) until some have gone.

    Why: with the loop's own server, under ``ulimit -n 256`` and 400 clients, the proxy
    accepted until no descriptor was left for any upstream connection and answered every
    request 502 until the load stopped; past the limit uvloop (libuv) accepts what is
    pending and closes it at once.  Neither asyncio's nor uvloop's server can stop
    accepting without closing its socket, and both accept a burst at a time, so the
    limit is looked at here before each accept.  It costs per connection (a task hands
    the socket to the loop), nothing per request.  Stands in uvicorn's ``servers``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        connections: set[Any],
        limit: int,
        ssl: Any = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.connections = connections
        self.limit = limit
        #: Accepting starts again below this many (an eighth less: not for every one).
        self.resume_at = max(1, limit - limit // 8)
        self.ssl = ssl
        #: Accepted, not handed to the loop yet (not in ``connections`` yet).
        self.pending = 0
        self.paused = False
        #: Times accepting was paused (for tests and curious readers).
        self.pauses = 0
        self._closed = False
        self._check: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        # One per call (the loop calls again while more wait): a second accept would
        # mostly find none, and its BlockingIOError cost more than the loop's turn.
        if len(self.connections) + self.pending >= self.limit:
            self._pause()
            return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._pause()  # out of descriptors all the same: wait for some
                return
            raise
        self.pending += 1
        task = self.loop.create_task(self._hand_over(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl)
        except OSError:  # gone already
            conn.close()
        finally:
            self.pending -= 1

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self.loop.remove_reader(self.sock.fileno())
        self._check = self.loop.call_later(PAUSE_CHECK, self._resume)

    def _resume(self) -> None:
        self._check = None
        if self._closed:
            return
        if len(self.connections) + self.pending >= self.resume_at:
            self._check = self.loop.call_later(PAUSE_CHECK, self._resume)
            return
        self.paused = False
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (the socket is its owner's to close)."""
        if self._closed:
            return
        self._closed = True
        if self._check is not None:
            self._check.cancel()
        if not self.paused:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)


class GatedServer(Server):
    """uvicorn's server, accepting on the sockets it is given through :class:`Acceptor`
    when the descriptors leave room for fewer than :data:`ACCEPT_ALL` clients (else, or
    with no sockets given, uvicorn's own way)."""

    acceptors: list[Acceptor] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        limit = client_budget()
        if sockets is None or limit >= ACCEPT_ALL:
            await super().startup(sockets)
            return
        await super().startup(sockets=[])
        if not self.started:  # pragma: no cover - uvicorn exits on a failed startup
            return
        config = self.config
        protocol: Any = config.http_protocol_class  # (uvicorn's http= constructor)
        factory = functools.partial(
            protocol,
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        loop = asyncio.get_running_loop()
        connections = self.server_state.connections
        self.acceptors = [
            Acceptor(loop, sock, factory, connections, limit, config.ssl) for sock in sockets
        ]
        self.servers = list(self.acceptors)  # type: ignore[arg-type]  # (close, wait_closed)
