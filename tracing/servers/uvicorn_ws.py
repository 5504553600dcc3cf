"""uvicorn's WebSocket moments, as a ``server`` span around a WebSocket's app span.

uvicorn hands an upgrade request to its WebSocket protocol (the ``ws`` setting), past
the HTTP protocol classes of :mod:`.uvicorn_protocols`, so those never see a WebSocket.
:func:`traced_ws_protocol` gives a subclass of the class uvicorn chose (the legacy
``websockets``, ``websockets-sansio`` or ``wsproto``) that records, once per connection:
the upgrade request's head handed over by the HTTP protocol, the app called, the
handshake's answer (101, or the 403 / ``websocket.http.response`` that denied it), and
the close: its code and who started it (``client``, ``app``, or ``server`` for uvicorn's
own closes: after the app ended, at shutdown, on a keep-alive timeout or protocol error,
a message over ``--ws-max-size``).

An upgrade the WebSocket library refuses itself, before uvicorn calls the app (no
``Sec-WebSocket-Key``, a ``Sec-WebSocket-Version`` it does not speak), gets a span too:
the library's answer (400, 426) and what it found wrong (``error``, ``exception.type``,
``exception.message``), and no ``app.call``: the app never saw it.  All three
implementations write that answer through a method watched here.

Nothing per message: the hooks are methods uvicorn calls once per connection, the two
that watch the handshake's answer on the WebSocket library's connection object remove
themselves once it is sent, and wsproto's close-frame writer (watched for the code of
the close uvicorn sends: wsproto keeps none) is called once, at the close.  Every hook
calls uvicorn's own method with the same arguments, so the bytes on the wire, the close
codes and the errors stay uvicorn's.
A uvicorn whose classes lack a method a hook needs gets its own class back (the app
span is still recorded, without the server hop).

The span joins the trace like the HTTP one: ``traceparent`` from a proxy in front,
``X-Request-Start`` for the queue time, and ``scope["hopscope"]`` for the app span.
Use as ``uvicorn --ws hopscope.tracing.servers.uvicorn_ws:WSProtocol`` (or
``:WebSocketsSansIOProtocol``, ``:WebSocketProtocol``); ``hopscope run`` and ``hopscope
demo`` install it themselves.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..sinks import Sink, default_sink
from .hop import ServerSpan, open_server_span

__all__ = ["traced_ws_protocol", "ws_protocol"]

_now = time.time_ns

_LEGACY = "uvicorn.protocols.websockets.websockets_impl.WebSocketProtocol"
_SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol"
_WSPROTO = "uvicorn.protocols.websockets.wsproto_impl.WSProtocol"
#: Names this module answers to (``--ws hopscope.tracing.servers.uvicorn_ws:NAME``).
_NAMES = {"WebSocketProtocol": _LEGACY, "WebSocketsSansIOProtocol": _SANSIO, "WSProtocol": _WSPROTO}

if TYPE_CHECKING:
    _Base: Any = object
else:
    _Base = object


class _WSHop(_Base):  # type: ignore[misc]
    """What the three subclasses share: the span, opened when uvicorn calls the app and
    ended once both the connection is gone and the app has returned."""

    scope: Any
    close_sent: Any
    client: Any
    _hs_span: tuple[Sink, int, int] | None = None
    #: The HTTP protocol that handed the upgrade over, until the app is called: where the
    #: request's path and headers are when the library refuses it before uvicorn has a scope.
    _hs_http: Any = None
    _hs_called = False
    #: What the library found wrong with a handshake it refused itself.
    _hs_failed: dict[str, Any] | None = None
    _hs_handover = 0
    _hs_begin = 0
    _hs_connection: dict[str, Any] | None = None
    _hs_status: int | None = None
    #: (close code, who started the close), once seen (wsproto: from its close events).
    _hs_close: tuple[int | None, str] | None = None
    _hs_closed: tuple[int | None, str] | None = None
    _hs_server_close = False
    _hs_lost = False
    _hs_app_done = False
    _hs_ended = False

    # -- uvicorn's calls ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        try:
            self._hs_made(transport)
        except Exception:  # (tracing never changes what the server does)
            pass
        super().connection_made(transport)

    async def run_asgi(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_called = True
        self._hs_http = None
        try:
            self._hs_open()
        except Exception:
            self._hs_span = None
        try:
            return await super().run_asgi(*args, **kwargs)
        finally:
            self._hs_app_done = True
            self._hs_finish()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            closed = self._hs_closing()
        except Exception:
            closed = None
        super().connection_lost(exc)
        try:
            self._hs_gone(closed)
        except Exception:
            pass

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_by_server()
        return super().shutdown(*args, **kwargs)

    # -- the span -------------------------------------------------------------------------

    def _hs_made(self, transport: Any) -> None:
        """The HTTP protocol hands the upgrade over: it is still the transport's protocol
        now, and hopscope's knows when the request began and its connection."""
        now = self._hs_handover = _now()
        http = self._hs_http = transport.get_protocol()
        begin = getattr(http, "_hs_begin", 0)
        self._hs_begin = begin if type(begin) is int and 0 < begin <= now else now
        accepted = getattr(http, "_hs_accepted", 0)
        requests = getattr(http, "_hs_requests", None)
        if type(accepted) is int and accepted and type(requests) is int:
            self._hs_connection = {
                "connection.accepted_ts": accepted,
                "connection.request_number": requests + 1,
            }
        self._hs_watch()

    def _hs_open(self) -> None:
        scope = self.scope
        now = _now()
        if not self._hs_handover:  # (connection_made's part failed: now is all there is)
            self._hs_handover = self._hs_begin = now
        client = scope.get("client") or (None,)
        sink, (trace_id, span_id, queue_ns) = self._hs_start(
            scope.get("path", ""), scope.get("headers") or (), client[0], now
        )
        scope["hopscope"] = {"trace_id": trace_id, "parent_id": span_id, "queue_ns": queue_ns}
        sink.emit(("p", now, trace_id, span_id, "app.call", None))
        if self._hs_lost:  # (gone before the app's task first ran)
            self._hs_close_event()

    def _hs_start(self, path: str, headers: Any, client: Any, now: int) -> tuple[Sink, ServerSpan]:
        """Open the span (``now``: when the request is known) and record the handover."""
        sink = default_sink()
        attrs: dict[str, Any] = {
            "server.protocol": type(self).__name__,
            **(self._hs_connection or {}),
            "http.request.method": "GET",
            "url.path": path,
            "client.address": client,
            "network.protocol.name": "websocket",
        }
        opened = open_server_span(sink, headers, f"WS {path}", self._hs_begin, now, attrs)
        self._hs_span = (sink, opened.trace_id, opened.span_id)
        sink.emit(("p", self._hs_handover, opened.trace_id, opened.span_id, "request.head", None))
        return sink, opened

    def _hs_refused(self) -> None:
        """The library answers the upgrade itself, before uvicorn calls the app (a
        malformed handshake): the span the app's call would have opened, from the request
        the HTTP protocol parsed, with what the library found wrong.  It ends with the
        connection (there is no app to wait for)."""
        http, self._hs_http = self._hs_http, None
        if not self._hs_handover:
            self._hs_handover = self._hs_begin = _now()
        scope = getattr(http, "scope", None)
        scope = scope if isinstance(scope, dict) else {}
        path = scope.get("path")  # (h11's protocol has it; httptools' keeps the target)
        if not isinstance(path, str):
            url = getattr(http, "url", None)
            target = url.partition(b"?")[0] if isinstance(url, bytes) else b""
            path = getattr(self, "root_path", "") + unquote(target.decode("latin-1"))
        client = getattr(self, "client", None) or (None,)
        self._hs_start(path, scope.get("headers") or (), client[0], _now())
        failed: dict[str, Any] = {"error": True}
        exc = self._hs_refusal()
        if isinstance(exc, Exception):
            failed["exception.type"] = type(exc).__name__
            failed["exception.message"] = str(exc)
        self._hs_failed = failed
        self._hs_app_done = True

    def _hs_refusal(self) -> BaseException | None:
        """Why the library refused the handshake: legacy ``websockets`` and ``wsproto``
        write their answer while handling the exception."""
        return sys.exc_info()[1]

    def _hs_response(self, status: int) -> None:
        """The handshake's answer is on its way: 101, or the response that denied it."""
        if self._hs_status is None:
            self._hs_status = status
        if self._hs_span is None and not self._hs_called:
            try:
                self._hs_refused()
            except Exception:  # (tracing never changes what the server does)
                pass
        span = self._hs_span
        if span is not None:
            sink, trace_id, span_id = span
            sink.emit(
                (
                    "p",
                    _now(),
                    trace_id,
                    span_id,
                    "response.head",
                    {"http.response.status_code": status},
                )
            )

    def _hs_by_server(self) -> None:
        """uvicorn itself closes (shutdown, keep-alive timeout, protocol error): unless
        the app sent its close first, the close that follows is the server's."""
        if not self.close_sent:
            self._hs_server_close = True

    def _hs_gone(self, closed: tuple[int | None, str] | None) -> None:
        self._hs_unwatch()
        self._hs_http = None
        if closed is None:
            status = self._hs_status
            if status is not None and status != 101:
                closed = (None, "server")  # a denied handshake: closed after its response
            else:  # no close frame either way: the side that hung up
                closed = (1006, "server" if self._hs_app_done else "client")
        self._hs_closed = closed
        self._hs_lost = True
        if self._hs_span is not None:
            self._hs_close_event()
            self._hs_finish()

    def _hs_close_event(self) -> None:
        span, closed = self._hs_span, self._hs_closed
        if span is None or closed is None:
            return
        sink, trace_id, span_id = span
        attrs: dict[str, Any] = {"websocket.closed_by": closed[1]}
        if closed[0] is not None:
            attrs["websocket.close_code"] = closed[0]
        sink.emit(("p", _now(), trace_id, span_id, "connection.close", attrs))

    def _hs_finish(self) -> None:
        span = self._hs_span
        if span is None or not self._hs_lost or not self._hs_app_done or self._hs_ended:
            return
        self._hs_ended = True
        sink, trace_id, span_id = span
        status = self._hs_status
        code, by = self._hs_closed or (None, "server")
        attrs: dict[str, Any] = {"websocket.accepted": status == 101, "websocket.closed_by": by}
        if status is not None:
            attrs["http.response.status_code"] = status
        if code is not None:
            attrs["websocket.close_code"] = code
        if by == "client" and code == 1006:
            attrs["disconnected"] = True  # gone without a close frame, as HTTP's client
        if self._hs_failed:
            attrs.update(self._hs_failed)
        sink.emit(("e", _now(), trace_id, span_id, attrs))

    # -- what each implementation fills in ---------------------------------------------

    def _hs_watch(self) -> None:
        """Start watching the handshake's answer (per connection)."""

    def _hs_unwatch(self) -> None:
        """Stop watching it (the connection is gone)."""

    def _hs_closing(self) -> tuple[int | None, str] | None:
        """(close code, who started the close) from the close frames, if any went."""
        return self._hs_close


def _frames_closing(frames: Any, by_server: bool) -> tuple[int | None, str] | None:
    """Who closed first, from a ``websockets`` connection's close frames (both of its
    implementations keep them)."""
    received, sent = frames.close_rcvd, frames.close_sent
    if received is not None and (sent is None or frames.close_rcvd_then_sent):
        return int(received.code), "client"
    if sent is not None:
        return int(sent.code), "server" if by_server else "app"
    return None


class _SansIOHop(_WSHop):
    """``websockets-sansio``: the answer goes through ``conn.send_response``."""

    conn: Any

    def _hs_watch(self) -> None:
        conn = self.conn
        send_response = conn.send_response

        def send_response_(response: Any) -> None:
            send_response(response)
            self._hs_unwatch()
            self._hs_response(response.status_code)

        conn.send_response = send_response_

    def _hs_unwatch(self) -> None:
        self.conn.__dict__.pop("send_response", None)

    def _hs_refusal(self) -> BaseException | None:
        exc: BaseException | None = self.conn.handshake_exc  # (what accept() found)
        return exc

    def _hs_closing(self) -> tuple[int | None, str] | None:
        return _frames_closing(self.conn, self._hs_server_close)

    def keepalive_timeout(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_by_server()
        return super().keepalive_timeout(*args, **kwargs)

    def handle_parser_exception(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_by_server()  # (websockets sent the close already: uvicorn's flag not yet)
        return super().handle_parser_exception(*args, **kwargs)


class _WSProtoHop(_WSHop):
    """``wsproto``: the answer is an event through ``conn.send``, watched until it goes;
    the close codes come from the close events uvicorn handles, and, for a close uvicorn
    sends (the app's, a message over ``--ws-max-size``'s 1009), from the close frame
    itself: wsproto keeps no code, and uvicorn's send of it is inline, so the frame
    writer's ``close``, called once per connection, is watched from the 101 on."""

    conn: Any
    close_timer: Any
    #: The code of the close frame sent (wsproto's frame writer is watched for it).
    _hs_sent_code: int | None = None
    _hs_writer: Any = None

    def _hs_watch(self) -> None:
        from wsproto.events import AcceptConnection, RejectConnection

        conn = self.conn
        send = conn.send

        def send_(event: Any) -> bytes:
            data: bytes = send(event)
            if isinstance(event, AcceptConnection):
                self._hs_unwatch()
                self._hs_watch_close()
                self._hs_response(101)
            elif isinstance(event, RejectConnection):
                self._hs_unwatch()
                self._hs_response(event.status_code)
            return data

        conn.send = send_

    def _hs_unwatch(self) -> None:
        self.conn.__dict__.pop("send", None)
        writer, self._hs_writer = self._hs_writer, None
        if writer is not None:
            writer.__dict__.pop("close", None)

    def _hs_watch_close(self) -> None:
        """Watch the close frame wsproto writes (``FrameProtocol.close``: once per
        connection, never per message); a wsproto without it leaves the code unknown."""
        writer: Any = getattr(self.conn.connection, "_proto", None)
        close = getattr(writer, "close", None)
        if not callable(close):
            return
        self._hs_writer = writer

        def close_(*args: Any, **kwargs: Any) -> Any:
            frame = close(*args, **kwargs)
            writer.__dict__.pop("close", None)
            self._hs_writer = None
            # (A server's frame is unmasked, its payload short: the code is bytes 2-3.)
            if len(frame) >= 4 and frame[1] & 0x7F >= 2:
                self._hs_sent_code = int.from_bytes(frame[2:4], "big")
            return frame

        writer.close = close_

    def _hs_closing(self) -> tuple[int | None, str] | None:
        if self._hs_close is not None:
            return self._hs_close
        if self.close_sent and self._hs_status == 101:  # a close that got no answer
            pending = self.close_timer is not None  # (the app's close waits for one)
            by = "app" if pending and not self._hs_server_close else "server"
            return self._hs_sent_code, by
        return None

    def handle_close(self, event: Any, *args: Any, **kwargs: Any) -> Any:
        if self._hs_close is None:
            code = int(event.code)
            if not self.close_sent:
                self._hs_close = (code, "client")
            else:  # the client's answer to ours: the code we sent (usually echoed)
                sent = self._hs_sent_code
                by = "server" if self._hs_server_close else "app"
                self._hs_close = (code if sent is None else sent, by)
        return super().handle_close(event, *args, **kwargs)

    def keepalive_timeout(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_by_server()
        if self._hs_server_close and self._hs_close is None:
            self._hs_close = (1011, "server")  # (uvicorn's code for it)
        return super().keepalive_timeout(*args, **kwargs)

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_by_server()
        if self._hs_server_close and self._hs_close is None and self._hs_status == 101:
            self._hs_close = (1012, "server")
        return super().shutdown(*args, **kwargs)


class _LegacyHop(_WSHop):
    """The legacy ``websockets`` protocol: it writes the answer with
    ``write_http_response`` (uvicorn's 500 with ``send_500_response``) and keeps the
    close frames itself."""

    def _hs_closing(self) -> tuple[int | None, str] | None:
        return _frames_closing(self, self._hs_server_close)

    def write_http_response(self, status: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().write_http_response(status, *args, **kwargs)
        try:
            self._hs_response(int(status))
        except Exception:
            pass
        return result

    def send_500_response(self, *args: Any, **kwargs: Any) -> Any:
        result = super().send_500_response(*args, **kwargs)
        self._hs_response(500)
        return result

    def fail_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._hs_by_server()  # (a keep-alive timeout, a protocol error, the shutdown's 1012)
        return super().fail_connection(*args, **kwargs)


#: Each implementation's hooks and the methods of uvicorn's class they override.
_HOOKS: dict[str, tuple[type, tuple[str, ...]]] = {
    _LEGACY: (
        _LegacyHop,
        ("write_http_response", "send_500_response", "fail_connection"),
    ),
    _SANSIO: (_SansIOHop, ("keepalive_timeout", "handle_parser_exception")),
    _WSPROTO: (_WSProtoHop, ("handle_close", "keepalive_timeout")),
}
_COMMON = ("connection_made", "connection_lost", "run_asgi", "shutdown")
_made: dict[Any, Any] = {}


def traced_ws_protocol(chosen: Any) -> Any:
    """hopscope's subclass of ``chosen``, one of uvicorn's own WebSocket protocol classes;
    anything else (None, a class of the user's, uvicorn's class of a version whose
    methods differ) comes back as it is."""
    if not isinstance(chosen, type):
        return chosen
    made = _made.get(chosen)
    if made is not None:
        return made
    hooks = _HOOKS.get(f"{chosen.__module__}.{chosen.__qualname__}")
    if hooks is None:
        return chosen
    mixin, needed = hooks
    if not all(callable(getattr(chosen, name, None)) for name in (*_COMMON, *needed)):
        return chosen
    made = type(chosen.__name__, (mixin, chosen), {"__module__": __name__})
    made.__qualname__ = chosen.__qualname__
    _made[chosen] = made
    return made


def ws_protocol(setting: str = "auto") -> Any:
    """The class for uvicorn's ``ws`` setting (``auto``, ``websockets``, ...), traced;
    None when the setting is ``none`` or no WebSocket library is installed."""
    from uvicorn.config import WS_PROTOCOLS
    from uvicorn.importer import import_from_string

    where = WS_PROTOCOLS.get(setting, setting)
    return None if where is None else traced_ws_protocol(import_from_string(where))


def __getattr__(name: str) -> Any:
    """``--ws hopscope.tracing.servers.uvicorn_ws:WSProtocol``: made when asked, so
    that importing this module imports none of uvicorn's implementations."""
    where = _NAMES.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = where.rpartition(".")
    return ws_protocol(f"{module}:{attribute}")
