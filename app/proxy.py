"""``hopscope proxy``: a debugging reverse proxy that records the client and proxy hops.

It plays the web server's part in front of an app (what nginx does in production) and
records each request as two spans of the app's trace: a ``client`` span (the request as
the client sent it and the response as the client got it) and, under it, a ``proxy``
span (the upstream exchange).  The upstream request carries a ``traceparent`` naming the
proxy span and an ``X-Request-Start``, so an instrumented app (hopscope's middlewares,
its uvicorn protocol) puts its server and app spans into the same trace, and shows how
long the request queued in front of it.

Why it is built this way (measured, see the proxy-speed notes and
``bench/proxy_hotpath.py``): the listening side is the proxy's own protocol around
httptools' request parser (:class:`ProxyHttpProtocol`, :mod:`hopscope.app.listener`)
under uvicorn's server, because uvicorn's per-request machinery (scope, request cycle,
task, keep-alive timer, ``send`` messages) cost more than the exchange; a WebSocket
upgrade is handed to uvicorn's protocol, observed (:class:`UvicornProxyProtocol`).
The upstream leg is :mod:`hopscope.app.upstream`, a pool of asyncio protocols around
httptools' response parser, because httpx and aiohttp clients are several times slower.
Nothing is parsed twice.  A request without a body that finds an idle upstream
connection is answered from that connection's callbacks, with no task
(:meth:`_Exchange.serve`); a response that is whole when its head arrives (most small
ones) is written in one go (:meth:`ClientConnection.write_whole`).  Bodies stream both
ways, never buffered whole; a request body goes upstream only when the request has one.

Recording goes through a :class:`~hopscope.tracing.sinks.Sink` like every other hop, so
the collector, ``tail`` and trace files treat the proxy's records like an app's.  As the
middlewares do, each request is one :class:`~hopscope.tracing.sinks.Recording` (the
exchange itself): its path appends timestamps and compact tuples, and it travels as one
``"r"`` record that the collector expands (:mod:`hopscope.tracing.proxyrecord`).  The
command (:mod:`hopscope.app.proxy_command`) runs that collector and tail in a child
process.  What the proxy is told (upstream, listen address, timeouts) is parsed in
:mod:`hopscope.app.proxy_config`.

Upstreams may be ``https://`` (the default TLS context: system CAs, SNI and hostname
checks against the upstream's host; ``insecure`` skips verification for a development
certificate).  Upstream trailers are recorded, and forwarded when the client sent
``TE: trailers`` (through :class:`CorkedWrites`: ASGI over HTTP/1.1 has no
``http.response.trailers`` in uvicorn).  Interim responses (103 Early Hints) are passed
on as they come, written ahead of the final one (ASGI has no message for them either).
A request the upstream could read otherwise than the proxy (two Host fields, none in
HTTP/1.1, a Host that is not ``host[:port]``, a transfer coding other than chunked) is
refused, as nginx refuses it (:class:`RequestRefused`); so is one the listener cannot
read or finds too long, and each refusal is recorded as a request
(:meth:`ProxyHttpProtocol.refused`).  The request target goes upstream as the client
sent it (``/p?`` keeps its ``?``, a WebSocket's too), and field names both ways as they
came (but those the proxy replaces or drops itself, in lower case).  An Upgrade other
than WebSocket (h2c) is answered as a plain request, as nginx answers it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from operator import itemgetter
from typing import Any, NamedTuple

from hopscope.tracing.asgi import BodyCapture
from hopscope.tracing.exceptions import exception_event
from hopscope.tracing.proxyrecord import (
    CONNECT,
    PROXY_REQUEST,
    PROXY_START,
    REQUEST_BODY,
    RESPONSE_BODY,
    RESPONSE_START,
    RETRY,
    SENT,
    client_start,
    end_records,
    head_record,
    header_fields,
    item_record,
)
from hopscope.tracing.records import BODY_LIMIT, Record, new_trace_id
from hopscope.tracing.records import random_bits as _getrandbits
from hopscope.tracing.sinks import Recording, Sink
from hopscope.tracing.traceparent import parse_traceparent
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from .listener import (
    LOWERED,
    SCAN,
    ClientConnection,
    CorkedWrites,
    HttpListener,
    Request,
)
from .proxy_config import ProxyError, Upstream, check_timeout, parse_upstream, tls_context
from .upstream import (
    HOP_BY_HOP,
    ClientGone,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
)

__all__ = [
    "FIRST_CHUNKS",
    "ClientConnection",
    "CorkedWrites",
    "ProxyApp",
    "ProxyError",
    "ProxyHttpProtocol",
    "Upstream",
    "UvicornProxyProtocol",
    "parse_upstream",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Body chunks recorded one event each; later ones are summed (as the ASGI middleware does).
FIRST_CHUNKS = 4
#: A request still running at a drain is sent piecewise (its start and events so far, so
#: a live view shows it) only once it is this old.  Why wait: under load about half the
#: requests are running at any drain, and piecewise they cost several records each in
#: this process instead of one record the collector expands; nearly all of them are
#: over by the next drain.
LIVE_AFTER_NS = 100_000_000

_now = time.time_ns
_ident = threading.get_ident

#: RFC 9110 7.6.1 hop-by-hop fields (plus the ones this proxy sets or re-frames itself).
_HOP_BY_HOP = HOP_BY_HOP
#: Request fields the proxy replaces with its own (or, for Expect, has already answered:
#: uvicorn sent the 100 Continue when the body was first read).
_REPLACED = frozenset(
    {b"host", b"traceparent", b"x-request-start", b"x-forwarded-proto", b"x-forwarded-host"}
)
_SPECIAL = _HOP_BY_HOP | _REPLACED | {b"x-forwarded-for", b"content-length", b"expect"}
# The listener's scope has these names in lower case (others as the client sent them).
assert _SPECIAL <= LOWERED
#: ``name: value`` of a header pair, in C (``b"%s: %s" % pair`` per pair cost more).
_FIELD_JOIN = b": ".join
#: Connection tokens that name no header.
_PLAIN_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})
#: RFC 3986 ``host [":" port]`` (an IP literal in brackets, or a registered name), and
#: in a name what nginx accepts too where no URL parser reads a delimiter in it: bytes
#: from 0x80 (a UTF-8 name) and ``"<>^`{|}``.  Still refused though nginx takes them:
#: ``\`` (WHATWG URL parsers read ``a\b`` as host ``a``, path ``/b``), ``@ ? #``
#: (delimiters in a URL an app builds from X-Forwarded-Host), and a port that is not
#: digits (``a:b:c`` is host ``a`` to nginx, ``a:b`` to Django).
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z:._~%!$&'()*+,;=-]+\]"
    rb"|(?:[A-Za-z0-9._~!$&'()*+,;=\"<>^`{|}\x80-\xff-]|%[0-9A-Fa-f]{2})+)"
    rb"(?::[0-9]*)?"
)
#: Host values found valid (a few, met again and again: a lookup instead of a match).
_HOSTS: set[bytes] = set()


def _check_host(host: bytes) -> None:
    """Raise :class:`RequestRefused` for a Host that is not a ``host[:port]`` (empty,
    with a space or a slash, ``a..b``, as nginx refuses it; see :data:`_HOST`): which
    site it names is the upstream's guess, and the proxy would pass it on as
    X-Forwarded-Host."""
    if _HOST.fullmatch(host) is None or b".." in host:
        raise RequestRefused(400, f"invalid Host field {host.decode('latin-1')!r}")
    if len(_HOSTS) >= 1024:
        _HOSTS.clear()
    _HOSTS.add(host)


def _added_template(xff: bool, host: bool, trailers: bool) -> bytes:
    """The fields the proxy adds upstream, as a format (see :class:`Forwarded`): Host,
    X-Forwarded-For (when there is a client address or one came), X-Forwarded-Proto,
    X-Forwarded-Host (when the client sent a Host), X-Request-Start, traceparent
    (format_traceparent's value), and TE when the client takes trailers (TE is
    hop-by-hop: the client's own does not go through)."""
    lines = [b"host: %s"]
    if xff:
        lines.append(b"x-forwarded-for: %s")
    lines.append(b"x-forwarded-proto: %s")
    if host:
        lines.append(b"x-forwarded-host: %s")
    lines.append(b"x-request-start: t=%d")
    lines.append(b"traceparent: 00-%032x-%016x-01")
    if trailers:
        lines.append(b"te: trailers")
    return b"\r\n".join(lines)


_ADDED = {
    (xff, host, trailers): _added_template(xff, host, trailers)
    for xff in (False, True)
    for host in (False, True)
    for trailers in (False, True)
}


#: The usual one (see ProxyApp.forwarded): a client address and Host, no TE: trailers.
_ADDED_XFF_HOST = _ADDED[True, True, False]


#: Why a request whose target names a host is refused (the proxy forwards only to its
#: upstream: it is never an open proxy).
ABSOLUTE_REFUSED = "absolute-form request targets are refused (not an open proxy)"


class RequestRefused(Exception):
    """A request the proxy answers itself (``status``, the message its reason) rather
    than pass on: one nginx refuses too, whose meaning the upstream could take
    differently from the proxy."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# --------------------------------------------------------------------------------------
# The listening side: uvicorn's httptools protocol, observed
# --------------------------------------------------------------------------------------


class UvicornProxyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, telling the proxy app what ASGI does not say: the
    path an Upgrade request (a WebSocket) takes, handed over by :class:`ProxyHttpProtocol`.

    ``scope["hopscope.arrival"] = (begin_ns, head_ns, absolute_form, ClientConnection,
    RequestResponseCycle | None)``:
    when the request's first byte and its whole head arrived, whether its target was in
    absolute form (``GET http://elsewhere/``, which uvicorn reduces to a path), and the
    connection (accept time, request count, lost flag), and the request's uvicorn cycle
    (for :meth:`ClientConnection.write_whole`; the exchange takes the tuple out of the
    scope).  Each request cycle writes through the connection's :class:`CorkedWrites`.
    This leans on uvicorn's protocol attributes (``url``, ``scope``, ``cycle``, as of
    uvicorn 0.54).
    """

    _hp_conn: ClientConnection | None = None
    _hp_begin = 0

    def connection_made(self, transport: Any) -> None:
        self._hp_conn = ClientConnection(transport)
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        self._hp_begin = _now()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        conn = self._hp_conn
        if conn is not None:
            conn.requests += 1
            url = self.url
            absolute = not url.startswith(b"/") and url != b"*"
            arrival = (self._hp_begin, _now(), absolute, conn, None)
            self.scope["hopscope.arrival"] = arrival  # type: ignore[typeddict-unknown-key]
        scope = self.scope
        super().on_headers_complete()
        cycle = self.cycle
        if conn is not None and cycle is not None and cycle.transport is self.transport:
            cycle.transport = conn.writer  # type: ignore[assignment]
            if cycle.scope is scope:
                # This request's own cycle (``self.cycle`` moves on to the next
                # request as soon as one is pipelined behind it).
                scope["hopscope.arrival"] = (*arrival[:4], cycle)  # type: ignore[typeddict-unknown-key]

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol rebuilds the scope from the target as path and query
        # (``/p?`` loses its ``?``): the target as the client sent it goes with it, for
        # the upstream handshake (as the HTTP path keeps it).  Its scope is made, and
        # its task not yet run, when this returns (websockets-sansio, wsproto).
        url = self.url
        super().handle_websocket_upgrade()
        scope = getattr(self.transport.get_protocol(), "scope", None)
        if isinstance(scope, dict) and scope.get("type") == "websocket":
            scope["hopscope.target"] = url.partition(b"#")[0]

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._hp_conn
        if conn is not None and not conn.lost:
            conn.lost = True
            callback, conn.on_lost = conn.on_lost, None
            if callback is not None:
                callback()
        super().connection_lost(exc)


#: What a request the listener refused keeps in its recording: the first bytes of its
#: target and of its fields (a refused head can be as long as a read).
REFUSED_TARGET = 2048
REFUSED_FIELDS = 16384


class ProxyHttpProtocol(HttpListener):
    """The proxy's listening side (:mod:`hopscope.app.listener`): each request goes
    straight to an :class:`_Exchange`, told what ASGI does not say (when the request's
    first byte and head arrived, an absolute-form target, the connection, the request
    for :meth:`ClientConnection.write_whole`).  An Upgrade request's connection goes to
    :class:`UvicornProxyProtocol`, and so does every connection when the app is not a
    :class:`ProxyApp`."""

    fallback = UvicornProxyProtocol

    def accepts(self, app: Any) -> bool:
        return isinstance(app, ProxyApp)

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
        # Recorded as a request the proxy refused (a client span, nothing upstream).
        app = self.config.app
        if not isinstance(app, ProxyApp):
            return
        cut = len(url) > REFUSED_TARGET
        raw_path, _, query = url[:REFUSED_TARGET].partition(b"?")
        kept: list[tuple[bytes, bytes]] = []
        size = 0
        for pair in headers:
            size += len(pair[0]) + len(pair[1]) + 4
            if size > REFUSED_FIELDS:
                break
            kept.append(pair)
        scope = {
            "type": "http",
            "http_version": version,
            "method": method.decode("latin-1") if method is not None else "-",
            "scheme": self.scheme,
            # (UTF-8 as uvicorn decodes a path, what is not UTF-8 as \xNN: never mojibake)
            "path": raw_path.decode("utf-8", "backslashreplace"),
            "raw_path": raw_path,
            "query_string": query,
            "headers": kept,
            "client": self.client,
            "server": self.server,
        }
        conn = self.conn
        conn.requests += 1
        exchange = _Exchange(app, scope, _gone, _gone)
        exchange._begin((begin, _now(), False, conn, None))
        exchange.client_attr("proxy.refused", reason.decode("latin-1").rstrip("."))
        exchange.client_attr("proxy.refused.by", "listener")
        if error:
            exchange.client_attr("proxy.refused.error", error)
        if cut:
            exchange.client_attr("proxy.refused.target_size", len(url))
        if len(kept) < len(headers):
            exchange.client_attr("proxy.refused.fields", len(headers))
        exchange.status = status
        exchange.response_headers = [
            *self.server_state.default_headers,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(reason)),
            (b"connection", b"close"),
        ]
        exchange._capture().add(reason, _now())
        exchange._end(proxy=False)
        exchange._close()

    def handle(self, request: Request) -> Coroutine[Any, Any, None] | None:
        # Made without its __init__ (the other paths' way in): serve sets its fields, and
        # object.__new__ skips type.__call__'s generic route into __init__.
        exchange = _new_object(_Exchange)
        return exchange.serve(self, request)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _error_body(status: int, reason: str) -> bytes:
    return f"hopscope proxy: {status} {reason}\n".encode()


# --------------------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------------------


class Forwarded(NamedTuple):
    """A request's fields on their way upstream.

    ``headers`` are the client's that go on (``kept`` of them), ``added`` the ones the
    proxy adds (Host, X-Forwarded-*, X-Request-Start, traceparent) as they go upstream,
    ``name: value`` lines joined by CRLF; ``removed`` names the hop-by-hop ones it
    dropped.  The proxy span records only these differences: the client span already
    has the request's fields, and each header list costs the collector more than any
    other attribute.  Why a block of lines: it goes into the request's head and into the
    recording as it is (one object to marshal instead of a tuple and two bytes per
    field), and one format makes it (joining pairs cost several times more).
    """

    headers: list[tuple[bytes, bytes]]
    kept: int
    removed: list[bytes]
    content_length: bytes | None
    chunked: bool
    #: The client announced ``TE: trailers``: upstream's trailers are forwarded to it.
    trailers: bool = False
    added: bytes = b""

    def fields(self) -> list[tuple[bytes, bytes]]:
        """Every field that goes upstream, as pairs (the WebSocket path's)."""
        return self.headers + header_fields(self.added)


_new_tuple = tuple.__new__
_new_object = object.__new__

#: Strings the proxy encodes per request (client addresses, schemes, methods), encoded.
_ENCODED: dict[str, bytes] = {}


def _latin1(text: str) -> bytes:
    """``text.encode("latin-1")``, remembered: the same few strings come again and
    again, and a lookup costs a fraction of an encode (a bounded number are kept)."""
    encoded = _ENCODED.get(text)
    if encoded is None:
        encoded = text.encode("latin-1")
        if len(_ENCODED) >= 4096:
            _ENCODED.clear()
        _ENCODED[text] = encoded
    return encoded


#: ``_encoded(text) or _latin1(text)``: the lookup inline, the call only the first time.
_encoded = _ENCODED.get


class ProxyApp:
    """The proxy as a pure ASGI 3 app: every request and WebSocket goes to ``upstream``.

    ``sink`` receives the client and proxy spans.  The pool is made on the first request,
    on the loop that serves it; :meth:`close` closes its connections.
    """

    def __init__(
        self,
        upstream: str | Upstream,
        sink: Sink,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        body_limit: int = BODY_LIMIT,
        max_idle: int = 64,
        server_timing: bool = False,
        insecure: bool = False,
        keep_host: bool = False,
    ) -> None:
        self.upstream = upstream if isinstance(upstream, Upstream) else parse_upstream(upstream)
        check_timeout("--connect-timeout", connect_timeout)
        check_timeout("--read-timeout", read_timeout)
        #: TLS to an https upstream (SNI and hostname checks against its host).
        self.tls: ssl.SSLContext | None = tls_context(insecure) if self.upstream.tls else None
        self.server_timing = server_timing
        self.sink = sink
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.body_limit = body_limit
        self.max_idle = max_idle
        self._pool: UpstreamPool | None = None
        self._host_header = self.upstream.host_header.encode("ascii")
        #: Send the client's Host upstream (nginx's ``proxy_set_header Host $http_host``,
        #: mitmproxy's ``keep_host_header``) rather than the upstream's own: an app that
        #: checks a form's Origin against its Host (Django's CSRF) or builds absolute URLs
        #: then sees the address the browser uses.  X-Forwarded-Host is sent either way.
        self.keep_host = keep_host
        self._prefix = self.upstream.prefix.encode("ascii")
        #: What a Location naming the upstream itself starts with (see :meth:`relocated`).
        self._own_url = f"{self.upstream.url}/".encode("ascii")

    @property
    def pool(self) -> UpstreamPool:
        pool = self._pool
        if pool is None:
            up = self.upstream
            pool = self._pool = UpstreamPool(
                up.host,
                up.port,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                max_idle=self.max_idle,
                tls=self.tls,
                unix=up.unix,
            )
        return pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def stats(self) -> dict[str, int]:
        """Upstream connections: ``open`` now, ``idle`` in the pool, ``created`` ever."""
        pool = self._pool
        if pool is None:
            return {"open": 0, "idle": 0, "created": 0}
        return {"open": len(pool.open), "idle": pool.idle, "created": pool.created}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await _Exchange(self, scope, receive, send).run()
        elif kind == "websocket":
            from .proxy_ws import proxy_websocket

            await proxy_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # -- shared by the HTTP and WebSocket paths ------------------------------------
    def ids(self, scope: Scope) -> tuple[int, int]:
        """(trace id, parent id) for the client span: an incoming traceparent is joined."""
        for name, value in scope.get("headers") or ():
            if name == b"traceparent":
                parsed = parse_traceparent(value)
                if parsed is not None:
                    return parsed
                break
        return new_trace_id(), 0

    def forwarded(self, scope: Scope, request_start: int, trace_id: int, span_id: int) -> Forwarded:
        """The request's fields as they go upstream: hop-by-hop ones out, the proxy's in."""
        out: list[tuple[bytes, bytes]] = []
        removed: list[bytes] = []
        xff: bytes | None = None
        original_host: bytes | None = None
        content_length: bytes | None = None
        chunked = False
        trailers = False
        listed: set[bytes] | None = None
        for pair in scope["headers"]:
            name = pair[0]
            if name not in _SPECIAL:
                out.append(pair)
                continue
            if name == b"host":
                if original_host is not None:
                    # Which one names the site?  (RFC 9112 3.2: a 400.)
                    raise RequestRefused(400, "more than one Host field")
                original_host = pair[1]
                if original_host not in _HOSTS:
                    _check_host(original_host)
                continue  # (replaced, never removed: the rest is for the others)
            if name == b"x-forwarded-for":
                xff = pair[1] if xff is None else xff + b", " + pair[1]
            elif name == b"content-length":
                content_length = pair[1]
            elif name == b"transfer-encoding":
                if pair[1].lower() != b"chunked":
                    # httptools took the body as chunked; the coding before (gzip,
                    # chunked) would be lost on the way upstream (nginx: a 501).
                    coding = pair[1].decode("latin-1")
                    raise RequestRefused(501, f"Transfer-Encoding {coding!r} is not supported")
                chunked = True
            elif name == b"connection":
                tokens = {t.strip().lower() for t in pair[1].split(b",")} - _PLAIN_TOKENS
                if tokens:
                    listed = tokens if listed is None else listed | tokens
            elif name == b"te" and b"trailers" in pair[1].lower():
                trailers = True
            if name in _HOP_BY_HOP or name == b"expect":
                removed.append(name)
        if original_host is None and scope.get("http_version") == "1.1":
            # RFC 9112 3.2: a server MUST answer 400 (nginx does); which site is meant
            # would be the upstream's guess.  (HTTP/1.0 has no Host to require.)
            raise RequestRefused(400, "no Host field (HTTP/1.1 requires one)")
        if listed:
            # (Names other than the proxy's own come as the client sent them.)
            removed.extend(name for name, _ in out if name.lower() in listed)
            out = [pair for pair in out if pair[0].lower() not in listed]
        kept = len(out)
        client = scope.get("client")
        if client:
            address = _encoded(client[0]) or _latin1(client[0])
            xff = xff + b", " + address if xff else address
        elif not xff:
            xff = None  # (an empty one is not passed on)
        scheme = scope.get("scheme", "http")
        if scheme[:2] == "ws":
            scheme = "http" + scheme[2:]  # (a WebSocket's: http or https, as nginx says)
        proto = _encoded(scheme) or _latin1(scheme)
        start = request_start // 1000
        template = _ADDED[xff is not None, original_host is not None, trailers]
        host = original_host if self.keep_host and original_host else self._host_header
        if xff is None:
            if original_host is None:
                values: tuple[Any, ...] = (host, proto, start, trace_id, span_id)
            else:
                values = (host, proto, original_host, start, trace_id, span_id)
        elif original_host is None:
            values = (host, xff, proto, start, trace_id, span_id)
        else:
            values = (host, xff, proto, original_host, start, trace_id, span_id)
        added = template % values
        # tuple.__new__ with every field: the class's generated __new__ is a Python
        # function, a frame per request (about a tenth of this method's work).
        fields = (out, kept, removed, content_length, chunked, trailers, added)
        return _new_tuple(Forwarded, fields)

    def relocated(
        self, headers: list[tuple[bytes, bytes]], scope: Scope
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """``headers`` with a Location (or Refresh) naming the upstream's own URL made
        to name the proxy, as the client reached it, and the (from, to) values changed.

        Why: the app sees the upstream's Host (the proxy replaces it, as nginx does by
        default), so the absolute URLs it builds (Starlette's trailing-slash redirect,
        ``url_for``) name the upstream; a browser following one would leave the proxy,
        and its next requests would not be in the trace.  nginx's ``proxy_redirect
        default`` rewrites the same prefix (the ``proxy_pass`` URL with its ``/``), to
        the scheme and Host the client used; other values go on as they came.
        """
        own = self._own_url
        changed: list[tuple[bytes, bytes]] = []
        out = headers
        for index, (name, value) in enumerate(headers):
            lower = name.lower()
            if lower == b"location":
                if not value.startswith(own):
                    continue
                new = self._origin(scope) + value[len(own) - 1 :]
            elif lower == b"refresh":
                at = value.lower().find(b"url=" + own)
                if at < 0:
                    continue
                at += 4
                new = value[:at] + self._origin(scope) + value[at + len(own) - 1 :]
            else:
                continue
            if out is headers:
                out = list(headers)
            out[index] = (name, new)
            changed.append((value, new))
        return out, changed

    @staticmethod
    def _origin(scope: Scope) -> bytes:
        """``scheme://host[:port]`` as the client reached the proxy: its Host (already
        checked), else the address it connected to (HTTP/1.0 may send no Host)."""
        scheme = scope.get("scheme", "http")
        scheme = "https" if scheme in ("https", "wss") else "http"
        for name, value in scope.get("headers") or ():
            if name.lower() == b"host":
                return scheme.encode() + b"://" + bytes(value)
        host, port = scope.get("server") or ("127.0.0.1", None)
        shown = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        where = shown if port in (None, default) else f"{shown}:{port}"
        return f"{scheme}://{where}".encode("latin-1")

    def target(self, scope: Scope) -> bytes:
        """The target that goes upstream: as the client sent it when the scope kept it
        (a WebSocket's: :class:`UvicornProxyProtocol`), else rebuilt from its path and
        query.  (The listener's requests take theirs from the request: see serve.)"""
        kept: bytes | None = scope.get("hopscope.target")
        if kept is not None:
            raw, query = kept, None
        else:
            raw = scope.get("raw_path") or scope["path"].encode("utf-8")
            query = scope.get("query_string")
        # (``OPTIONS *`` asks about the server: no prefix makes it a path.)
        target = self._prefix + raw if self._prefix and raw != b"*" else raw
        return target + b"?" + query if query else target


def request_attrs(scope: Scope) -> dict[str, Any]:
    client = scope.get("client") or (None, None)
    server = scope.get("server") or (None, None)
    return {
        "http.request.method": scope.get("method", "GET"),
        "url.scheme": scope.get("scheme"),
        "network.protocol.version": scope.get("http_version"),
        "url.path": scope.get("path"),
        "url.query": scope.get("query_string"),
        "client.address": client[0],
        "client.port": client[1],
        "server.address": server[0],
        "server.port": server[1],
        "http.request.headers": scope.get("headers"),
    }


def _add_server_timing(headers: list[tuple[bytes, bytes]], entry: str) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``entry`` appended to the upstream's Server-Timing (browser
    devtools then show the proxy's time beside the server's)."""
    out = list(headers)
    for index, (name, value) in enumerate(out):
        if name.lower() == b"server-timing":
            out[index] = (name, value + b", " + entry.encode())
            return out
    out.append((b"server-timing", entry.encode()))
    return out


def _response_headers(
    headers: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Upstream's response fields minus hop-by-hop ones (uvicorn re-frames the body), and
    the names of those removed (``headers`` itself when there are none, the usual case:
    Connection and Transfer-Encoding, which name the others, are hop-by-hop)."""
    for name, _ in headers:
        if name in _HOP_BY_HOP:
            break
    else:
        return headers, []
    listed: set[bytes] | None = None
    chunked = False
    for name, value in headers:
        if name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")} - _PLAIN_TOKENS
            if tokens:
                listed = tokens if listed is None else listed | tokens
        elif name == b"transfer-encoding":
            chunked = True
    # (Hop-by-hop names come in lower case, others as upstream sent them.)
    out = [pair for pair in headers if pair[0] not in _HOP_BY_HOP]
    if chunked:  # a Content-Length next to chunked framing is not to be trusted
        out = [pair for pair in out if pair[0].lower() != b"content-length"]
    if listed:
        out = [pair for pair in out if pair[0].lower() not in listed]
    if len(out) == len(headers):
        return out, []
    kept = {id(pair) for pair in out}
    return out, [pair[0] for pair in headers if id(pair) not in kept]


#: The scope's fields at the head of a proxy recording's ``request`` (see
#: :data:`hopscope.tracing.proxyrecord.PROXY_REQUEST`).
_SCOPE_FIELDS = itemgetter(*PROXY_REQUEST[:8])
#: The same without the headers (the listener's path records them as one block).
_SCOPE_HEAD = itemgetter(*PROXY_REQUEST[:7])


def _scope_fields(scope: Scope) -> tuple[Any, ...]:
    try:
        return _SCOPE_FIELDS(scope)  # type: ignore[no-any-return]
    except KeyError:
        fields = tuple(scope.get(key) for key in PROXY_REQUEST[:8])
        return (scope.get("method", "GET"), *fields[1:])


#: What the fast path sent (see ``_Exchange.serve``): the request's bytes, the
#: connection, and the response's head and whole body when it already took them.
_Head = tuple[list[tuple[bytes, bytes]], bytes | None]
_Sent = tuple[bytes, UpstreamConnection, _Head | None]


class _Exchange(Recording):
    """One HTTP request through the proxy, and the recording of its two spans.

    Why a :class:`~hopscope.tracing.sinks.Recording`: the request's path only takes
    timestamps and appends compact tuples (:mod:`hopscope.tracing.proxyrecord`); the
    sink's drain makes records of them, and a request over before the next drain
    travels as one ``"r"`` record that the collector expands.  The references that
    only the request needs are dropped when it is sealed, as the recording lives on
    until the drain.
    """

    interface = "proxy"

    __slots__ = (
        "_pending",
        "app",
        "client_conn",
        "client_extra",
        "conn",
        "cycle",
        "end_ts",
        "proxy_ended",
        "proxy_extra",
        "proxy_id",
        "receive",
        "request_body",
        "response",
        "response_headers",
        "response_started",
        "scope",
        "send",
        "status",
        "up_conn",
        "up_status",
        "upload",
        "whole_body",
    )

    def __init__(self, app: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = app
        self.scope = scope
        self.receive = receive
        self.send = send
        self.sink = app.sink
        self.request_body: BodyCapture | None = None
        #: The response body's capture, made at its first chunk; a response written
        #: whole keeps its body in ``whole_body`` instead (most do: no capture made).
        self.response: BodyCapture | None = None
        self.whole_body = b""
        self.conn: UpstreamConnection | None = None
        self.client_conn: ClientConnection | None = None
        self.cycle: RequestResponseCycle | Request | None = None
        self.upload: asyncio.Task[None] | None = None
        self.response_started = False
        self.status = 0
        self.response_headers: Any = None
        self.client_extra: dict[str, Any] | None = None
        self.proxy_extra: dict[str, Any] | None = None
        self.proxy_ended = False
        self.up_conn: int | None = None
        self.up_status = 0
        self.end_ts = 0
        self.items = []
        self.end_at = -1
        self.done = False
        self._state = -1
        self._pending: tuple[Any, ...] | None = None

    def event(self, span_id: int, name: str, attrs: dict[str, Any] | None, ts: int = 0) -> None:
        self.items.append(("p", ts or _now(), self.trace_id, span_id, name, attrs))

    def client_attr(self, key: str, value: Any) -> None:
        extra = self.client_extra
        if extra is None:
            extra = self.client_extra = {}
        extra[key] = value

    def proxy_attr(self, key: str, value: Any) -> None:
        extra = self.proxy_extra
        if extra is None:
            extra = self.proxy_extra = {}
        extra[key] = value

    # -- the request ---------------------------------------------------------------
    async def run(self) -> None:
        """Answer the request (the ASGI path: uvicorn's protocol runs this as a task)."""
        head_ts, absolute = self._begin()
        await self._answer(head_ts, absolute)

    def serve(self, listener: HttpListener, request: Request) -> Any:
        """Answer the listener's ``request`` without a task when it can be: None when
        the exchange goes on from upstream's callbacks, else the coroutine to run as a
        task.  The exchange is a fresh one made without ``__init__``
        (:meth:`ProxyHttpProtocol.handle`): its fields are set here.

        Why: most requests have no body, find an idle upstream connection, and get a
        response that arrives whole in one read.  Those are sent upstream here and
        answered from the connection's callback (:meth:`_upstream_moved`): no task, no
        future and no coroutine frames per request, which were a sizeable part of the
        proxy's work.  Anything else (a body, a new connection, a response still
        coming, an error) goes on as a coroutine from where the fast path stopped,
        ``listener.spawn(cycle, coroutine)`` running it.  What ``__init__``,
        :meth:`_begin`, :meth:`ProxyApp.forwarded` (for the usual fields),
        :meth:`_prepare`, :meth:`_request_head`, :meth:`_send` and
        :meth:`UpstreamPool.take_idle` do for such a request is done inline, each call
        a frame per request (tests/test_proxy_listener.py compares the two paths' bytes
        and recordings).
        """
        app: ProxyApp = listener.config.app
        scope = request.scope
        # (__init__'s fields.  The request's receive and send are bound only if the
        # exchange needs them (see _answer): most are answered whole without either.)
        self.app = app
        self.scope = scope
        self.receive = self.send = _gone
        self.sink = sink = app.sink
        self.request_body = None
        self.response = None
        self.whole_body = b""
        self.conn = None
        self.upload = None
        self.response_started = False
        self.status = 0
        self.response_headers = None
        self.client_extra = None
        self.proxy_extra = None
        self.proxy_ended = False
        self.up_conn = None
        self.up_status = 0
        self.end_ts = 0
        items: list[Any] = []
        self.items = items
        self.end_at = -1
        self.done = False
        self._state = -1
        self._pending = None
        # (_begin's, for a request of the listener: see there.)
        self.span_id = _getrandbits(64) or 1
        self.proxy_id = proxy_id = _getrandbits(64) or 1
        self.thread_id = _ident()
        self.client_conn = client_conn = listener.conn
        self.cycle = request
        head_ts = request.head_ts
        fields = scope["headers"]
        block = b"\r\n".join(map(_FIELD_JOIN, fields))
        if block.find(b"traceparent") < 0:
            trace_id = self.trace_id = _getrandbits(128) or 1
            self.parent_id = 0
        else:
            trace_id, parent_id = app.ids(scope)
            self.trace_id, self.parent_id = trace_id, parent_id
        method = scope["method"]
        client = scope["client"]
        scheme = scope["scheme"]
        # (PROXY_REQUEST's fields, as _begin makes them with _SCOPE_HEAD: read one by
        # one they cost less than the getter's tuple unpacked into another.)
        self.request = (method, scheme, scope["http_version"], scope["path"],
                        scope["query_string"], client, scope["server"], block, head_ts,
                        client_conn.accepted, client_conn.requests, proxy_id)  # fmt: skip
        self.start = request.begin
        if not sink.start_live(self):
            self.go_eager()
        absolute = request.absolute
        if absolute or method == "CONNECT":
            return self._answer(head_ts, absolute)
        # (ProxyApp.forwarded's, when the proxy replaces or drops none of the fields but
        # Host (nearly every request): see there.)
        out: list[tuple[bytes, bytes]] = []
        original_host: bytes | None = None
        for pair in fields:
            name = pair[0]
            if name not in _SPECIAL:
                out.append(pair)
            elif name == b"host" and original_host is None and pair[1] in _HOSTS:
                # (A Host not seen valid yet is checked the general way, below.)
                original_host = pair[1]
            else:
                client = None  # (the general way, below)
                break
        if client and original_host is not None:
            # (Without a Host: refused for HTTP/1.1, the general way below.)
            address = _encoded(client[0]) or _latin1(client[0])
            proto = _encoded(scheme) or _latin1(scheme)
            values = (original_host if app.keep_host else app._host_header, address, proto,
                      original_host, head_ts // 1000, trace_id, proxy_id)  # fmt: skip
            added = _ADDED_XFF_HOST % values
            forwarded = _new_tuple(Forwarded, (out, len(out), [], None, False, False, added))
        else:
            try:
                forwarded = app.forwarded(scope, head_ts, trace_id, proxy_id)
            except RequestRefused:
                return self._answer(head_ts, absolute)  # (which answers it)
        # (_prepare's, from the target as the client sent it: ``/p?`` keeps its ``?``.)
        raw = request.target
        prefix = app._prefix
        target = prefix + raw if prefix and raw != b"*" else raw
        up = app.upstream
        # (Forwarded's fields by index: a named field of a tuple subclass is a
        # descriptor lookup on every read, here on every request.)
        removed = forwarded[2]
        added = forwarded[6]
        items.append((PROXY_START, _now(), target, added, 0, 0, removed or None,
                      up.host, up.port, up.origin))  # fmt: skip
        content_length = forwarded[3]
        if (
            forwarded[4]  # chunked
            or (content_length is not None and content_length != b"0")
            or client_conn is None
            or client_conn.lost
        ):
            return self._answer(head_ts, absolute, (forwarded, target))
        # (UpstreamPool.take_idle's.)
        idle = (app._pool or app.pool)._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not transport.is_closing():
                break
        else:
            return self._answer(head_ts, absolute, (forwarded, target))
        # (_request_head's, for a request without a body.)
        kept = forwarded[1]
        if kept and content_length is None:
            if kept == len(fields) - 1 and fields[0][0] == b"host":
                # Every field but Host, which came first: the block without its line.
                kept_block = block[len(fields[0][1]) + 8 :]
            else:
                kept_block = b"\r\n".join(map(_FIELD_JOIN, forwarded[0]))
            name = _encoded(method) or _latin1(method)
            first = b"".join(
                (name, b" ", target, b" HTTP/1.1\r\n", kept_block, b"\r\n", added, b"\r\n\r\n")
            )
        else:
            first = self._request_head(method, target, forwarded, b"", False)
        # (_send's, on an idle connection without a body: conn.write's checks were
        # take_idle's just now, and begin clears the error.)
        self.conn = conn
        # (Told to call _upstream_moved now: nothing arrives before this returns.)
        conn.begin(method == "HEAD", self._upstream_moved)
        client_conn.on_lost = self  # (see __call__: no bound method per request)
        items.append((CONNECT, _now(), True, conn.id, conn.exchanges, None, conn.local_port))
        transport.write(first)
        items.append((SENT, _now(), len(first)))
        self._pending = (forwarded, target, first, conn, listener)
        return None

    def _upstream_moved(self) -> None:
        """The fast path's continuation (see :meth:`serve`): a whole response is
        written and the exchange ends here; otherwise the coroutine takes over."""
        pending = self._pending
        assert pending is not None
        forwarded, target, first, conn, listener = pending
        self._pending = None
        head: _Head | None = None
        client_conn = self.client_conn
        try:
            if (
                conn.complete
                and conn.error is None
                and not conn.trailers
                and client_conn is not None
                and not client_conn.lost
            ):
                app = self.app
                if conn.unusual or app.server_timing:
                    headers = self._response_head(conn, forwarded[5])  # (trailers)
                else:
                    # (_response_head's, for the usual head: forwarded as it came.)
                    self.status = status = conn.status
                    self.response_headers = headers = conn.headers
                    self.items.append((RESPONSE_START, conn.head_ts, status, conn.version, None))
                # (_try_whole's, for the listener's request (serve's only kind): see there.)
                cycle: Request = self.cycle  # type: ignore[assignment]
                done = False
                whole = conn.take_whole()
                if whole is not None:
                    block = b"\r\n".join(map(_FIELD_JOIN, headers))
                    length = SCAN if conn.unusual else conn.length
                    if cycle.write_whole(self.status, headers, whole, block, length):
                        done = True
                        self.response_headers = block
                        self.response_started = True
                        self.whole_body = whole
                        # (_release's: no upload on this path.)
                        (app._pool or app.pool).release(conn)
                if done:
                    # (_end's, _close's and seal's bodies, without their calls.)
                    if self.end_at < 0:
                        self.end_ts = _now()
                        self.proxy_ended = True
                        self.up_conn = conn.id
                        self.up_status = conn.status
                        self.end_at = len(self.items)  # publishes the end: written last
                    if client_conn.on_lost is self:
                        client_conn.on_lost = None
                    self.scope = _NO_SCOPE
                    self.receive = self.send = _gone
                    self.conn = self.client_conn = self.upload = self.cycle = None
                    items = self.items
                    if type(items) is list:
                        # (Recording.seal's body for a sink that takes recordings: the
                        # eager kind of items has more to do.)
                        self.done = True
                        items.append(None)
                    else:
                        _recording_seal(self)
                    return
                head = (headers, whole)
        except BaseException as exc:
            self._abandon_upstream()
            self.items.append(exception_event(self.trace_id, self.proxy_id, exc, phase="proxy"))
            self.proxy_attr("error", True)
            self.proxy_attr("exception.type", type(exc).__name__)
            self._end()
            self._close()
            if client_conn is not None:
                client_conn.transport.close()
            raise
        sent = (first, conn, head)
        listener.spawn(self.cycle, self._answer(0, False, (forwarded, target), sent))

    def _begin(self, arrival: tuple[Any, ...] | None = None) -> tuple[int, bool]:
        """Start the recording: (when the head arrived, whether the target was in
        absolute form)."""
        scope = self.scope
        app = self.app
        if arrival is None:
            # Taken out: it holds the request's cycle, which holds the scope (a
            # reference cycle left for the garbage collector, measurably, if it stayed).
            arrival = scope.pop("hopscope.arrival", None)
        # (new_span_id's body, without its call.)
        self.span_id = _getrandbits(64) or 1
        self.proxy_id = proxy_id = _getrandbits(64) or 1
        self.thread_id = _ident()
        if arrival is not None:
            begin, head_ts, absolute, client_conn, self.cycle = arrival
            self.client_conn = client_conn
            # The scope of the proxy's own protocols (the listener, UvicornProxyProtocol):
            # whole, its fields parsed by httptools (no CR or LF in a value; the names
            # the proxy looks for in lower case).  They are recorded as one block of
            # ``name: value`` lines: one object to marshal, load and free instead of a
            # list, and a tuple and two bytes per field (see proxyrecord.PROXY_REQUEST).
            block = b"\r\n".join(map(_FIELD_JOIN, scope["headers"]))
            if block.find(b"traceparent") < 0:
                # No traceparent field (one search in C instead of a loop over the
                # fields; a value that merely mentions one takes the loop).
                self.trace_id = _getrandbits(128) or 1
                self.parent_id = 0
            else:
                self.trace_id, self.parent_id = app.ids(scope)
            self.request = (*_SCOPE_HEAD(scope), block, head_ts, client_conn.accepted,
                            client_conn.requests, proxy_id)  # fmt: skip
        else:
            self.trace_id, self.parent_id = app.ids(scope)
            begin = head_ts = _now()
            absolute = False
            self.request = (*_scope_fields(scope), head_ts, None, None, proxy_id)
        self.start = begin
        if not self.sink.start_live(self):
            self.go_eager()
        return head_ts, absolute

    async def _answer(
        self,
        head_ts: int,
        absolute: bool,
        prepared: tuple[Forwarded, bytes] | None = None,
        sent: _Sent | None = None,
    ) -> None:
        try:
            cycle = self.cycle
            if type(cycle) is Request:
                # The listener's request: its receive and send are bound only now (see
                # ProxyHttpProtocol.handle).
                self.receive = cycle.receive
                self.send = cycle.send
            method = self.scope["method"]
            if absolute:
                await self._refuse(400, ABSOLUTE_REFUSED)
            elif method == "CONNECT":
                await self._refuse(405, "CONNECT is refused (not an open proxy)")
            else:
                if prepared is None:
                    try:
                        prepared = self._prepare(method, head_ts)
                    except RequestRefused as exc:
                        # (The connection goes on: a body is read past, as httptools
                        # frames it, so the client sees the answer rather than a reset.)
                        await self._refuse(exc.status, str(exc))
                        return
                await self._proxy(method, prepared[0], prepared[1], sent)
        finally:
            self._close()

    def _close(self) -> None:
        client_conn = self.client_conn
        if client_conn is not None and client_conn.on_lost is self:
            # (A pipelined request behind this one may have started, and set its own.)
            client_conn.on_lost = None
        self.seal()

    def _prepare(self, method: str, head_ts: int) -> tuple[Forwarded, bytes]:
        """The request's fields and target as they go upstream (recorded as the proxy
        span's start)."""
        app = self.app
        scope = self.scope
        forwarded = app.forwarded(scope, head_ts, self.trace_id, self.proxy_id)
        target = app.target(scope)  # (the plain path, in serve, has it inline)
        up = app.upstream
        # Only the fields the proxy added are recorded (the client span has the rest),
        # as the bytes that went upstream: one object for the drain to marshal.
        added, removed = forwarded[6], forwarded[2]  # (by index, as in serve)
        start = (PROXY_START, _now(), target, added, 0, 0, removed or None,
                 up.host, up.port, up.origin)  # fmt: skip
        self.items.append(start)
        return forwarded, target

    async def _proxy(
        self, method: str, forwarded: Forwarded, target: bytes, sent: _Sent | None
    ) -> None:
        trace_id, proxy_id = self.trace_id, self.proxy_id
        try:
            await self._forward(method, target, forwarded, sent)
        except ClientGone:
            self._client_gone()
        except UpstreamError as exc:
            await self._upstream_failed(exc)
        except BaseException as exc:
            # Cancellation (shutdown) or a bug: close both sides, record, let uvicorn see it.
            self._abandon_upstream()
            if isinstance(exc, Exception):
                self.items.append(exception_event(trace_id, proxy_id, exc, phase="proxy"))
                self.proxy_attr("error", True)
                self.proxy_attr("exception.type", type(exc).__name__)
            else:
                self.proxy_attr("cancelled", type(exc).__name__)
            self._end()
            raise
        else:
            self._end()

    def _request_head(
        self, method: str, target: bytes, forwarded: Forwarded, body: bytes, more: bool
    ) -> bytes:
        """The request's head as it goes upstream, with the first part of its body."""
        # (Forwarded's fields by index, as in serve.)
        headers, kept, _, content_length, chunked, _, added = forwarded[:7]
        name = _encoded(method) or _latin1(method)
        if kept:
            block = self.request[7]
            fields = self.scope["headers"]
            if type(block) is bytes and kept == len(fields) - 1 and fields[0][0] == b"host":
                # Every field the client sent but its Host, which came first (as clients
                # send it): the block recorded in _begin without its first line, instead
                # of joining the fields a second time.
                kept_block = block[len(fields[0][1]) + 8 :]
            else:
                kept_block = b"\r\n".join(map(_FIELD_JOIN, headers))
            if not more and not chunked and content_length is None:
                # No body (most requests): the head at once.
                return b"".join(
                    (name, b" ", target, b" HTTP/1.1\r\n", kept_block, b"\r\n", added, b"\r\n\r\n")
                )
            parts = [name, b" ", target, b" HTTP/1.1\r\n", kept_block, b"\r\n"]
        else:
            parts = [name, b" ", target, b" HTTP/1.1\r\n"]
        has_body = chunked or (content_length is not None and content_length != b"0")
        parts.append(added)  # (never empty: Host at least)
        if not more:
            if has_body or content_length is not None:
                parts.append(b"\r\ncontent-length: %d" % len(body))
        elif chunked:
            parts.append(b"\r\ntransfer-encoding: chunked")
        else:
            assert content_length is not None
            parts.append(b"\r\ncontent-length: " + content_length)
        parts.append(b"\r\n\r\n")
        head = b"".join(parts)
        # Head and body in one write: one segment for a small request (no delayed-ACK
        # stall), and the whole request at hand if a stale connection forces a retry.
        return head + (b"%x\r\n%s\r\n" % (len(body), body) if more and chunked and body else body)

    async def _forward(
        self, method: str, target: bytes, forwarded: Forwarded, sent: _Sent | None = None
    ) -> None:
        client_conn = self.client_conn
        head_only = method == "HEAD"
        chunked = forwarded.chunked
        more = False
        conn: UpstreamConnection | None = None
        if sent is not None:
            # Sent by the fast path (an idle connection, no body): go on from there.
            first, conn, head = sent
            if head is not None:
                await self._relay(conn, head_only, forwarded.trailers, head)
                return
        else:
            # The body, when there is one: forward it only then (a chunked empty body on
            # a GET costs tens of milliseconds upstream).
            content_length = forwarded.content_length
            body = b""
            if chunked or (content_length is not None and content_length != b"0"):
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone("the client went away before sending its body")
                body = message.get("body", b"")
                more = message.get("more_body", False)
                if body:
                    self._request_chunk(body, more)
            first = self._request_head(method, target, forwarded, body, more)
            if client_conn is not None and client_conn.lost:
                raise ClientGone("the client went away")
            if more and chunked:
                self.proxy_attr("proxy.request.chunked", True)

        pool = self.app.pool
        retried = False
        items = self.items
        while True:
            if conn is None:
                # (A retry connects anew: the other idle ones may be as stale as the
                # first, when the upstream closed them all, restarting.)
                conn = None if retried else pool.take_idle()
                reused = conn is not None
                if conn is None:
                    connect_start = _now()
                    conn = await pool.connect()
                    connect_ns: int | None = _now() - connect_start
                else:
                    connect_ns = None
                self._send(conn, reused, connect_ns, first, more, chunked, head_only)
            else:
                reused = True  # the fast path's (an idle one)
            try:
                await conn.head()
                while not conn.status:  # interim responses (103 Early Hints) first
                    self._interim(conn)
                    await conn.head()
            except UpstreamClosed:
                # A kept-alive connection the upstream closed just as it was reused: try
                # once more on a new one, when the request can be sent again.
                if reused and not more and not retried and not conn.status:
                    retried = True
                    items.append((RETRY, _now()))
                    conn = None
                    continue
                raise
            break
        await self._relay(conn, head_only, forwarded.trailers)

    def _send(
        self,
        conn: UpstreamConnection,
        reused: bool,
        connect_ns: int | None,
        first: bytes,
        more: bool,
        chunked: bool,
        head_only: bool,
    ) -> None:
        """Send the request's head (and what is at hand of its body) on ``conn``."""
        self.conn = conn
        conn.begin(head_only)
        client_conn = self.client_conn
        if client_conn is not None:
            if client_conn.lost:
                self.app.pool.release(conn)
                raise ClientGone("the client went away")
            client_conn.on_lost = self  # (see __call__: no bound method per request)
        items = self.items
        items.append(
            (CONNECT, _now(), reused, conn.id, conn.exchanges, connect_ns, conn.local_port)
        )
        conn.write(first)
        if more:
            conn.sending = True
            self.upload = asyncio.create_task(self._upload(conn, chunked))
        else:
            items.append((SENT, _now(), len(first)))

    def __call__(self) -> None:
        """The client went away (``ClientConnection.on_lost``)."""
        conn = self.conn
        if conn is not None:
            conn.abandon(ClientGone("the client went away"))

    def _request_chunk(self, body: bytes, more: bool) -> None:
        ts = _now()
        capture = self.request_body
        if capture is None:
            capture = self.request_body = BodyCapture(self.app.body_limit)
        if capture.add(body, ts) <= FIRST_CHUNKS:
            self.items.append((REQUEST_BODY, ts, len(body), more))

    async def _upload(self, conn: UpstreamConnection, chunked: bool) -> None:
        """Stream the rest of a request body upstream (while the response may start).

        Failures end up on the connection, where the response side reports them.
        """
        try:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    conn.abandon(ClientGone("the client went away in the middle of its body"))
                    return
                body = message.get("body", b"")
                more = message.get("more_body", False)
                if body:
                    self._request_chunk(body, more)
                    conn.write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
                if not more:
                    if chunked:
                        conn.write(b"0\r\n\r\n")
                    break
                await conn.drain()
            capture = self.request_body
            self.items.append((SENT, _now(), capture.size if capture is not None else 0))
        except (UpstreamError, ClientGone):
            return  # already on the connection (conn.error)
        except Exception as exc:
            conn.abandon(exc)
        finally:
            conn.sending = False

    def _response_head(
        self, conn: UpstreamConnection, te_trailers: bool
    ) -> list[tuple[bytes, bytes]]:
        """Upstream's response head as it goes to the client (recorded)."""
        if conn.interim:
            self._interim(conn)
        self.status = status = conn.status
        if conn.unusual:
            headers, removed = _response_headers(conn.headers)
            headers, relocated = self.app.relocated(headers, self.scope)
            for old, new in relocated:
                attrs = {"from": old.decode("latin-1"), "to": new.decode("latin-1")}
                self.event(self.proxy_id, "response.relocated", attrs)
        else:  # (what _response_headers says then, without its pass over the fields)
            headers, removed = conn.headers, []
        if te_trailers and removed and b"trailer" in removed:
            # Announced trailers may come: the client is told which, as upstream said.
            headers += [pair for pair in conn.headers if pair[0] == b"trailer"]
            removed = [name for name in removed if name != b"trailer"]
        if self.app.server_timing:
            headers = _add_server_timing(
                headers, f"proxy;dur={(conn.head_ts - self.start) / 1e6:.3f}"
            )
        self.response_headers = headers
        self.items.append((RESPONSE_START, conn.head_ts, status, conn.version, removed or None))
        return headers

    def _interim(self, conn: UpstreamConnection) -> None:
        """Pass upstream's interim responses on (RFC 9110 15.2: a proxy forwards 1xx
        responses), written straight ahead of the final one; not to an HTTP/1.0
        client, which has no 1xx.  Each is recorded as an event of the proxy span."""
        interim, conn.interim = conn.interim, []
        client_conn = self.client_conn
        forward = (
            client_conn is not None
            and not client_conn.lost
            and not self.response_started
            and self.scope.get("http_version") == "1.1"
        )
        for status, fields in interim:
            fields, _ = _response_headers(fields)
            if forward:
                assert client_conn is not None
                lines = b"".join(map(b"%s: %s\r\n".__mod__, fields))
                client_conn.writer.write(STATUS_LINE[status] + lines + b"\r\n")
            attrs = {"status": status, "headers": fields, "forwarded": forward}
            self.event(self.proxy_id, "response.interim", attrs)

    def _try_whole(
        self, conn: UpstreamConnection, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bool, bytes | None]:
        """Write a response that is whole already in one go: (done, the body taken)."""
        client_conn = self.client_conn
        whole = None
        if client_conn is not None and conn.complete and not conn.trailers:
            # The whole response is here already (the common small case).  Its fields
            # are joined once, for the client and for the recording (one object to
            # marshal instead of a tuple and two bytes per field).
            whole = conn.take_whole()
            if whole is None:
                return False, None
            block = b"\r\n".join(map(_FIELD_JOIN, headers))
            # Upstream's parser framed the body by its one Content-Length (if any): the
            # writer need not search for it, nor check it.
            length = SCAN if conn.unusual else conn.length
            cycle = self.cycle
            if (
                cycle.write_whole(self.status, headers, whole, block, length)
                if type(cycle) is Request  # (the listener's: one call less)
                else client_conn.write_whole(cycle, self.status, headers, whole, block, length)
            ):
                self.response_headers = block
                self.response_started = True
                self.whole_body = whole
                self._release(conn)
                return True, None
        return False, whole

    async def _relay(
        self,
        conn: UpstreamConnection,
        head_only: bool,
        te_trailers: bool,
        head: _Head | None = None,
    ) -> None:
        """Send upstream's response to the client as it arrives (``head``: its head and
        whole body, when the fast path already took them)."""
        if head is None:
            headers = self._response_head(conn, te_trailers)
            done, whole = self._try_whole(conn, headers)
            if done:
                return
        else:
            headers, whole = head
        status = self.status
        items = self.items
        send = self.send
        client_conn = self.client_conn
        response = self._capture()
        # Otherwise, when it is all here, head and body still leave in one write.
        writer = client_conn.writer if client_conn is not None and conn.complete else None
        if writer is not None:
            writer.hold()
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            self.response_started = True
            while True:
                if whole is not None:
                    data, done, whole = whole, True, None
                else:
                    data, done = await conn.read()
                if done and conn.trailers:
                    self._trailers(conn.trailers, te_trailers, client_conn)
                await send({"type": "http.response.body", "body": data, "more_body": not done})
                if writer is not None:
                    writer.release()
                    writer = None
                if data:
                    ts = _now()
                    if response.add(data, ts) <= FIRST_CHUNKS and not done:
                        items.append((RESPONSE_BODY, ts, len(data)))
                if client_conn is not None and client_conn.lost:
                    raise ClientGone("the client went away during the response")
                if done:
                    break
        finally:
            if writer is not None:
                writer.release()
            if client_conn is not None:
                client_conn.writer.trailers = None  # not written (the response was cut)
        self._release(conn)

    def _capture(self) -> BodyCapture:
        response = self.response
        if response is None:
            response = self.response = BodyCapture(self.app.body_limit)
        return response

    def _release(self, conn: UpstreamConnection) -> None:
        upload = self.upload
        if upload is not None and not upload.done():
            # Upstream answered before reading the whole request body: the connection's
            # state is unknown, so it is not reused.
            upload.cancel()
            conn.close()
        app = self.app
        (app._pool or app.pool).release(conn)  # (the property's call only the first time)

    def _trailers(
        self,
        trailers: list[tuple[bytes, bytes]],
        forward: bool,
        client_conn: ClientConnection | None,
    ) -> None:
        """Upstream's trailer fields: recorded, and forwarded when the client takes them
        (``TE: trailers``) and the response to it is chunked."""
        headers = self.response_headers or ()
        chunked = not any(name.lower() == b"content-length" for name, _ in headers)
        sent = forward and chunked and client_conn is not None
        if sent:
            assert client_conn is not None
            client_conn.writer.trailers = b"".join(b"%s: %s\r\n" % pair for pair in trailers)
        attrs = {"http.response.trailers": trailers, "forwarded": sent}
        self.event(self.proxy_id, "response.trailers", attrs)

    # -- ends ----------------------------------------------------------------------
    def _abandon_upstream(self) -> None:
        upload = self.upload
        if upload is not None and not upload.done():
            upload.cancel()
        conn = self.conn
        if conn is not None:
            conn.close()
            self.proxy_attr("upstream.connection.closed", True)

    def _client_gone(self) -> None:
        self._abandon_upstream()
        phase = "during_response" if self.response_started else "before_response"
        self.event(self.span_id, "disconnect", {"phase": phase})
        self.client_attr("disconnected", True)
        self.proxy_attr("upstream.aborted", True)
        self._end()

    async def _upstream_failed(self, exc: UpstreamError) -> None:
        self._abandon_upstream()
        phase = "during_response" if self.response_started else "before_response"
        self.items.append(exception_event(self.trace_id, self.proxy_id, exc, phase=phase))
        self.proxy_attr("error", True)
        self.proxy_attr("error.type", exc.kind)
        self.proxy_attr("exception.type", type(exc).__name__)
        if self.response_started:
            # Too late for an error page: cut the client's connection so it sees a
            # truncated response (no final chunk, or fewer bytes than Content-Length).
            self.client_attr("response.aborted", True)
            client_conn = self.client_conn
            if client_conn is not None:
                client_conn.transport.close()
                await asyncio.sleep(0)  # let uvicorn see the connection go first
        else:
            await self._respond(exc.status, str(exc))
        self._end()

    async def _refuse(self, status: int, reason: str) -> None:
        self.client_attr("proxy.refused", reason)
        await self._respond(status, reason)
        self._end(proxy=False)

    async def _respond(self, status: int, reason: str) -> None:
        body = _error_body(status, reason)
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        self.status = status
        self.response_headers = headers
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
        self._capture().add(body, _now())

    def _end(self, proxy: bool = True) -> None:
        if self.end_at >= 0:
            return
        self.end_ts = _now()
        self.proxy_ended = proxy
        conn = self.conn
        if conn is not None:
            self.up_conn = conn.id
            self.up_status = conn.status
        self.end_at = len(self.items)  # publishes the end: written last

    def seal(self) -> None:
        # Only the request needed these; the recording lives on until the next drain.
        self.scope = _NO_SCOPE
        self.receive = self.send = _gone
        self.conn = self.client_conn = self.upload = self.cycle = self._pending = None
        _recording_seal(self)

    # -- the drain's side ------------------------------------------------------------
    def end_fields(self) -> tuple[Any, ...]:
        request, response = self.request_body, self.response
        if request is None and response is None:
            # The usual request (no body, a response written whole): the tuple at once,
            # without the two partial ones below.
            whole = self.whole_body
            size = len(whole)
            limit = self.app.body_limit
            # (_kept_whole's body, without its call.)
            kept = [whole if size <= limit else whole[:limit]] if size and limit > 0 else []
            return (
                self.end_ts, self.status, self.response_headers, self.proxy_ended,
                self.up_status, self.up_conn, 0, None, False, None,
                size, kept, size > limit, None, self.client_extra, self.proxy_extra,
            )  # fmt: skip
        if response is None:
            # A response written whole (or none): BodyCapture's fields for one chunk.
            whole = self.whole_body
            size = len(whole)
            limit = self.app.body_limit
            resp: tuple[Any, ...] = (size, _kept_whole(whole, limit), size > limit, None)
        else:
            size = response.size
            resp = (
                size, response.kept(), size > response.limit,
                response.summary() if response.count > FIRST_CHUNKS else None,
            )  # fmt: skip
        if request is None:
            req: tuple[Any, ...] = (0, None, False, None)
        else:
            req = (
                request.size,
                request.kept(),
                request.size > request.limit,
                request.summary() if request.count > FIRST_CHUNKS else None,
            )
        return (
            self.end_ts, self.status, self.response_headers, self.proxy_ended, self.up_status,
            self.up_conn, *req, *resp, self.client_extra, self.proxy_extra,
        )  # fmt: skip

    def _record(self, items: list[Any], end_at: int) -> Record:
        return self._whole(end_at, items)

    def _whole(self, end_at: int, items: list[Any]) -> Record:
        # Recording.take's record of a request over before its first take (nearly
        # every one): the same tuple, without request_fields' call and the class
        # attribute read for the interface.
        return (
            "r", self.start, self.trace_id, self.span_id, self.parent_id, self.thread_id,
            "proxy", self.request, end_at, self.end_fields() if end_at >= 0 else None, items,
        )  # fmt: skip

    def _collect(self, state: int, out: list[Record]) -> tuple[int, bool]:
        # Read in the order the request's side publishes: done, then the end, then items.
        done = self.done
        if state < 0 and not done and _now() - self.start < LIVE_AFTER_NS:
            return -1, False  # likely over by the next drain: then one record
        end_at = self.end_at
        items = self.items
        size = len(items)
        if done:
            if state < 0:
                out.append(self._record(items, end_at))
                return 1, True
            if size and items[size - 1] is None:
                size -= 1
        if end_at > size:
            end_at = -1  # ended after the items were read: next time
        # Still running (or seen running before): what is new since the last take, as
        # records (``state`` is ``2 * items sent + end sent``, as in Recording).
        record = self._record(items, end_at)
        if state < 0:
            out.append(client_start(record))
            out.append(head_record(record))
            state = 0
        cursor, end_sent = state >> 1, state & 1
        if end_at >= 0 and not end_sent:
            while cursor < end_at and items[cursor] is not None:
                out.append(item_record(items[cursor], record))
                cursor += 1
            end_records(record, out)
            end_sent = 1
        while cursor < size and items[cursor] is not None:
            out.append(item_record(items[cursor], record))
            cursor += 1
        return cursor << 1 | end_sent, done


_recording_seal = Recording.seal


def _kept_whole(whole: bytes, limit: int) -> list[bytes]:
    """A body written whole as BodyCapture keeps its one chunk (cut to ``limit``)."""
    size = len(whole)
    return [whole if size <= limit else whole[:limit]] if size and limit > 0 else []


async def _gone(*_: Any) -> Any:
    raise RuntimeError("the exchange is over")


_NO_SCOPE: Scope = {}
