"""uvicorn's own moments, as a ``server`` span around the app span.

uvicorn has no hooks, but its ``http`` setting takes a protocol class, so these
subclasses of its h11, httptools and zttp protocols observe: request start, head parsed
(the app task is created here), response head written, response done, connection lost.
Use them as ``uvicorn --http hopscope.tracing.servers.uvicorn_protocols:HttpToolsProtocol``
(or ``:H11Protocol``, ``:ZttpProtocol``; ``:AutoZttpProtocol`` for HTTP/2 as well as
HTTP/1.1, what ``--http zttp --http2`` serves), or ``uvicorn.run(app, http=HttpToolsProtocol)``.
The zttp classes are made on first use: zttp is an optional package, and importing it
costs every other server's start.

The app span joins the server span through ``scope["hopscope"]``, set before the app
task first runs.  WebSockets leave these classes at the upgrade: their server span is
:mod:`.uvicorn_ws`'s.  Queue time comes from ``X-Request-Start`` when a web server in front
sets it.  ``HOPSCOPE_SERVER_TIMING=1`` adds a ``Server-Timing`` header to responses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol as _H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol

from ..sinks import Sink, default_sink
from .hop import open_server_span

__all__ = ["H11Protocol", "HttpToolsProtocol", "server_timing_enabled"]
#: Made by :func:`_zttp_classes` when first asked for (``module:Class`` lookups included).
_ZTTP = ("ZttpProtocol", "ZttpH2Protocol", "AutoZttpProtocol")

_now = time.time_ns
_INCOMPLETE = {"response.incomplete": True}
_DISCONNECTED = {"disconnected": True}


def server_timing_enabled() -> bool:
    return os.environ.get("HOPSCOPE_SERVER_TIMING", "") not in ("", "0", "false", "no")


class _ServerHop:
    """What the protocol subclasses share: time the connection, adopt each new request
    cycle."""

    cycle: Any
    scope: Any
    _hs_sink: Sink | None = None
    _hs_open: dict[int, tuple[Any, int, int, Callable[..., None]]]
    _hs_accepted = 0
    _hs_requests = 0
    _hs_begin = 0
    _hs_streams = False  # HTTP/2: many cycles at once, ``on_response(stream_id)``

    # _ServerHop comes first in each protocol's bases: super() here is uvicorn's protocol.
    def connection_made(self, transport: Any) -> None:
        self._hs_connection_made()
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._hs_connection_lost()
        super().connection_lost(exc)  # type: ignore[misc]

    def _hs_connection_made(self) -> None:
        self._hs_accepted = _now()
        self._hs_open = {}
        self._hs_requests = 0

    def _hs_adopt_new(self, previous: Any) -> None:
        """Adopt the cycle the parser just made, if it made one (it was ``previous``)."""
        if self.cycle is not previous and self.cycle is not None:
            self._hs_adopt(self.cycle, self._hs_begin or _now())

    def _hs_adopt(self, cycle: Any, begin: int) -> None:
        """Open the server span for a cycle uvicorn just made (its task has not run yet)."""
        sink = self._hs_sink
        if sink is None:
            sink = self._hs_sink = default_sink()
        scope = cycle.scope
        now = _now()
        self._hs_requests += 1
        trace_id, span_id, queue_ns = open_server_span(
            sink,
            scope.get("headers") or (),
            f"{scope.get('method', '')} {scope.get('path', '')}",
            begin,
            now,
            {
                "server.protocol": type(self).__name__,
                "connection.accepted_ts": self._hs_accepted,
                "connection.request_number": self._hs_requests,
                "http.request.method": scope.get("method"),
                "url.path": scope.get("path"),
                "client.address": (scope.get("client") or (None,))[0],
            },
        )
        scope["hopscope"] = {"trace_id": trace_id, "parent_id": span_id, "queue_ns": queue_ns}
        sink.emit(("p", now, trace_id, span_id, "request.head", None))
        timing = server_timing_enabled()
        send = cycle.send

        async def send_(message: Any) -> None:
            if timing and message.get("type") == "http.response.start":
                message = _with_server_timing(message, scope, begin, queue_ns)
            await send(message)
            if message.get("type") == "http.response.start" and not cycle.disconnected:
                sink.emit(
                    (
                        "p",
                        _now(),
                        trace_id,
                        span_id,
                        "response.head",
                        {"http.response.status_code": message.get("status")},
                    )
                )

        cycle.send = send_
        on_response: Callable[..., None] = cycle.on_response
        on_response_: Callable[..., None]
        if self._hs_streams:
            # HTTP/2 calls it (with the stream's id) whenever the app's call ends: a
            # response not complete then is one uvicorn reset (a client that left was
            # said before, by the stream's reset or the connection's loss).
            def on_stream_done(stream_id: int) -> None:
                self._hs_close(cycle, None if cycle.response_complete else _INCOMPLETE)
                on_response(stream_id)

            on_response_ = on_stream_done
        else:

            def on_response_done() -> None:
                self._hs_close(cycle, None)
                on_response()

            on_response_ = on_response_done
        cycle.on_response = on_response_
        self._hs_open[id(cycle)] = (cycle, trace_id, span_id, on_response_)

    def _hs_close(self, cycle: Any, attrs: dict[str, Any] | None) -> None:
        entry = self._hs_open.pop(id(cycle), None)
        if entry is None or self._hs_sink is None:
            return
        _, trace_id, span_id, _ = entry
        self._hs_sink.emit(("e", _now(), trace_id, span_id, attrs))

    def _hs_connection_lost(self) -> None:
        for cycle, _, _, on_response_ in list(getattr(self, "_hs_open", {}).values()):
            # uvicorn drops the cycle's on_response once the app's call is over: an
            # unfinished response then is one uvicorn cut itself (the app raised after
            # it started, or returned without finishing it), not a client that left.
            if cycle.on_response is on_response_:
                self._hs_close(cycle, _DISCONNECTED)
            else:
                self._hs_close(cycle, _INCOMPLETE)


def _with_server_timing(
    message: Any, scope: Any, begin: int, queue_ns: int | None
) -> dict[str, Any]:
    """A copy of the response head with the hop durations so far (browser devtools show them)."""
    parts = []
    if queue_ns is not None:
        parts.append(f"queue;dur={queue_ns / 1e6:.3f}")
    parts.append(f"server;dur={(_now() - begin) / 1e6:.3f}")
    headers = [*message.get("headers", ()), (b"server-timing", ", ".join(parts).encode())]
    return {**message, "headers": headers}


class _ReadTimed(_ServerHop):
    """For the protocols whose parser has no message-begin callback: a request begins
    when its first bytes arrive."""

    def data_received(self, data: bytes) -> None:
        self._hs_begin = _now()
        super().data_received(data)  # type: ignore[misc]


class HttpToolsProtocol(_ServerHop, _HttpToolsProtocol):
    """uvicorn's httptools protocol, recording the server hop."""

    def on_message_begin(self) -> None:
        self._hs_begin = _now()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        self._hs_adopt_new(previous)


class H11Protocol(_ReadTimed, _H11Protocol):
    """uvicorn's h11 protocol, recording the server hop."""

    def handle_events(self) -> None:
        previous = self.cycle
        super().handle_events()
        self._hs_adopt_new(previous)


def __getattr__(name: str) -> Any:
    """The zttp classes, made when first asked for (see :data:`_ZTTP`)."""
    if name in _ZTTP:
        classes = _zttp_classes()
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _zttp_classes() -> dict[str, type]:
    """hopscope's subclasses of uvicorn's zttp protocols (``--http zttp``): HTTP/1.1 has
    the shape of h11's; HTTP/2 runs a cycle per stream, adopted as its request arrives.
    Raises ImportError without zttp (or with a uvicorn older than 0.54)."""
    from uvicorn.protocols.http.auto_zttp_impl import AutoZttpProtocol as _AutoZttp
    from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol as _ZttpH2
    from uvicorn.protocols.http.zttp_impl import ZttpProtocol as _Zttp

    class ZttpProtocol(_ReadTimed, _Zttp):
        """uvicorn's zttp HTTP/1.1 protocol, recording the server hop."""

        def handle_events(self, event: Any) -> None:
            # (also called for the next request once a response is done: keep-alive)
            previous = self.cycle
            super().handle_events(event)
            self._hs_adopt_new(previous)

    class ZttpH2Protocol(_ReadTimed, _ZttpH2):
        """uvicorn's zttp HTTP/2 protocol, recording the server hop of each stream."""

        _hs_streams = True

        def handle_request(self, event: Any) -> None:
            super().handle_request(event)
            cycle = self.cycles.get(event.stream_id)
            if cycle is not None:
                self._hs_adopt(cycle, self._hs_begin or _now())

        def handle_rst_stream(self, event: Any) -> None:
            cycle = self.cycles.get(event.stream_id)
            if cycle is not None and not cycle.response_complete:  # the client cancelled it
                self._hs_close(cycle, _DISCONNECTED)
            super().handle_rst_stream(event)

    class AutoZttpProtocol(_AutoZttp):
        """uvicorn's ``--http zttp --http2`` protocol, handing over to the two above."""

        _hs_accepted = 0

        def connection_made(self, transport: Any) -> None:
            self._hs_accepted = _now()
            super().connection_made(transport)

        def _switch(self, http2: bool, initial_data: bytes = b"") -> None:
            # uvicorn's own, but with hopscope's classes (uvicorn's names them itself).
            protocol_class: type[Any] = ZttpH2Protocol if http2 else ZttpProtocol
            protocol = protocol_class(
                config=self.config,
                server_state=self.server_state,
                app_state=self.app_state,
                _loop=self.loop,
            )
            self.transport.set_protocol(protocol)
            protocol.connection_made(self.transport)
            protocol._hs_accepted = self._hs_accepted  # (accepted here, not at the switch)
            if initial_data:
                protocol.data_received(initial_data)

    classes: dict[str, type] = {
        "ZttpProtocol": ZttpProtocol,
        "ZttpH2Protocol": ZttpH2Protocol,
        "AutoZttpProtocol": AutoZttpProtocol,
    }
    for cls in classes.values():
        cls.__qualname__ = cls.__name__  # (as if at the module's top: reprs, pickling)
    return classes
