"""The proxy's upstream leg: a keep-alive pool of HTTP/1.1 connections.

Why not httpx or aiohttp: measured on a 2-CPU machine as a proxy's upstream leg, httpx's
async client cost most of a millisecond per request and queued under concurrency
(600-800 req/s in front of an app serving 28k), and aiohttp landed right at the latency
budget before any recording.  The
proxy's goals (at least twice mitmdump's throughput, at most 1 ms added to the median)
leave room only for the plainest path: an :class:`asyncio.Protocol` whose
``data_received`` feeds :class:`httptools.HttpResponseParser` directly (no stream reader,
no coroutine per read), and a pool that hands back the most recently used idle
connection.

Why these details:

* TCP_NODELAY, and the request head written together with a small body: small writes
  on a kept-alive socket otherwise meet delayed ACKs (40 ms stalls).
* A fresh parser per response: ``httptools`` cannot be told that a response answers a
  ``HEAD`` (no body whatever its Content-Length says), so a HEAD response ends at its
  head and the next exchange starts clean.
* Flow control both ways: body bytes wait in a small queue and the socket stops being
  read above :data:`HIGH_WATER` (a slow client never makes the proxy read a large
  download into memory); writes wait in :meth:`UpstreamConnection.drain` while the
  transport says its buffer is full.
* A connection goes back to the pool only when its exchange ended cleanly (the whole
  response read, the whole request written, keep-alive allowed); anything else closes it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

__all__ = [
    "HIGH_WATER",
    "HOP_BY_HOP",
    "ClientGone",
    "ConnectFailed",
    "ConnectTimeout",
    "ReadTimeout",
    "UpstreamClosed",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
]

#: Body bytes buffered from upstream before the proxy stops reading its socket (it reads
#: again once the client side has taken them all).
HIGH_WATER = 256 * 1024

_now = time.time_ns
_ids = itertools.count(1)
#: RFC 9110 7.6.1 hop-by-hop fields (plus the ones a proxy re-frames itself).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
    }
)
#: Response fields :meth:`UpstreamConnection.on_header` looks at (llhttp reads both
#: Connection fields).  Location and Refresh may name the upstream's own origin, which
#: the proxy rewrites (see hopscope.app.proxy.ProxyApp.relocated): they make a response
#: ``unusual``, so its fields are looked at one by one.
_NOTED = HOP_BY_HOP | {b"content-length", b"location", b"refresh"}


class UpstreamError(Exception):
    """The upstream failed; ``status`` is what the client is answered (502 or 504)."""

    status = 502
    kind = "upstream_error"


class ConnectFailed(UpstreamError):
    kind = "connect_failed"


class ConnectTimeout(UpstreamError):
    status = 504
    kind = "connect_timeout"


class ReadTimeout(UpstreamError):
    status = 504
    kind = "read_timeout"


class UpstreamClosed(UpstreamError):
    kind = "upstream_closed"


class UpstreamProtocolError(UpstreamError):
    kind = "invalid_response"


class ClientGone(Exception):
    """The client went away while the proxy waited for upstream: abandon the exchange."""

    kind = "client_gone"


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection; it carries one exchange at a time (no pipelining).

    Why slots: its fields are read and written dozens of times per exchange, and with
    more than 30 of them an instance's attributes no longer share their keys (each
    access a dictionary lookup instead of a fixed offset)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_deadline",
        "_drain_waiter",
        "_framed",
        "_head_only",
        "_loop",
        "_notified",
        "_notify",
        "_parser",
        "_read_paused",
        "_timer",
        "_waiter",
        "_write_paused",
        "closed",
        "complete",
        "error",
        "exchanges",
        "head_ts",
        "headers",
        "id",
        "interim",
        "keep_alive",
        "length",
        "local_port",
        "pool",
        "received",
        "sending",
        "status",
        "trailers",
        "transport",
        "unusual",
        "version",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.local_port: int | None = None
        self._loop = pool.loop
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Called (once) instead of waking a waiter: see :meth:`begin`.
        self._notify: Callable[[], None] | None = None
        self._notified = False
        self._timer: asyncio.TimerHandle | None = None
        #: When the current wait times out (loop time); see :meth:`_wait`.
        self._deadline = 0.0
        #: True while a request body is still being streamed: the upstream is then
        #: allowed to wait for it before answering (its silence is no read timeout).
        self.sending = False
        self._head_only = False
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: deque[bytes] = deque()
        #: Interim responses (103 Early Hints) not yet passed on: (status, fields).
        #: The proxy takes them as they come (see :meth:`head`), before the final one.
        self.interim: list[tuple[int, list[tuple[bytes, bytes]]]] = []
        self.exchanges = -1
        self.begin(False)  # the fields of an exchange (counted from the first request)

    # -- exchange state ----------------------------------------------------------
    def begin(self, head_only: bool, notify: Callable[[], None] | None = None) -> None:
        """Prepare for the next exchange (``head_only``: the request is a HEAD).

        ``notify``: call it (once, outside the parser's callbacks) when the response
        moves on (its head or body arrived, it failed, it timed out), instead of waking a
        coroutine; the read timeout runs from now, as for a wait.  Why: most responses
        arrive whole in one read; the proxy then answers from this callback, with no
        task and no future for the request (see the proxy's ``_Exchange.serve``).  It
        is told here, not in a call of its own: one call less per request."""
        self.exchanges += 1
        if head_only or self._head_only:
            # A HEAD's response ends at its head, which httptools cannot be told: the
            # parser of the exchange before one, or after one, is not reused.  (Any other
            # reused connection ended its last exchange cleanly, and httptools then
            # waits for the next response.)
            self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self.status = 0
        self.version = "1.1"
        self.head_ts = 0
        #: The fields with their names as upstream sent them (but hop-by-hop ones, in
        #: lower case: the proxy removes those).
        self.headers: list[tuple[bytes, bytes]] = []
        #: The head has a hop-by-hop field (:data:`HOP_BY_HOP`) or a second
        #: Content-Length: the proxy then goes through it field by field.  Without (the
        #: usual case) it forwards ``headers`` as they are.
        self.unusual = False
        #: The Content-Length field's value (None: none came); the parser framed the
        #: body by it.
        self.length: bytes | None = None
        #: Fields after a chunked body (httptools reports them as headers after the head).
        self.trailers: list[tuple[bytes, bytes]] = []
        self._framed = False  # Content-Length or chunked: the end is known without EOF
        self._connection = False  # a Connection (or Proxy-Connection) field came
        self._chunks.clear()
        self._buffered = 0
        self.received = 0
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self._notified = False
        self._notify = notify
        if notify is not None:
            loop = self._loop
            self._deadline = loop.time() + self.pool.read_timeout
            if self._timer is None:
                self._timer = loop.call_at(self._deadline, self._on_timeout)

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self._chunks
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            try:
                self.local_port = sock.getsockname()[1]
            except (OSError, IndexError, TypeError):
                pass
        self.pool._opened(self)

    def data_received(self, data: bytes) -> None:
        if self.complete or self.error is not None:
            # Bytes nobody asked for (no pipelining here): the connection is unusable.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols unasked"))
            self.close()
        except httptools.HttpParserError as exc:
            reason = str(exc) or type(exc).__name__
            self._fail(UpstreamProtocolError(f"upstream sent an invalid HTTP response ({reason})"))
            self.close()
        if self._notified or (self._notify is not None and self.status):
            # (_deliver's body, without its call: this is every fast-path response.)
            self._notified = False
            callback, self._notify = self._notify, None
            if callback is not None:
                callback()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says what it means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool._lost(self)
        if self.complete or self.error is not None:
            self._wake()
            if self._notified:
                self._deliver()
            return
        if self.status and not self._framed and not self._head_only and exc is None:
            # A response delimited by the end of the connection ends here, cleanly.
            self.complete = True
            self.keep_alive = False
        elif self.status:
            self._fail(UpstreamClosed("upstream closed the connection in the middle of the body"))
        else:
            self._fail(UpstreamClosed("upstream closed the connection before responding"))
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._notified:
            self._deliver()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks -----------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            self.trailers.append((name, value))
            return
        lower = name.lower()
        if lower in _NOTED:
            if lower == b"content-length":
                self._framed = True
                if self.length is not None:
                    self.unusual = True
                self.length = value
            elif lower == b"location" or lower == b"refresh":
                self.unusual = True  # (its name kept as sent: it may go on unchanged)
            else:
                name = lower
                self.unusual = True
                if name == b"transfer-encoding":
                    if value.lower() != b"chunked":
                        # A coding (gzip) the proxy would drop, its bytes passed on as
                        # if plain (nginx: a 502 too).
                        what = f"Transfer-Encoding {value.decode('latin-1')!r}"
                        self._fail(UpstreamProtocolError(f"upstream sent an unsupported {what}"))
                        raise UpstreamProtocolError(what)  # (stops the parser)
                    self._framed = True
                elif name == b"connection" or name == b"proxy-connection":
                    self._connection = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 200 <= status < 600:
            if status < 100 or status > 599 or status == 101:
                # No status a client can be given (RFC 9110 15: 100-599), or a switch
                # of protocols nobody asked for (an Upgrade never goes upstream here).
                what = "switched protocols unasked" if status == 101 else f"status {status}"
                self._fail(UpstreamProtocolError(f"upstream sent an invalid response ({what})"))
                raise UpstreamProtocolError(what)  # (stops the parser: see data_received)
            # An interim response (103 Early Hints, a stray 100 Continue): kept for
            # the client (not a 100: the proxy answered any Expect itself), and the
            # final one's headers start afresh.  ``unusual`` routes the final one
            # through the proxy's field-by-field path, which passes these on first.
            if status != 100:
                self.interim.append((status, self.headers))
            self.headers = []
            self.unusual = bool(self.interim)
            self.length = None
            self._framed = False
            self._connection = False
            if self.interim:
                if self._waiter is not None:
                    self._step()
                elif self._notify is not None:
                    self._notified = True  # (the fast path hands over to the coroutine)
            return
        self.status = status
        parser = self._parser
        if not self._connection and parser.should_keep_alive():
            # llhttp keeps a response alive without a Connection field only for
            # HTTP/1.1: get_http_version formats a string, ten times the cost of this.
            self.version = "1.1"
        else:
            self.version = parser.get_http_version()
        self.head_ts = _now()
        if status in (204, 304):
            self._framed = True
        if self._head_only:
            self.complete = True
            self.keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None:  # (a notify callback: see _step)
            self._step()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        size = len(body)
        self._buffered += size
        self.received += size
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        if self._waiter is not None:  # (a notify callback: see _step)
            self._step()

    def on_message_complete(self) -> None:
        if not self.status:
            return  # the end of an interim (1xx) response
        if not self.complete:
            self.complete = True
            self.keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None:  # (a notify callback: see _step)
            self._step()

    # -- waiting -----------------------------------------------------------------
    def _step(self) -> None:
        """The response moved on (from the parser's callbacks): wake a waiter.  A
        ``notify`` callback (see :meth:`begin`) needs nothing here: :meth:`data_received`
        calls it once the head is in (what any step after it needs too), and once."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self._notify is not None:
            self._notified = True  # delivered once the parser is done (_deliver)

    def _deliver(self) -> None:
        self._notified = False
        callback, self._notify = self._notify, None
        if callback is not None:
            callback()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = exc
        self._wake()

    def abandon(self, exc: BaseException) -> None:
        """Stop the exchange from outside (the client went away): wake and close."""
        self._fail(exc)
        self.close()
        if self._notified:
            self._deliver()

    def _on_timeout(self) -> None:
        self._timer = None
        if (self._waiter is None and self._notify is None) or self.closed:
            return  # nothing waits now: the next wait starts a timer again
        loop = self._loop
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timeout)
            return
        timeout = self.pool.read_timeout
        if self.sending:
            self._deadline = loop.time() + timeout
            self._timer = loop.call_at(self._deadline, self._on_timeout)
            return
        self._fail(ReadTimeout(f"upstream sent nothing for {timeout:g}s"))
        self.close()
        if self._notified:
            self._deliver()

    async def _wait(self) -> None:
        """Wait for the response's next step; the read timeout runs from now.

        Why one timer per connection, moved forward by each wait instead of one per
        wait: most waits last well under a millisecond, and arming and cancelling a
        timer for each was a measurable part of the proxy's work per request.
        """
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        self._deadline = loop.time() + self.pool.read_timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._on_timeout)
        try:
            await waiter
        finally:
            self._waiter = None

    async def head(self) -> None:
        """Wait for the response head (``status``, ``headers``, ``head_ts``), or return
        early with :attr:`interim` responses to pass on (then wait again)."""
        while not self.status:
            if self.error is not None:
                raise self.error
            if self.interim:
                return
            await self._wait()

    async def read(self) -> tuple[bytes, bool]:
        """The body bytes that arrived so far (waiting for some), and whether that's all."""
        chunks = self._chunks
        while not chunks:
            if self.complete:
                return b"", True
            if self.error is not None:
                raise self.error
            await self._wait()
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return data, self.complete and self.error is None

    def take_whole(self) -> bytes | None:
        """The whole body of a response that is complete (None when it is not)."""
        if not self.complete or self.error is not None:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    # -- writing -----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        transport = self.transport
        if transport is None or transport.is_closing():
            raise UpstreamClosed("upstream closed the connection before the request was sent")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is full; an upstream that reads nothing for
        the read timeout fails the exchange (nginx's proxy_send_timeout)."""
        while self._write_paused and not self.closed:
            waiter = self._drain_waiter = self._loop.create_future()
            timeout = self.pool.read_timeout
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                self._fail(ReadTimeout(f"upstream read none of the request body for {timeout:g}s"))
                self.close()
            finally:
                self._drain_waiter = None
        if self.error is not None:
            raise self.error
        if self.closed and not self.complete:
            raise UpstreamClosed("upstream closed the connection while the request was sent")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections to one upstream, most recently used first.

    The pool never limits how many connections are open at once (as nginx's upstream
    keepalive does not); it limits how many idle ones it keeps (``max_idle``).
    ``open`` holds every live connection: tests count it to see nothing leaks.
    """

    def __init__(
        self,
        host: str,
        port: int | None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_idle: int = 64,
        loop: asyncio.AbstractEventLoop | None = None,
        tls: ssl.SSLContext | None = None,
        unix: str | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.port = port
        #: A Unix socket's path to connect to instead of ``host:port``.
        self.unix = unix
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.loop = loop or asyncio.get_running_loop()
        self._idle: list[UpstreamConnection] = []
        self.open: set[UpstreamConnection] = set()
        self.created = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still open, if any."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises :class:`ConnectFailed` or :class:`ConnectTimeout`."""
        unix = self.unix
        where = f"unix:{unix}" if unix is not None else f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                if unix is not None:
                    _, protocol = await self.loop.create_unix_connection(
                        lambda: UpstreamConnection(self), unix
                    )
                else:
                    port = self.port
                    assert port is not None  # (only a Unix socket's upstream has none)
                    _, protocol = await self.loop.create_connection(
                        lambda: UpstreamConnection(self),
                        self.host,
                        port,
                        ssl=self.tls,
                        server_hostname=self.host if self.tls is not None else None,
                    )
        except TimeoutError:
            raise ConnectTimeout(
                f"connecting to upstream {where} timed out after {self.connect_timeout:g}s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or exc.reason or "certificate verify failed"
            raise ConnectFailed(
                f"cannot connect to upstream {where}: TLS certificate not trusted ({reason}; "
                "--insecure skips the check for a development certificate)"
            ) from None
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            message = f"cannot connect to upstream {where}: TLS failed ({reason})"
            raise ConnectFailed(message) from None
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED or isinstance(exc, ConnectionRefusedError):
                reason = "connection refused"
            else:
                reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectFailed(f"cannot connect to upstream {where}: {reason}") from None
        assert isinstance(protocol, UpstreamConnection)
        self.created += 1
        return protocol

    def release(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for the next exchange if it ended cleanly, else close it."""
        # (``conn.reusable``, without the property's call.)
        transport = conn.transport
        if (
            conn.complete
            and conn.keep_alive
            and conn.error is None
            and not conn._chunks
            and not conn.closed
            and transport is not None
            and not transport.is_closing()
            and len(self._idle) < self.max_idle
        ):
            self._idle.append(conn)
        else:
            conn.close()

    def _opened(self, conn: UpstreamConnection) -> None:
        self.open.add(conn)

    def _lost(self, conn: UpstreamConnection) -> None:
        self.open.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for conn in list(self.open):
            conn.close()
        self._idle.clear()
