"""The ASGI middleware: records each HTTP request and WebSocket as an ``app`` span.

Pure ASGI, no ``BaseHTTPMiddleware``: ``receive`` and ``send`` are wrapped, messages pass
through unchanged and unbuffered, and every message type this module does not know
(pathsend, zerocopysend, early hints, push, future ones) goes through untouched.
Per-request state lives in a recorder object made per call, never on the middleware, so
concurrent requests cannot mix (OpenTelemetry's ASGI middleware once did: contrib #5081).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .context import SpanContext, current
from .exceptions import exception_event
from .logs import install_log_capture
from .records import BODY_LIMIT, new_span_id, new_trace_id
from .sinks import Sink, default_sink
from .traceparent import parse_traceparent

__all__ = ["ASGIMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[Any]]

#: Body chunks (and WebSocket messages) recorded one event each; later ones are summed.
FIRST_CHUNKS = 4
#: Work the app does after the response ended becomes a ``background`` span past this.
#: Frameworks take a few milliseconds to unwind after the last body (Django closes the
#: response in a worker thread, Starlette's StreamingResponse cancels its listener):
#: below 10 ms that is noise, not a background task.
BACKGROUND_MIN_NS = 10_000_000
#: First bytes of a WebSocket message kept in its event.
WS_PREVIEW = 256

_now = time.time_ns
_ident = threading.get_ident


class ASGIMiddleware:
    """Instrument an ASGI 3 app; see the module docstring for what is recorded."""

    __hopscope_wrapped__ = True

    def __init__(
        self,
        app: ASGIApp,
        sink: Sink | None = None,
        body_limit: int = BODY_LIMIT,
        capture_logs: bool = True,
    ):
        self.app = app
        self.sink = sink
        self.body_limit = body_limit
        if capture_logs:
            install_log_capture()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        kind = scope["type"]
        if kind == "http":
            return await _HTTPRecorder(self, scope).run(receive, send)
        if kind == "websocket":
            return await _WebSocketRecorder(self, scope).run(receive, send)
        return await self.app(scope, receive, send)

    def _sink(self) -> Sink:
        sink = self.sink
        if sink is None:
            sink = self.sink = default_sink()
        return sink


def _request_attrs(scope: Scope, interface: str) -> dict[str, Any]:
    client = scope.get("client") or (None, None)
    server = scope.get("server") or (None, None)
    return {
        "interface": interface,
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


def _ids(scope: Scope) -> tuple[int, int]:
    """(trace id, parent span id): the server hop's span when a hopscope server protocol
    runs (``scope["hopscope"]``), else an incoming ``traceparent``, else a new trace."""
    server = scope.get("hopscope")
    if server is not None:
        return server["trace_id"], server["parent_id"]
    for name, value in scope.get("headers") or ():
        if name == b"traceparent":
            parsed = parse_traceparent(value)
            if parsed is not None:
                return parsed
            break
    return new_trace_id(), 0


def _route(scope: Scope, root_path: str) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    prefix = scope.get("root_path", "")
    if not isinstance(prefix, str) or not prefix.startswith(root_path):
        return path
    prefix = prefix[len(root_path) :]
    if hasattr(route, "routes"):
        # A mount nothing inside matched (a 404 there, or a mounted app without routes):
        # the root_path it set already ends with its own path.
        return prefix or path
    return prefix + path


_REQUEST_KEYS = ("http.request.body.size", "http.request.body", "http.request.body.truncated")
_RESPONSE_KEYS = ("http.response.body.size", "http.response.body", "http.response.body.truncated")


class _Body:
    """Counts one direction's body and keeps its first bytes (references, not copies)."""

    __slots__ = ("chunks", "count", "first_ts", "kept", "last_ts", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.size = 0
        self.kept = 0
        self.chunks: list[bytes] = []
        self.first_ts = 0
        self.last_ts = 0

    def add(self, chunk: bytes, ts: int) -> None:
        size = len(chunk)
        if not self.count:
            self.first_ts = ts
        self.count += 1
        self.size += size
        self.last_ts = ts
        if self.kept < self.limit:
            self.chunks.append(chunk)
            self.kept += size

    def attrs(self, attrs: dict[str, Any], keys: tuple[str, str, str]) -> None:
        size_key, body_key, truncated_key = keys
        attrs[size_key] = self.size
        if not self.size:
            return
        chunks = self.chunks
        if self.kept > self.limit:
            # The last chunk kept crosses the limit: cut it, once per request, so the
            # capture is exactly the first ``limit`` bytes and the big chunk is let go.
            last = chunks[-1]
            chunks[-1] = last[: len(last) - (self.kept - self.limit)]
            self.kept = self.limit
        if chunks:
            attrs[body_key] = chunks
        attrs[truncated_key] = self.size > self.limit

    def summary(self) -> dict[str, int]:
        return {
            "count": self.count,
            "bytes": self.size,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
        }


class _HTTPRecorder:
    """One HTTP request's recording; made per call."""

    __slots__ = (
        "app",
        "complete",
        "disconnected",
        "end_extra",
        "end_ts",
        "ended",
        "handling",
        "middleware",
        "receive_",
        "request",
        "response",
        "response_headers",
        "root_path",
        "scope",
        "send_",
        "sink",
        "span_id",
        "started",
        "status",
        "trace_id",
        "trailers",
    )

    def __init__(self, middleware: ASGIMiddleware, scope: Scope) -> None:
        self.middleware = middleware
        self.app = middleware.app
        self.scope = scope
        self.sink = middleware._sink()
        self.request = _Body(middleware.body_limit)
        self.response = _Body(middleware.body_limit)
        self.started = False
        self.complete = False
        self.disconnected = False
        self.ended = False
        self.end_ts = 0
        self.end_extra: dict[str, Any] | None = None
        self.handling: BaseException | None = None
        self.status = 0
        self.trailers = False
        self.response_headers: Any = None
        root_path = scope.get("root_path", "")
        self.root_path = root_path if isinstance(root_path, str) else ""

    async def run(self, receive: Receive, send: Send) -> Any:
        scope = self.scope
        sink = self.sink
        start = _now()
        trace_id, parent_id = _ids(scope)
        self.trace_id = trace_id
        self.span_id = span_id = new_span_id()
        self.receive_ = receive
        self.send_ = send
        sink.emit(
            (
                "s",
                start,
                trace_id,
                span_id,
                parent_id,
                "app",
                f"{scope.get('method', 'GET')} {scope.get('path', '')}",
                _ident(),
                _request_attrs(scope, "asgi"),
            )
        )
        token = current.set(SpanContext(sink, trace_id, span_id))
        try:
            result = await self.app(scope, self.receive, self.send)
        except BaseException as exc:
            self._failed(exc)
            raise
        finally:
            current.reset(token)
        if self.complete:
            if not self.ended:
                self._end(self.end_extra)
            self._background(None)
        elif not self.ended:
            # The app returned without finishing its response (or without one at all).
            self._end({"response.incomplete": True})
        return result

    def _background(self, attrs: dict[str, Any] | None) -> None:
        """Work the app did after its response was complete becomes its own span."""
        returned = _now()
        if attrs or returned - self.end_ts > BACKGROUND_MIN_NS:
            self.sink.emit(
                (
                    "c",
                    self.end_ts,
                    returned,
                    self.trace_id,
                    new_span_id(),
                    self.span_id,
                    "app",
                    "background",
                    _ident(),
                    attrs,
                )
            )

    # -- receive ---------------------------------------------------------------
    async def receive(self) -> Message:
        message = await self.receive_()
        kind = message.get("type")
        if kind == "http.request":
            body = message.get("body", b"")
            if body:
                ts = _now()
                request = self.request
                request.add(body, ts)
                if request.count <= FIRST_CHUNKS:
                    self.sink.emit(
                        (
                            "p",
                            ts,
                            self.trace_id,
                            self.span_id,
                            "request.body",
                            {"size": len(body), "more": bool(message.get("more_body"))},
                        )
                    )
        elif kind == "http.disconnect" and not self.complete and not self.ended:
            # After the final body a disconnect is the normal end of the exchange.
            self.disconnected = True
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "disconnect",
                    {"phase": "during_response" if self.started else "before_response"},
                )
            )
            self._end({"disconnected": True})
        return message

    # -- send ------------------------------------------------------------------
    async def send(self, message: Message) -> None:
        # The app's part ends when it hands the last message over: the server's own
        # span (which writes it) then closes after the app span, not before.
        handed = _now()
        try:
            await self.send_(message)
        except OSError:
            # The server could not write: the client is gone.
            if not self.ended:
                self.sink.emit(
                    ("p", _now(), self.trace_id, self.span_id, "disconnect", {"phase": "send"})
                )
                self.disconnected = True
                self._end({"disconnected": True})
            raise
        kind = message.get("type")
        if kind == "http.response.body":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if body:
                ts = _now()
                response = self.response
                response.add(body, ts)
                if response.count <= FIRST_CHUNKS and more:
                    self.sink.emit(
                        (
                            "p",
                            ts,
                            self.trace_id,
                            self.span_id,
                            "response.body",
                            {"size": len(body), "more": True},
                        )
                    )
            if not more and not self.trailers:
                self._complete(None, handed)
        elif kind == "http.response.start":
            self.started = True
            # An app (Starlette's ServerErrorMiddleware) may send an error page while it
            # handles an exception that it then re-raises: remember which, see _complete.
            self.handling = sys.exception()
            self.status = message.get("status", 0)
            self.response_headers = message.get("headers")
            self.trailers = bool(message.get("trailers"))
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "response.start",
                    {"status": self.status, "headers": self.response_headers},
                )
            )
        elif kind == "http.response.trailers":
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "response.trailers",
                    {"http.response.trailers": message.get("headers")},
                )
            )
            if not message.get("more_trailers"):
                self._complete(None, handed)
        elif kind == "http.response.pathsend":
            self._complete({"http.response.pathsend": message.get("path")}, handed)
        elif kind == "http.response.zerocopysend":
            if not message.get("more_body"):
                self._complete({"http.response.zerocopysend": True}, handed)

    # -- end -------------------------------------------------------------------
    def _complete(self, extra: dict[str, Any] | None, handed: int) -> None:
        """The response is fully sent: the span ends here, unless it is an error page."""
        self.complete = True
        self.end_ts = handed
        if self.handling is None:
            self._end(extra)
        else:
            # Sent while an exception was being handled: if the app re-raises it, the
            # span must say so, so it ends (at this time) when the app returns or raises.
            self.end_extra = extra

    def _end(self, extra: dict[str, Any] | None) -> None:
        if self.ended:
            return
        self.ended = True
        ts = self.end_ts or _now()
        self.end_ts = ts
        sink = self.sink
        attrs: dict[str, Any] = {"http.response.status_code": self.status or None}
        if self.response_headers is not None:
            attrs["http.response.headers"] = self.response_headers
        route = _route(self.scope, self.root_path)
        if route is not None:
            attrs["http.route"] = route
        self.request.attrs(attrs, _REQUEST_KEYS)
        self.response.attrs(attrs, _RESPONSE_KEYS)
        if extra:
            attrs.update(extra)
        if self.request.count > FIRST_CHUNKS:
            sink.emit(
                (
                    "p",
                    ts,
                    self.trace_id,
                    self.span_id,
                    "request.body.summary",
                    self.request.summary(),
                )
            )
        if self.response.count > FIRST_CHUNKS:
            sink.emit(
                (
                    "p",
                    ts,
                    self.trace_id,
                    self.span_id,
                    "response.body.summary",
                    self.response.summary(),
                )
            )
        sink.emit(("e", ts, self.trace_id, self.span_id, attrs))

    def _failed(self, exc: BaseException) -> None:
        attrs: dict[str, Any]
        if isinstance(exc, Exception):
            attrs = {"error": True, "exception.type": type(exc).__qualname__}
            if exc is self.handling:
                phase = "before_response"  # the response was this exception's error page
            elif self.complete:
                phase = "after_response"
            elif self.started:
                phase = "after_response_start"
            else:
                phase = "before_response"
            self.sink.emit(exception_event(self.trace_id, self.span_id, exc, phase=phase))
        else:
            # Cancellation or interpreter exit: not the app's error, but the request ended.
            attrs = {"cancelled": type(exc).__name__}
        if self.complete and exc is not self.handling:
            # The response went out fine; what failed is the work after it.
            self._end(self.end_extra)
            self._background(attrs)
        else:
            if self.end_extra:
                attrs.update(self.end_extra)
            self._end(attrs)


class _WebSocketRecorder:
    """One WebSocket connection's recording: handshake, messages each way, close."""

    __slots__ = (
        "accepted",
        "app",
        "close_code",
        "close_reason",
        "connect_ts",
        "inbound",
        "outbound",
        "root_path",
        "scope",
        "sink",
        "span_id",
        "status",
        "trace_id",
    )

    def __init__(self, middleware: ASGIMiddleware, scope: Scope) -> None:
        self.app = middleware.app
        self.scope = scope
        self.sink = middleware._sink()
        self.inbound = [0, 0]
        self.outbound = [0, 0]
        self.accepted = False
        self.status: int | None = None
        self.connect_ts = 0
        root_path = scope.get("root_path", "")
        self.root_path = root_path if isinstance(root_path, str) else ""
        self.close_code: int | None = None
        self.close_reason: str | None = None

    async def run(self, receive: Receive, send: Send) -> Any:
        scope = self.scope
        start = _now()
        trace_id, parent_id = _ids(scope)
        self.trace_id = trace_id
        self.span_id = span_id = new_span_id()
        attrs = _request_attrs(scope, "asgi")
        attrs["network.protocol.name"] = "websocket"
        self.sink.emit(
            (
                "s",
                start,
                trace_id,
                span_id,
                parent_id,
                "app",
                f"WS {scope.get('path', '')}",
                _ident(),
                attrs,
            )
        )

        async def receive_() -> Message:
            message = await receive()
            self._received(message)
            return message

        async def send_(message: Message) -> None:
            await send(message)
            self._sent(message)

        token = current.set(SpanContext(self.sink, trace_id, span_id))
        end_attrs: dict[str, Any] = {}
        try:
            return await self.app(scope, receive_, send_)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.sink.emit(exception_event(trace_id, span_id, exc))
                end_attrs["error"] = True
                end_attrs["exception.type"] = type(exc).__qualname__
            raise
        finally:
            current.reset(token)
            end_attrs.update(
                {
                    "websocket.accepted": self.accepted,
                    "websocket.messages_in": self.inbound[0],
                    "websocket.bytes_in": self.inbound[1],
                    "websocket.messages_out": self.outbound[0],
                    "websocket.bytes_out": self.outbound[1],
                    "websocket.close_code": self.close_code,
                    "websocket.close_reason": self.close_reason,
                }
            )
            if self.status is not None:
                end_attrs["http.response.status_code"] = self.status
            route = _route(scope, self.root_path)
            if route is not None:
                end_attrs["http.route"] = route
            self.sink.emit(("e", _now(), trace_id, span_id, end_attrs))

    def _message_event(self, direction: str, message: Message, counts: list[int]) -> None:
        data = message.get("bytes")
        text = message.get("text")
        size = len(data) if data is not None else len(text.encode()) if text is not None else 0
        counts[0] += 1
        counts[1] += size
        if counts[0] <= FIRST_CHUNKS:
            attrs: dict[str, Any] = {"direction": direction, "size": size}
            if text is not None:
                attrs["text"] = text[:WS_PREVIEW]
            elif data is not None:
                attrs["bytes"] = data[:WS_PREVIEW]
            self.sink.emit(("p", _now(), self.trace_id, self.span_id, "websocket.message", attrs))

    def _received(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "websocket.receive":
            self._message_event("in", message, self.inbound)
        elif kind == "websocket.connect":
            self.connect_ts = _now()
        elif kind == "websocket.disconnect":
            if self.close_code is None:
                self.close_code = message.get("code", 1005)
                reason = message.get("reason")
                self.close_reason = reason or None
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "websocket.disconnect",
                    {"code": message.get("code", 1005)},
                )
            )

    def _sent(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "websocket.send":
            self._message_event("out", message, self.outbound)
        elif kind == "websocket.accept":
            self.accepted = True
            now = _now()
            self.sink.emit(
                (
                    "p",
                    now,
                    self.trace_id,
                    self.span_id,
                    "websocket.accept",
                    {"handshake_ns": now - self.connect_ts if self.connect_ts else None},
                )
            )
        elif kind == "websocket.close":
            if not self.accepted and self.status is None:
                self.status = 403  # what servers answer a handshake closed before accept
            self.close_code = message.get("code", 1000)
            self.close_reason = message.get("reason") or None
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "websocket.close",
                    {"code": self.close_code, "reason": self.close_reason},
                )
            )
        elif kind == "websocket.http.response.start":
            self.status = message.get("status")
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "response.start",
                    {"status": self.status, "headers": message.get("headers")},
                )
            )
