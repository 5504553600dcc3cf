"""The proxy's listening side: an HTTP/1.1 server protocol that hands requests straight
to a handler, without uvicorn's per-request machinery.

Why: measured with ``bench/proxy_hotpath.py --callgrind``, uvicorn's server side cost
more instructions per proxied request than the exchange itself (a scope with a state
copy, a request cycle with its own :class:`asyncio.Event`, a keep-alive timer armed and
cancelled for every response, message dicts checked header by header).  On a 2-CPU
machine at 16 concurrent clients that CPU turns into queueing, and the proxy's added
median latency went past its 1 ms budget.

What stays uvicorn's: the server frame (lifespan, signals, graceful shutdown through
``server_state``), so :class:`HttpListener` takes the constructor uvicorn gives an
``http=`` protocol class; accepting is :mod:`hopscope.app.accept`'s (no more clients
than descriptors allow, see there).  What it does itself: keep-alive with one idle timer per
connection (moved, not re-armed per response), pipelining (later requests wait, reading
paused), request bodies (Content-Length or chunked) with flow control, ``Expect:
100-continue``, HTTP/1.0 (no chunked coding to it; kept alive when it asks and a
length frames the body, as nginx does), client disconnects, a limit on a
request head's size (:data:`MAX_HEAD`), a malformed request answered after the
pipelined ones before it, and a whole small response written in one go
(:meth:`Request.write_whole`).  What it does not: a WebSocket ``Upgrade`` request
goes to :attr:`HttpListener.fallback`, a uvicorn protocol, with the connection, as
uvicorn itself switches to its WebSocket protocol (any other Upgrade, such as h2c, is
answered here as a plain request, as nginx answers it).

:class:`CorkedWrites` and :class:`ClientConnection` live here because both the listener
and the uvicorn-based fallback path write through them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

__all__ = [
    "ClientConnection",
    "CorkedWrites",
    "HttpListener",
    "Request",
]

#: Request body bytes held before the client's socket stops being read (uvicorn's).
HIGH_WATER = 65536
#: The longest request head taken (its target and fields); a longer one is answered 414
#: or 431 and its connection closed.  Why: httptools sets no limit, so one client could
#: grow a head without end, and the proxy would pass a megabyte of fields upstream
#: (nginx takes 32 KiB by default; a development proxy can be more generous).
MAX_HEAD = 65536
#: Seconds a refused connection is still read (and what comes dropped): see _Linger.
LINGER = 2.0

_FIELD_JOIN = b": ".join
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}
#: Request fields the parser callbacks note (llhttp reads both Connection fields).
_NOTED = frozenset({b"expect", b"connection", b"proxy-connection"})
#: Request fields whose names the scope has in lower case; any other name is kept as
#: the client sent it (``X-Api-Key`` goes upstream as ``X-Api-Key``, as nginx passes
#: it).  Why these are lowered: the handler looks for them, and none of them goes
#: upstream as the client sent it (the proxy replaces, drops or re-frames each), so
#: one lookup here spares it a lowering per field per request.
LOWERED = _NOTED | {
    b"host", b"content-length", b"transfer-encoding", b"keep-alive", b"te", b"trailer",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"traceparent",
    b"x-request-start", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
}  # fmt: skip
_logger = logging.getLogger("uvicorn.error")

_now = time.time_ns
#: The usual methods' names (a lookup costs less than a decode).
_METHODS = {
    name.encode(): name
    for name in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
}
#: :attr:`Request.expected` of a body that ends with the connection (to an HTTP/1.0
#: client, which knows no chunked coding): more than any body sent.
_UNTIL_CLOSE = 1 << 62
#: ``length`` of :func:`_whole_response` when the caller does not know it: the fields
#: are searched for a Content-Length.
SCAN: Any = object()


class _Refused(Exception):
    """Raised in a parser callback to stop httptools at a head it refuses
    (:attr:`HttpListener._error` says why)."""


def _too_long(url: bytes) -> tuple[int, bytes]:
    if len(url) > MAX_HEAD:
        return 414, b"Request target too long."
    return 431, b"Request header fields too large."


def _refused_target(data: bytes, method: bytes) -> bytes:
    """The target llhttp refused in ``data`` (the read it failed in), for the record:
    llhttp reports a target only once it ended, so one it stopped in (a raw byte past
    ASCII, a control byte) would be recorded as no request at all.  The first request
    line in ``data`` whose target holds such a byte is taken (b"": none found)."""
    prefix = method + b" "
    at = data.find(prefix)
    while at >= 0:
        if at == 0 or data[at - 1] == 0x0A:
            line = data[at + len(prefix) :].partition(b"\n")[0].rstrip(b"\r")
            target = line.partition(b" ")[0]
            if any(byte > 0x7E or byte < 0x21 for byte in target):
                return target
        at = data.find(prefix, at + 1)
    return b""


class _Linger(asyncio.Protocol):
    """What a refused connection's protocol becomes once its answer is written and its
    write side shut: what the client still sends is read and dropped until it stops
    or :data:`LINGER` seconds pass.  Why (nginx's lingering close): closing with unread
    bytes resets the connection, and a reset can destroy the answer before the client
    reads it (a client still sending an oversized head or a body)."""

    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self.timer = listener.loop.call_later(LINGER, listener.transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # (the transport closes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.listener.connection_lost(exc)


class CorkedWrites:
    """The client transport as a response sees it, with writes that can be held and
    joined.

    Why: a response's head and its body are written separately, two system calls and
    two segments.  When the upstream's whole response is already here, the proxy holds
    both writes and makes them one; on this kind of machine a loopback write costs more
    than all the proxy's Python work for a small request.
    """

    __slots__ = ("_held", "_transport", "trailers")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None
        #: A trailer section for the chunked body's end (see :meth:`write`).
        self.trailers: bytes | None = None

    def write(self, data: bytes) -> None:
        trailers = self.trailers
        if trailers is not None and data.endswith(b"0\r\n\r\n"):
            # HTTP/1.1 servers' ASGI has no ``http.response.trailers``: set just before
            # the body's last message, they go into the last chunk written.
            self.trailers = None
            data = data[:-2] + trailers + b"\r\n"
        if self._held is not None:
            self._held.append(data)
        else:
            self._transport.write(data)

    def hold(self) -> None:
        self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(b"".join(held))

    def close(self) -> None:
        self.release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _whole_response(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    head_only: bool,
    keep_alive: bool | None,
    default_headers: list[tuple[bytes, bytes]],
    block: bytes | None = None,
    length: Any = SCAN,
    until_close: bool = False,
) -> bytes | None:
    """A whole response's bytes, framed as a server's ``send`` would frame them; None
    when it is not the plain kind written in one go (the ordinary path then says what
    is wrong, or frames it).  ``block``: ``headers`` already joined as ``name: value``
    lines (the proxy records that block too).  ``length``: the one Content-Length of
    ``headers`` (None: there is none) when the caller knows it matches ``body`` (the
    proxy's upstream parser framed the body by it), so neither is searched nor
    checked here.  ``until_close``: a body without a length is framed by the connection's
    end, not chunked (for an HTTP/1.0 client, as :meth:`Request.send` frames it).
    ``keep_alive`` None: an HTTP/1.0 client asked for keep-alive (see
    :attr:`Request.keep_alive`): kept with a length, else None is returned."""
    if not 200 <= status < 600 or status == 204 or status == 304:
        return None
    if length is SCAN:
        length = None
        for name, value in headers:
            if name.lower() == b"content-length":
                if length is not None:
                    return None
                length = value
        if length is not None and not head_only:
            try:
                if int(length) != len(body):
                    return None
            except ValueError:
                return None
    if keep_alive and block and length is not None and not head_only and not default_headers:
        # The usual one (what the branches below make of it, in one call).
        return b"".join((STATUS_LINE[status], block, b"\r\n\r\n", body))
    if keep_alive is None and length is None and not head_only:
        return None  # (HTTP/1.0: no length, no keep-alive; the ordinary path says so)
    content = [STATUS_LINE[status]]
    if default_headers:
        content.append(b"\r\n".join(map(_FIELD_JOIN, default_headers)))
        content.append(b"\r\n")
    if headers:
        content.append(b"\r\n".join(map(_FIELD_JOIN, headers)) if block is None else block)
        content.append(b"\r\n")
    if not keep_alive:
        content.append(b"connection: close\r\n" if keep_alive is False else _KEEP_ALIVE)
    if head_only or (length is None and until_close):
        content.append(b"\r\n")
        if not head_only:
            content.append(body)
    elif length is None:
        content.append(b"transfer-encoding: chunked\r\n\r\n")
        if body:
            content.append(b"%x\r\n" % len(body))
            content.append(body)
            content.append(b"\r\n")
        content.append(b"0\r\n\r\n")
    else:
        content.append(b"\r\n")
        content.append(body)
    return b"".join(content)


class ClientConnection:
    """What the proxy knows about one client connection, shared by its requests."""

    __slots__ = ("accepted", "lost", "on_lost", "requests", "transport", "writer")

    def __init__(self, transport: Any) -> None:
        self.accepted = _now()
        self.requests = 0
        self.transport = transport
        self.writer = CorkedWrites(transport)
        self.lost = False
        #: Called once when the client goes away (the exchange in progress abandons
        #: its upstream request instead of waiting for a response nobody will read).
        self.on_lost: Callable[[], None] | None = None

    def write_whole(
        self,
        cycle: Any,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        block: bytes | None = None,
        length: Any = SCAN,
    ) -> bool:
        """Write a whole response (its head and body) in one go and complete the
        request's ``cycle``; False, with nothing done, when the response is not the
        plain kind this handles.  ``block``, ``length``: see :func:`_whole_response`.

        ``cycle`` is a :class:`Request` of the listener, or (on the uvicorn-based path)
        uvicorn's ``RequestResponseCycle``, whose attributes this leans on as of uvicorn
        0.54.  Why: for a small response that is already here (most of them), two
        ``send`` calls (message dicts, a validating pass over each header, two writes
        joined) cost several percent of the proxy's work per request.  The fields come
        from upstream through httptools (which rejects invalid ones), with the hop-by-hop
        ones (Connection, Transfer-Encoding) already removed.
        """
        if cycle is None:
            return False
        if type(cycle) is Request:
            return cycle.write_whole(status, headers, body, block, length)
        if (
            cycle.response_started
            or cycle.disconnected
            or cycle.default_headers
            or cycle.flow.write_paused
        ):
            return False
        keep_alive = cycle.keep_alive
        data = _whole_response(
            status, headers, body, cycle.scope["method"] == "HEAD", keep_alive, [], block, length
        )
        if data is None:
            return False
        self.transport.write(data)
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.response_complete = True
        cycle.message_event.set()
        if not keep_alive:
            self.transport.close()
        cycle.on_response()
        return True


class Request:
    """One request on a listener connection: its scope, and the ASGI-shaped ``receive``
    and ``send`` its handler uses for bodies (a whole small response skips ``send``:
    :meth:`write_whole`)."""

    __slots__ = (
        "_waiter",
        "absolute",
        "begin",
        "body",
        "chunked",
        "disconnected",
        "expected",
        "head_only",
        "head_ts",
        "keep_alive",
        "listener",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
        "target",
        "waiting_for_100_continue",
    )

    # Made by HttpListener.on_headers_complete, which sets every field (no __init__:
    # a Python call less on every request).
    listener: HttpListener
    scope: dict[str, Any]
    #: When its first byte and its whole head arrived; whether its target was in
    #: absolute form (``GET http://elsewhere/``, reduced to a path in the scope).
    begin: int
    head_ts: int
    absolute: bool
    #: The request target as the client sent it, up to a fragment (an origin-form
    #: target goes upstream byte for byte: ``/p?`` keeps its ``?``, which the scope's
    #: ``raw_path`` and ``query_string`` cannot say).
    target: bytes
    #: None until the response's head is made, for an HTTP/1.0 client that asked for
    #: keep-alive: kept alive when the response has a length (answered ``Connection:
    #: keep-alive``, as nginx answers it), closed when its end must frame it.  (None,
    #: not another field: every request sets every field, and this way the HTTP/1.1
    #: paths test nothing more.)
    keep_alive: bool | None
    waiting_for_100_continue: bool
    head_only: bool
    body: bytes
    more_body: bool
    disconnected: bool
    response_started: bool
    response_complete: bool
    chunked: bool
    expected: int
    _waiter: asyncio.Future[None] | None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the request body ---------------------------------------------------------
    async def receive(self) -> dict[str, Any]:
        listener = self.listener
        transport = listener.transport
        if self.waiting_for_100_continue and not transport.is_closing():
            transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        if (
            not self.body
            and self.more_body
            and not self.disconnected
            and not self.response_complete
        ):
            listener.resume_reading()
            loop = listener.loop
            waiter = self._waiter = loop.create_future()
            # A client silent in the middle of its body is let go (nginx's
            # client_body_timeout): it held the upstream connection too, for good.
            timer = loop.call_later(listener.body_timeout, listener.body_stalled, self)
            try:
                await waiter
            finally:
                self._waiter = None
                timer.cancel()
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        body, self.body = self.body, b""
        listener.resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    # -- the response ---------------------------------------------------------------
    async def send(self, message: MutableMapping[str, Any]) -> None:
        listener = self.listener
        if listener.write_paused and not self.disconnected:
            await listener.drain()
        if self.disconnected:
            return
        writer = listener.conn.writer
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self.response_started = True
            self.waiting_for_100_continue = False
            status = message["status"]
            headers = message.get("headers") or []
            default = listener.server_state.default_headers
            if default:
                headers = default + list(headers)
            content = [STATUS_LINE[status]]
            chunked: bool | None = None
            close = False
            for name, value in headers:
                lower = name.lower()  # (the name goes on as it came)
                if lower == b"content-length" and chunked is None:
                    self.expected = int(value)
                    chunked = False
                elif lower == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected = 0
                    chunked = True
                elif lower == b"connection":
                    if b"close" in [t.strip().lower() for t in value.split(b",")]:
                        self.keep_alive = False
                        close = True
                content.append(_FIELD_JOIN((name, value)))
                content.append(b"\r\n")
            if not self.keep_alive and not close:
                if self.keep_alive is None and (
                    chunked is False or self.head_only or status == 204 or status == 304
                ):
                    self.keep_alive = True  # (HTTP/1.0 asking, and a length frames it)
                    content.append(_KEEP_ALIVE)
                else:
                    self.keep_alive = False
                    content.append(b"connection: close\r\n")
            if status == 204 or status == 304:
                # No body, whatever a Content-Length says (a 304's is the length the
                # full response would have, RFC 9110 8.6): framed as a HEAD's answer.
                self.head_only = True
            if chunked is None and not self.head_only:
                if self.scope["http_version"] == "1.0":
                    # No chunked coding for HTTP/1.0 (RFC 9112 6.1): the connection's
                    # end frames the body (such a client's is never kept alive here).
                    self.keep_alive = False
                    self.expected = _UNTIL_CLOSE
                else:
                    chunked = True
                    content.append(b"transfer-encoding: chunked\r\n")
            self.chunked = bool(chunked)
            content.append(b"\r\n")
            writer.write(b"".join(content))
            return
        if self.response_complete:
            raise RuntimeError(f"unexpected {message['type']!r} after the response completed")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {message['type']!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            self.expected = 0
        elif self.chunked:
            if body:
                data = b"%x\r\n%s\r\n" % (len(body), body)
                writer.write(data + b"0\r\n\r\n" if not more else data)
            elif not more:
                writer.write(b"0\r\n\r\n")
        else:
            if len(body) > self.expected:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected -= len(body)
            if body:
                writer.write(body)
        if not more:
            if self.expected != 0 and self.expected < _UNTIL_CLOSE >> 1:
                raise RuntimeError("Response content shorter than Content-Length")
            self._complete()

    def write_whole(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        block: bytes | None = None,
        length: Any = SCAN,
    ) -> bool:
        """The whole response in one write (see :meth:`ClientConnection.write_whole`)."""
        listener = self.listener
        if self.response_started or self.disconnected or listener.write_paused:
            return False
        keep_alive = self.keep_alive
        default_headers = listener.server_state.default_headers
        if (
            keep_alive
            and block
            and length is not SCAN
            and length is not None
            and not self.head_only
            and not default_headers
            and 200 <= status < 600
            and status != 204
            and status != 304
        ):
            # (_whole_response's usual case, without its call: most responses.)
            data: bytes | None = b"".join((STATUS_LINE[status], block, b"\r\n\r\n", body))
        else:
            data = _whole_response(
                status, headers, body, self.head_only, keep_alive, default_headers, block, length,
                not keep_alive and self.scope["http_version"] == "1.0",
            )  # fmt: skip
            if data is None:
                return False
            if keep_alive is None:  # (HTTP/1.0 asking, and a length frames it)
                keep_alive = self.keep_alive = True
        transport = listener.transport
        transport.write(data)
        self.response_started = True
        self.waiting_for_100_continue = False
        # (_complete's body, without its call: this is most responses' end.)
        self.response_complete = True
        if self._waiter is not None:
            self.wake()
        if not keep_alive:
            listener.conn.writer.close()  # what it holds goes first
        elif (
            listener.running is self
            and not listener.pipeline
            and listener._upgrade is None
            and not listener.read_paused
            and listener._timer is not None
            and not transport.is_closing()
        ):
            # (response_done's usual case, without its call: a kept-alive connection
            # with nothing behind this request, its keep-alive timer armed.)
            listener.server_state.total_requests += 1
            listener.running = None
            listener._idle_at = listener.loop.time()
            return True
        listener.response_done(self)
        return True

    def _complete(self) -> None:
        self.response_complete = True
        if self._waiter is not None:
            self.wake()
        listener = self.listener
        if not self.keep_alive:
            listener.conn.writer.close()  # what it holds goes first
        listener.response_done(self)


class HttpListener(asyncio.Protocol):
    """An HTTP/1.1 server connection calling :meth:`handle` per request (see the module
    docstring).  uvicorn creates it as its ``http=`` protocol class."""

    #: The uvicorn protocol an Upgrade request's connection is handed to.
    fallback: type[asyncio.Protocol] | None = None
    #: Seconds a request head may take to arrive, from its first byte (nginx's default).
    head_timeout = 60.0
    #: Seconds a request body may stay silent while its handler waits for more (nginx's
    #: client_body_timeout): then the connection closes, as nginx closes it.
    body_timeout = 60.0
    #: What follows an Upgrade request answered as a plain one, and whether
    #: :meth:`_upgraded` is parsing such a rest already (see there).
    _feeding = False
    _rest: bytes | None = None
    #: An Upgrade request answered as a plain one that has a body: its framing fields
    #: (bytes) until :meth:`_upgraded` has it read, then the request itself (see there).
    _resume: Any = None

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        try:
            # Answer the first of pipelined requests even when the client closes.
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass
        self.timeout_keep_alive = config.timeout_keep_alive
        self.transport: Any = None
        self.conn: ClientConnection = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        #: The request being answered, and those parsed behind it (pipelined).
        self.running: Request | None = None
        self.pipeline: deque[Request] = deque()
        #: The request being parsed (its body goes to it).
        self.parsing: Request | None = None
        self.read_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        #: loop time the connection went idle (0.0: busy); see :meth:`_on_idle`.
        self._idle_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._upgrade: bytes | None = None
        # Per-request parse state.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._begin = 0
        self._expect = False
        self._connection = False
        #: Measuring this head (see :meth:`_received_counted`), and its bytes so far.
        self._counting = False
        self._head_bytes = 0
        #: The answer to a head refused in a parser callback: (status, reason); once
        #: :meth:`_bad_request` made the answer, what :meth:`refused` is told of the
        #: request (or None), until it is written.  (Why not an attribute of its own:
        #: with one more set here, past CPython 3.11's 30 shared keys, every ``self.``
        #: access per request became slower: 1.3k instructions, 1% of the proxy's.)
        self._error: tuple[Any, ...] | None = None
        #: A refusal's bytes, written once the requests before it are answered.
        self._refusal: bytes | None = None

    def handle(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Answer ``request``: a coroutine to run as a task, or None when the handler
        answers it from callbacks (calling :meth:`spawn` if it needs a task after all)."""
        raise NotImplementedError

    def refused(
        self,
        status: int,
        reason: bytes,
        error: str | None,
        begin: int,
        method: bytes | None,
        version: str | None,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Told, once its answer is written, of a request refused here (``status`` 400
        for one that cannot be read, 414 or 431 for a head too long) that no handler
        saw: ``error`` is the parser's reason for a 400, ``begin`` when the request's
        first byte came, ``method`` and ``version`` None when not read yet, ``url`` and
        ``headers`` what was read of it (maybe cut short).  Why: the proxy records it,
        or a user watching would see no request at all."""

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        if self.fallback is not None and not self.accepts(self.config.app):
            self._hand_over(transport, b"")
            return
        self.server_state.connections.add(self)
        self.transport = transport
        self.conn = ClientConnection(transport)
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        # Idle until its first request (a connection that sends none is closed).
        loop = self.loop
        self._idle_at = loop.time()
        self._timer = loop.call_at(self._idle_at + self.timeout_keep_alive, self._on_idle)

    def accepts(self, app: Any) -> bool:
        """Whether this listener serves ``app`` itself (else every connection goes to
        :attr:`fallback`)."""
        return True

    def data_received(self, data: bytes) -> None:
        self._idle_at = 0.0
        if self._upgrade is not None:
            self._upgrade += data
            return
        if self._begin or len(data) > MAX_HEAD:
            self._received_counted(data)
            return
        # (As _received_counted feeds the parser, without the counting: kept inline, as
        # this is every request's read.)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data, exc.args[0])
        except (httptools.HttpParserError, UnicodeDecodeError) as exc:
            self._bad_request(exc, data)

    def _received_counted(self, data: bytes) -> None:
        """:meth:`data_received` for a read that continues a head or may hold a long
        one: the head is measured against :data:`MAX_HEAD`.  Why not on every read: a
        head within one read shorter than the limit cannot be too long, and counting
        each field cost every request."""
        # (A made head of _read_upgrade_body's is no head the client sent: its body is
        # not counted as one, nor the head behind it.)
        continued = self._begin != 0 and self._resume is None
        self._counting = True
        upgraded = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            upgraded = exc.args[0]
        except (httptools.HttpParserError, UnicodeDecodeError) as exc:
            self._bad_request(exc, data)
        finally:
            self._counting = False
        if not self._begin:
            self._head_bytes = 0
        elif continued:
            # Still incomplete: httptools holds what came so far (a head that began in
            # this read is not counted yet: at most one read more is held).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD and self._refusal is None:
                self._error = _too_long(self._url)
                self._bad_request()
        if upgraded is not None:
            self._upgraded(data, upgraded)

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        conn = self.conn
        if conn is None:
            return
        for request in (self.running, *self.pipeline):
            if request is not None and not request.response_complete:
                request.disconnected = True
                request.wake()
        if not conn.lost:
            conn.lost = True
            callback, conn.on_lost = conn.on_lost, None
            if callback is not None:
                callback()
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if exc is None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.transport.is_closing():
            waiter = self._drain = self.loop.create_future()
            try:
                await waiter
            finally:
                self._drain = None

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if (
            self.read_paused
            and not self.pipeline
            and self._upgrade is None
            and self._refusal is None
        ):
            self.read_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._begin = _now()
        self._url = b""
        self._headers = []
        self._expect = False
        self._connection = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in LOWERED:
            name = lower
            if lower in _NOTED:
                if lower != b"expect":
                    self._connection = True
                elif value.lower() == b"100-continue":
                    self._expect = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        url = self._url
        if self._counting:
            if self._resume is not None:
                self._body_resumed()
                return
            if len(url) + sum(len(n) + len(v) + 4 for n, v in self._headers) > MAX_HEAD:
                self._error = _too_long(url)
                raise _Refused  # (httptools stops: see data_received)
        begin, self._begin = self._begin, 0  # (0: no head in progress)
        parser = self.parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        if parser.should_upgrade() and method != "CONNECT":
            if self.fallback is not None and self._websocket():
                self._upgrade_head(method, url, parser.get_http_version())
                return
            # Another protocol (h2c): answered as a plain request, its Upgrade dropped
            # (hop-by-hop), as nginx does; then the requests pipelined behind it.  But
            # llhttp ends the request at its head and takes what follows for the other
            # protocol: a body there is read by :meth:`_upgraded` (see _resume).
            framing = [
                _FIELD_JOIN(pair)
                for pair in self._headers
                if pair[0] == b"transfer-encoding" or pair[0] == b"content-length"
            ]
            if framing:
                self._resume = b"\r\n".join(framing)
        head_ts = _now()
        alive = parser.should_keep_alive()
        if alive and not self._connection:
            # llhttp keeps a request alive without a Connection field only for HTTP/1.1:
            # get_http_version formats a string, ten times the cost of this test.
            version = "1.1"
        else:
            version = parser.get_http_version()
        origin_form = url[:1] == b"/"
        target = url
        if origin_form and url.find(b"#") < 0:  # (find: "in" costs a raised TypeError)
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"", parsed.query or b""
            if origin_form:
                target = url[: url.find(b"#")]  # (a fragment is not sent on)
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http",
            "http_version": version,
            "method": method,
            "scheme": self.scheme,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": self._headers,
            "client": self.client,
            "server": self.server,
        }
        conn = self.conn
        conn.requests += 1
        # (None: an HTTP/1.0 client asking for keep-alive, see Request.keep_alive.)
        keep_alive = alive and method != "CONNECT" and (version != "1.0" or None)
        absolute = not origin_form and url != b"*"
        # (Every field of a Request is set here: it has no __init__.)
        request = Request()
        request.listener = self
        request.scope = scope
        request.begin = begin
        request.head_ts = head_ts
        request.absolute = absolute
        request.target = target
        request.keep_alive = keep_alive
        # (Not for HTTP/1.0: such a client would take the 100 for its answer.)
        request.waiting_for_100_continue = self._expect and version != "1.0"
        request.head_only = method == "HEAD"
        request.body = b""
        request.more_body = True
        request.disconnected = False
        request.response_started = False
        request.response_complete = False
        request.chunked = False
        request.expected = 0
        request._waiter = None
        self.parsing = request
        if self.running is None:
            self._start(request)
        else:
            self.pause_reading()
            self.pipeline.append(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or self._upgrade is not None or request.response_complete:
            return
        request.body += body
        if len(request.body) > HIGH_WATER:
            self.pause_reading()
        request.wake()

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is None or self._upgrade is not None:
            return
        self.parsing = None
        if request.response_complete:
            return
        request.more_body = False
        if request._waiter is not None:  # (wake's test, without its call when idle)
            request.wake()

    # -- requests ------------------------------------------------------------------
    def _start(self, request: Request) -> None:
        self.running = request
        try:
            coroutine = self.handle(request)
        except Exception as exc:  # a bug: this connection cannot go on
            _logger.error("Exception in the proxy", exc_info=exc)
            self.transport.close()
            return
        if coroutine is not None:
            self.spawn(request, coroutine)

    def spawn(self, request: Request, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` (answering ``request``) as a task uvicorn's shutdown waits
        for; a request it leaves unanswered gets a 500 or its connection closed."""
        task = self.loop.create_task(coroutine)
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(lambda task: self._task_done(task, request))

    def _task_done(self, task: asyncio.Task[None], request: Request) -> None:
        self.server_state.tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            _logger.error("Exception in the proxy", exc_info=exc)
        if request.response_complete or request.disconnected:
            return
        if exc is None and not task.cancelled():
            _logger.error("The proxy returned without completing its response.")
        if request.response_started or self.transport.is_closing():
            self.transport.close()
            return
        request.keep_alive = False
        body = b"Internal Server Error"
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        headers.append((b"content-length", b"%d" % len(body)))
        if not request.write_whole(500, headers, body):
            self.transport.close()

    def response_done(self, request: Request) -> None:
        """``request``'s response is complete: the next pipelined request, or idle."""
        self.server_state.total_requests += 1
        if self.running is request:
            self.running = None
        transport = self.transport
        if transport.is_closing():
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            if not self.pipeline:
                self.resume_reading()
            return
        if self._upgrade is not None:
            self._hand_over(transport, self._upgrade)
            return
        if self._refusal is not None:
            self._refuse_connection()
            return
        if self.read_paused:
            self.resume_reading()
        loop = self.loop
        self._idle_at = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._idle_at + self.timeout_keep_alive, self._on_idle)

    def _on_idle(self) -> None:
        """The keep-alive timer: one per connection, moved rather than re-armed per
        response (arming and cancelling one per request was measurable).  It runs from
        the connection's start too, so one that never sends a request closes."""
        self._timer = None
        if self.running is not None or self.transport.is_closing():
            return  # busy: the next response arms it again
        loop = self.loop
        idle_at = self._idle_at
        if idle_at:
            deadline = idle_at + self.timeout_keep_alive
        elif self._begin:
            # A head still arriving (data_received marked the connection busy): it gets
            # head_timeout from its first byte, as nginx's client_header_timeout, rather
            # than the connection for good.
            deadline = loop.time() + self.head_timeout - (_now() - self._begin) / 1e9
        else:
            # Bytes but no head (the rest of an answered request's body): idle from now.
            self._idle_at = loop.time()
            deadline = self._idle_at + self.timeout_keep_alive
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._on_idle)
        else:
            self.transport.close()

    def body_stalled(self, request: Request) -> None:
        """``request``'s body sent nothing for :attr:`body_timeout`: close the
        connection (its handler sees the client gone, and lets the upstream go)."""
        if request._waiter is not None and not self.transport.is_closing():
            _logger.warning("A request body sent nothing for %gs: closing.", self.body_timeout)
            self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close an idle connection, else after the
        response in progress."""
        if self.running is None:
            self.transport.close()
        else:
            self.running.keep_alive = False
            for request in self.pipeline:
                request.keep_alive = False

    def _bad_request(self, cause: Exception | None = None, data: bytes = b"") -> None:
        """Answer a request that cannot be read (400, or :attr:`_error`) and close the
        connection, after the answers to the requests before it (pipelined: a client's
        good requests keep their answers, as nginx gives them).

        A raw byte past ASCII in the target (``GET /caf\\xc3\\xa9``) is refused here too
        (RFC 9112 3.2, RFC 3986: it must be percent-encoded).  nginx 1.22 passes it on,
        but uvicorn (httptools and h11), gunicorn 27 and hypercorn all answer it 400
        themselves: passing it on would change what the user sees from none of them."""
        if self._refusal is not None:
            return  # (the parser, once failed, fails every read after)
        error = self._error
        status, message = error or (400, b"Invalid HTTP request received.")
        _logger.warning(message.decode())
        default = self.server_state.default_headers
        content = [STATUS_LINE[status]]
        content.extend(_FIELD_JOIN(pair) + b"\r\n" for pair in default)
        content.append(b"content-type: text/plain; charset=utf-8\r\n")
        content.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(message))
        content.append(message)
        self._refusal = b"".join(content)
        begin = self._begin
        if self.parsing is None and begin:
            # No handler saw this request: it is reported when answered.  (Its method
            # is known once its target came, its version once its fields did.)
            url, headers = self._url, self._headers
            if not url and data and isinstance(cause, httptools.HttpParserInvalidURLError):
                url = _refused_target(data, self.parser.get_method())
            method = self.parser.get_method() if url else None
            version = self.parser.get_http_version() if headers else None
            why = str(cause) if cause is not None and error is None else None
            self._error = (status, message, why, begin, method, version, url, headers)
        else:
            self._error = None
        if self.running is None:
            self._refuse_connection()
        elif self.parsing is not None:
            # A body that cannot be read: its request cannot be answered either.
            self.transport.write(self._refusal)
            self.transport.close()
        else:
            self.pause_reading()  # (and so off write_whole's shortcut: see response_done)

    def _refuse_connection(self) -> None:
        """Write the refusal and end the connection, lingering (see :class:`_Linger`):
        no request of it runs, so nothing else writes."""
        transport = self.transport
        assert self._refusal is not None
        transport.write(self._refusal)
        head, self._error = self._error, None
        if head is not None:
            try:
                self.refused(*head)
            except Exception as exc:  # a bug: the answer is written all the same
                _logger.error("Exception in the proxy", exc_info=exc)
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()  # (TLS: no half close)
            return
        transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport.set_protocol(_Linger(self))
        transport.resume_reading()

    # -- handing an Upgrade over -------------------------------------------------------
    def _websocket(self) -> bool:
        """Whether the Upgrade request just parsed asks for a WebSocket, as uvicorn's
        protocol decides it (the last Upgrade field, a Connection with ``upgrade``):
        only such a request is handed over (uvicorn answers any other as a plain
        request, and drops what is pipelined behind it)."""
        connection: list[bytes] = []
        upgrade = None
        for name, value in self._headers:
            if name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
            elif name == b"upgrade":
                upgrade = value.lower()
        return b"upgrade" in connection and upgrade == b"websocket"

    def _upgraded(self, data: bytes, offset: int) -> None:
        """httptools stopped at the end of an Upgrade request (or a CONNECT), at
        ``offset`` of ``data``: hand a WebSocket over, or go on parsing after a request
        answered as a plain one (a CONNECT is refused and its connection closed)."""
        if self._upgrade is not None:
            self._upgrade += data[offset:]
            if self.running is None:
                self._hand_over(self.transport, self._upgrade)
        elif self._resume is not None:
            self._read_upgrade_body(data[offset:])
        elif self.parser.get_method() != b"CONNECT" and offset < len(data):
            self._feed(data[offset:])

    def _feed(self, rest: bytes) -> None:
        """Parse ``rest``, what follows a request the parser stopped at, as a new read.

        A loop, not a call per request: a read can hold a thousand pipelined Upgrade
        requests, and one nested call each ran out of stack.  Called again from inside
        the loop (the next of them), it leaves ``rest`` for the loop up the stack."""
        if self._feeding:
            self._rest = rest
            return
        self._feeding = True
        more: bytes | None = rest
        try:
            while more is not None:
                self._rest = None
                self.data_received(more)
                more = self._rest
        finally:
            self._feeding = False
            self._rest = None

    def _read_upgrade_body(self, rest: bytes) -> None:
        """Read the body of an Upgrade request answered as a plain one (``curl --http2
        -d``), and what is pipelined behind it, as nginx reads them.  Why this way:
        llhttp took the request as ended at its head, its body for the other
        protocol's bytes; a head made of the request's own framing fields, fed to the
        parser before them, has it read the body as it reads any (Content-Length or
        chunked, with its flow control), and the request after it.  The made head never
        makes a request: :meth:`on_headers_complete` sees :attr:`_resume` (on the
        counting path, off the plain one) and gives the body to the request it belongs
        to, if its handler has not already answered it (the body is then dropped)."""
        framing: bytes = self._resume
        request = self.pipeline[-1] if self.pipeline else self.running
        if request is not None and request.scope["headers"] is self._headers:
            request.more_body = True  # (llhttp said it ended: it did not)
            self._resume = request
        else:
            self._resume = self  # (answered already: the body is read and dropped)
        made = b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n"
        self._begin = _now()  # (data_received then feeds it on the counting path)
        self._feed(made + rest)

    def _body_resumed(self) -> None:
        """The made head of :meth:`_read_upgrade_body` is parsed: its body is the
        Upgrade request's."""
        resume, self._resume = self._resume, None
        self._begin = 0
        self.parsing = resume if type(resume) is Request else None

    def _upgrade_head(self, method: str, url: bytes, version: str) -> None:
        """Keep an Upgrade request's head (as uvicorn rebuilds one for its WebSocket
        protocol) for the fallback protocol, and stop reading until it takes over."""
        lines = [b"%s %s HTTP/%s\r\n" % (method.encode("ascii"), url, version.encode("ascii"))]
        lines.extend(_FIELD_JOIN(pair) + b"\r\n" for pair in self._headers)
        lines.append(b"\r\n")
        self._upgrade = b"".join(lines)
        self.pause_reading()

    def _hand_over(self, transport: Any, data: bytes) -> None:
        fallback = self.fallback
        assert fallback is not None
        self.server_state.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        protocol = fallback(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        if data:
            protocol.data_received(data)
