"""The ASGI middleware: records each HTTP request and WebSocket as an ``app`` span.

Pure ASGI, no ``BaseHTTPMiddleware``: ``receive`` and ``send`` are wrapped, messages pass
through unchanged and unbuffered, and every message type this module does not know
(pathsend, zerocopysend, early hints, push, future ones) goes through untouched.
Per-request state lives in a recorder object made per call, never on the middleware, so
concurrent requests cannot mix (OpenTelemetry's ASGI middleware once did: contrib #5081).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .context import SpanContext, current
from .exceptions import exception_event
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
BACKGROUND_MIN_NS = 1_000_000
#: First bytes of a WebSocket message kept in its event.
WS_PREVIEW = 256

_now = time.time_ns
_ident = threading.get_ident


class ASGIMiddleware:
    """Instrument an ASGI 3 app; see the module docstring for what is recorded."""

    __hopscope_wrapped__ = True

    def __init__(self, app: ASGIApp, sink: Sink | None = None, body_limit: int = BODY_LIMIT):
        self.app = app
        self.sink = sink
        self.body_limit = body_limit

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
    if isinstance(prefix, str) and prefix.startswith(root_path):
        return prefix[len(root_path) :] + path
    return path


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

    def attrs(self, attrs: dict[str, Any], direction: str) -> None:
        attrs[f"http.{direction}.body.size"] = self.size
        if self.chunks:
            attrs[f"http.{direction}.body"] = self.chunks
            attrs[f"http.{direction}.body.truncated"] = self.size > self.limit

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
        "end_ts",
        "ended",
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
        self.ended = False
        self.end_ts = 0
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
        if self.ended:
            returned = _now()
            if returned - self.end_ts > BACKGROUND_MIN_NS:
                sink.emit(
                    (
                        "c",
                        self.end_ts,
                        returned,
                        trace_id,
                        new_span_id(),
                        span_id,
                        "app",
                        "background",
                        _ident(),
                        None,
                    )
                )
        else:
            # The app returned without finishing its response (or without one at all).
            self._end({"response.incomplete": True})
        return result

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
        elif kind == "http.disconnect" and not self.ended:
            # After the final body a disconnect is the normal end of the exchange.
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
        try:
            await self.send_(message)
        except OSError:
            # The server could not write: the client is gone.
            if not self.ended:
                self.sink.emit(
                    ("p", _now(), self.trace_id, self.span_id, "disconnect", {"phase": "send"})
                )
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
                self._end(None)
        elif kind == "http.response.start":
            self.started = True
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
                self._end(None)
        elif kind == "http.response.pathsend":
            self._end({"http.response.pathsend": message.get("path")})
        elif kind == "http.response.zerocopysend":
            if not message.get("more_body"):
                self._end({"http.response.zerocopysend": True})

    # -- end -------------------------------------------------------------------
    def _end(self, extra: dict[str, Any] | None) -> None:
        if self.ended:
            return
        self.ended = True
        ts = self.end_ts = _now()
        sink = self.sink
        attrs: dict[str, Any] = {"http.response.status_code": self.status or None}
        if self.response_headers is not None:
            attrs["http.response.headers"] = self.response_headers
        route = _route(self.scope, self.root_path)
        if route is not None:
            attrs["http.route"] = route
        self.request.attrs(attrs, "request")
        self.response.attrs(attrs, "response")
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
        if not isinstance(exc, Exception):
            # Cancellation or interpreter exit: not the app's error, but the request ended.
            self._end({"cancelled": type(exc).__name__})
            return
        if self.ended:
            phase = "after_response"
        elif self.started:
            phase = "after_response_start"
        else:
            phase = "before_response"
        self.sink.emit(exception_event(self.trace_id, self.span_id, exc, phase=phase))
        self._end({"error": True, "exception.type": type(exc).__qualname__})


class _WebSocketRecorder:
    """One WebSocket connection's recording: handshake, messages each way, close."""

    __slots__ = (
        "accepted",
        "app",
        "close_code",
        "close_reason",
        "connect_ts",
        "denied",
        "inbound",
        "outbound",
        "scope",
        "sink",
        "span_id",
        "trace_id",
    )

    def __init__(self, middleware: ASGIMiddleware, scope: Scope) -> None:
        self.app = middleware.app
        self.scope = scope
        self.sink = middleware._sink()
        self.inbound = [0, 0]
        self.outbound = [0, 0]
        self.accepted = False
        self.denied = False
        self.connect_ts = 0
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
            if self.denied:
                end_attrs["http.response.status_code"] = 403
            route = _route(scope, "")
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
            if not self.accepted:
                self.denied = True
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
            self.denied = True
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "response.start",
                    {"status": message.get("status"), "headers": message.get("headers")},
                )
            )
