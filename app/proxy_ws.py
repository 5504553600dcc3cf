"""WebSocket connections through the proxy, relayed message by message.

Why messages and not bytes: each leg negotiates its own handshake and extensions (the
client with uvicorn, the proxy with the upstream), so frames cannot be copied across,
but messages can, and a message is what a person debugging wants to see.  The upstream
leg uses the ``websockets`` library (installed with ``uvicorn[standard]``): it does the
handshake, masking, ping replies and the closing handshake, and it applies flow control
of its own (a bounded receive queue, a write limit) so a slow side slows the other.

Recorded like HTTP: a ``client`` span (the client's handshake, every message each way
with the first few as events, the close) and a ``proxy`` span under it (the upstream
handshake, how the upstream closed).  An upstream that refuses the handshake has its
answer relayed; one that cannot be reached gets a 502 or 504, as for HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

from hopscope.tracing.exceptions import exception_event
from hopscope.tracing.records import new_span_id
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.uri import WebSocketURI

from .proxy import ABSOLUTE_REFUSED, RequestRefused, request_attrs

if TYPE_CHECKING:
    from .proxy import Message, ProxyApp, Receive, Scope, Send

__all__ = ["proxy_websocket"]

#: First bytes (or characters) of a message kept in its event.
PREVIEW = 256
#: Largest upstream message accepted (uvicorn's default for the client leg).
MAX_MESSAGE = 16 * 1024 * 1024
#: How long the second direction gets to finish after the first one ended.
CLOSE_GRACE = 5.0

_now = time.time_ns

#: Fields the websockets client sets itself, or that describe the client's own handshake.
_HANDSHAKE = frozenset(
    {
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
        b"content-length",
        b"transfer-encoding",
        b"date",
        b"server",
    }
)


@dataclasses.dataclass
class _TargetURI(WebSocketURI):
    """An upstream WebSocket URI whose request target is the client's, byte for byte.

    Why: websockets rebuilds the target from a URL's path and query, so ``/p?`` lost
    its ``?`` on the way upstream."""

    target: str = "/"

    @property
    def resource_name(self) -> str:
        return self.target


class _Connect(connect):
    """websockets' ``connect`` to the upstream as the proxy needs it: the client's
    target (:class:`_TargetURI`), the client's Host when ``host`` is given (``keep_host``),
    and a redirect relayed to the client rather than followed (a proxy that followed one
    would open a WebSocket wherever the upstream pointed, and the client would never see
    the 3xx)."""

    def __init__(self, uri: str, target: str, host: str | None = None, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        fields = {f.name: getattr(self.ws_uri, f.name) for f in dataclasses.fields(WebSocketURI)}
        self.ws_uri = _TargetURI(**fields, target=target)
        if host is not None:
            self.factory = _with_host(self.factory, host)

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def _with_host(factory: Any, host: str) -> Any:
    """``connect``'s connection factory, its handshake request carrying ``host`` as its
    Host, where the upstream's was, the rest as websockets makes it.

    Why not ``additional_headers``: websockets adds those to the Host it sets from the
    URI, and the upstream would get two.  Nor a URI with the client's host in it: the
    TCP connection and the TLS name follow the URI, and websockets writes the Host from
    its parts (``example.com:80`` would lose its port), not as the client sent it."""

    def made(uri: Any) -> Any:
        connection = factory(uri)
        protocol = connection.protocol
        request_of = protocol.connect

        def connect_() -> Any:
            request = request_of()
            request.headers = Headers(
                [
                    (name, host if name.lower() == "host" else value)
                    for name, value in request.headers.raw_items()
                ]
            )
            return request

        protocol.connect = connect_
        return connection

    return made


class _WebSocketRelay:
    """One proxied WebSocket and its two spans."""

    def __init__(self, app: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = app
        self.scope = scope
        self.receive = receive
        self.send = send
        self.sink = app.sink
        self.counts = {"in": [0, 0], "out": [0, 0]}
        self.client_attrs: dict[str, Any] = {}
        self.proxy_attrs: dict[str, Any] = {}
        self.upstream: Any = None
        self.proxy_started = False
        self.trace_id = 0
        self.client_id = 0
        self.proxy_id = 0
        #: Where the upstream handshake goes, and the target it takes (see _TargetURI).
        self.origin = ""
        self.target = "/"

    def event(self, span_id: int, name: str, attrs: dict[str, Any] | None) -> None:
        self.sink.emit(("p", _now(), self.trace_id, span_id, name, attrs))

    async def run(self) -> None:
        scope = self.scope
        app = self.app
        start = _now()
        self.trace_id, parent_id = app.ids(scope)
        self.client_id = new_span_id()
        self.proxy_id = new_span_id()
        name = f"WS {scope.get('path', '')}"
        attrs = request_attrs(scope)
        attrs["http.request.method"] = "GET"
        attrs["network.protocol.name"] = "websocket"
        ident = threading.get_ident()
        self.sink.emit(
            ("s", start, self.trace_id, self.client_id, parent_id, "client", name, ident, attrs)
        )
        try:
            message = await self.receive()
            if message["type"] != "websocket.connect":
                return
            try:
                kept = scope.get("hopscope.target")
                if kept is not None and not kept.startswith(b"/"):
                    raise RequestRefused(400, ABSOLUTE_REFUSED)  # as the HTTP path refuses it
                headers = app.forwarded(scope, start, self.trace_id, self.proxy_id).fields()
            except RequestRefused as exc:
                self.client_attrs["proxy.refused"] = str(exc)
                body = f"hopscope proxy: {exc.status} {exc}\n".encode()
                await self._http_response(
                    exc.status, [(b"content-type", b"text/plain; charset=utf-8")], body
                )
                return
            target = app.target(scope).decode("latin-1")
            scheme = "wss" if app.upstream.tls else "ws"
            self.origin = f"{scheme}://{app.upstream.host_header}"
            self.target = target
            url = self.origin + target
            self.proxy_started = True
            self.sink.emit(
                (
                    "s",
                    _now(),
                    self.trace_id,
                    self.proxy_id,
                    self.client_id,
                    "proxy",
                    name,
                    ident,
                    {
                        "url.full": url,
                        "server.address": app.upstream.host,
                        "server.port": app.upstream.port,
                        "http.request.headers": [p for p in headers if p[0] not in _HANDSHAKE],
                    },
                )
            )
            await self._relay(headers)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.sink.emit(
                    exception_event(self.trace_id, self.proxy_id, exc, phase="websocket")
                )
                self.proxy_attrs.update({"error": True, "exception.type": type(exc).__name__})
            else:
                self.proxy_attrs["cancelled"] = type(exc).__name__
            if self.upstream is not None:
                with contextlib.suppress(Exception):
                    self.upstream.transport.abort()
            raise
        finally:
            self._end()

    async def _relay(self, headers: list[tuple[bytes, bytes]]) -> None:
        extra = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k not in _HANDSHAKE
        ]
        # (With keep_host, the Host the proxy sends is the client's: see _with_host.)
        host = None
        if self.app.keep_host:
            host = next((v.decode("latin-1") for k, v in headers if k == b"host"), None)
        began = _now()
        unix = self.app.upstream.unix
        where: dict[str, Any] = {} if unix is None else {"unix": True, "path": unix}
        try:
            upstream = await _Connect(
                self.origin + "/",  # (the target goes as it is: see _TargetURI)
                self.target,
                host,
                additional_headers=extra,
                subprotocols=self.scope.get("subprotocols") or None,
                open_timeout=self.app.connect_timeout,
                ping_interval=None,
                max_size=MAX_MESSAGE,
                user_agent_header=None,
                proxy=None,
                ssl=self.app.tls,
                **where,
            )
        except InvalidStatus as exc:
            response = exc.response
            self.event(
                self.proxy_id,
                "response.start",
                {"status": response.status_code, "headers": list(response.headers.raw_items())},
            )
            self.proxy_attrs["http.response.status_code"] = response.status_code
            await self._http_response(
                response.status_code,
                [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.raw_items()
                    if k.lower().encode() not in _HANDSHAKE
                ],
                bytes(response.body or b""),
            )
            return
        except Exception as exc:  # refused, reset, timed out, not a WebSocket server
            status = 504 if isinstance(exc, TimeoutError) else 502
            reason = (
                f"upstream WebSocket handshake timed out after {self.app.connect_timeout:g}s"
                if status == 504
                else f"cannot open the upstream WebSocket: {exc or type(exc).__name__}"
            )
            self.sink.emit(
                exception_event(self.trace_id, self.proxy_id, exc, phase="before_response")
            )
            self.proxy_attrs.update({"error": True, "error.type": "connect_failed"})
            await self._http_response(
                status,
                [(b"content-type", b"text/plain; charset=utf-8")],
                f"hopscope proxy: {status} {reason}\n".encode(),
            )
            return
        self.upstream = upstream
        self.event(
            self.proxy_id,
            "upstream.connect",
            {"reused": False, "connect_ns": _now() - began, "subprotocol": upstream.subprotocol},
        )
        self.proxy_attrs["http.response.status_code"] = 101
        assert upstream.response is not None  # the handshake succeeded
        accept_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.response.headers.raw_items()
            if k.lower().encode("latin-1") not in _HANDSHAKE
        ]
        await self.send(
            {
                "type": "websocket.accept",
                "subprotocol": upstream.subprotocol,
                "headers": accept_headers,
            }
        )
        self.client_attrs["websocket.accepted"] = True
        self.event(self.client_id, "websocket.accept", {"subprotocol": upstream.subprotocol})
        inbound = asyncio.create_task(self._client_to_upstream())
        outbound = asyncio.create_task(self._upstream_to_client())
        try:
            done, _ = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
            # One side ended; the other gets a moment for the closing handshake.
            other = outbound if inbound in done else inbound
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(other), CLOSE_GRACE)
        finally:
            for task in (inbound, outbound):
                if not task.done():
                    task.cancel()
            await asyncio.gather(inbound, outbound, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(upstream.close(), CLOSE_GRACE)
        self.proxy_attrs["websocket.close_code"] = upstream.close_code
        self.proxy_attrs["websocket.close_reason"] = upstream.close_reason or None

    async def _http_response(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Answer the handshake with an HTTP response (uvicorn's websocket.http.response)."""
        self.client_attrs["http.response.status_code"] = status
        if "websocket.http.response" in (self.scope.get("extensions") or {}):
            await self.send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await self.send({"type": "websocket.http.response.body", "body": body})
        else:
            await self.send({"type": "websocket.close", "code": 1011})

    def _message(self, direction: str, message: Any) -> None:
        counts = self.counts[direction]
        size = len(message.encode() if isinstance(message, str) else message)
        counts[0] += 1
        counts[1] += size
        if counts[0] <= 4:
            attrs: dict[str, Any] = {"direction": direction, "size": size}
            attrs["text" if isinstance(message, str) else "bytes"] = message[:PREVIEW]
            self.event(self.client_id, "websocket.message", attrs)

    async def _client_to_upstream(self) -> None:
        upstream = self.upstream
        while True:
            message: Message = await self.receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data = text if text is not None else message.get("bytes") or b""
                self._message("in", data)
                try:
                    await upstream.send(data)
                except Exception:
                    return  # the upstream is closing: the other direction reports it
            elif kind == "websocket.disconnect":
                code = message.get("code", 1000)
                reason = message.get("reason") or ""
                self.client_attrs.setdefault("websocket.close_code", code)
                self.event(self.client_id, "websocket.disconnect", {"code": code})
                sendable = code == 1000 or 3000 <= code < 5000 or 1001 <= code <= 1014
                if code in (1005, 1006):
                    sendable = False
                with contextlib.suppress(Exception):
                    await upstream.close(code if sendable else 1000, reason if sendable else "")
                return

    async def _upstream_to_client(self) -> None:
        upstream = self.upstream
        try:
            async for data in upstream:
                self._message("out", data)
                key = "text" if isinstance(data, str) else "bytes"
                await self.send({"type": "websocket.send", key: data})
        except ConnectionClosed:
            pass
        except OSError:
            return  # the client is gone (uvicorn's ClientDisconnected)
        code = upstream.close_code
        if code is None or code in (1005, 1006):
            code, reason = (1000, "") if code == 1005 else (1011, "upstream connection lost")
        else:
            reason = upstream.close_reason or ""
        self.client_attrs["websocket.close_code"] = code
        self.event(self.client_id, "websocket.close", {"code": code, "reason": reason or None})
        with contextlib.suppress(Exception):
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    def _end(self) -> None:
        now = _now()
        if self.proxy_started:
            self.sink.emit(("e", now, self.trace_id, self.proxy_id, self.proxy_attrs))
        attrs = self.client_attrs
        attrs.update(
            {
                "websocket.messages_in": self.counts["in"][0],
                "websocket.bytes_in": self.counts["in"][1],
                "websocket.messages_out": self.counts["out"][0],
                "websocket.bytes_out": self.counts["out"][1],
            }
        )
        self.sink.emit(("e", now, self.trace_id, self.client_id, attrs))


async def proxy_websocket(app: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
    await _WebSocketRelay(app, scope, receive, send).run()
