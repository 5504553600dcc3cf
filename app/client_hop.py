"""The client hop: an httpx transport that records each request as a ``client`` span.

A span measured by the client is the only one that sees what the user waits for:
connecting, sending, the wait for the first byte and the body's download.  httpcore
reports those phases through the request's ``trace`` extension, synchronously in the
sending thread, so the transport collects them and turns them into the same events a
replay records (``connect``, ``request.head.sent``, ``request.sent``, ``response.start``,
``response.end``).  Each request carries a ``traceparent`` naming its client span: a
proxy or an instrumented app behind it joins the same trace.

The span ends when the response is closed (its body read or abandoned), as the
transport's job ends there too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
from hopscope.tracing.records import BODY_LIMIT, Record, new_span_id, new_trace_id
from hopscope.tracing.sinks import Sink
from hopscope.tracing.traceparent import format_traceparent

from .replay import _phase_events

__all__ = ["ClientHopTransport"]

Phase = tuple[str, int, dict[str, Any]]


class ClientHopTransport(httpx.BaseTransport):
    """Wraps another transport (``httpx.HTTPTransport()`` by default) and records to ``sink``."""

    def __init__(
        self,
        sink: Sink,
        transport: httpx.BaseTransport | None = None,
        *,
        body_limit: int = BODY_LIMIT,
    ) -> None:
        self.sink = sink
        self.transport = transport if transport is not None else httpx.HTTPTransport()
        self.body_limit = body_limit

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        trace_id, span_id = new_trace_id(), new_span_id()
        request.headers["traceparent"] = format_traceparent(trace_id, span_id)
        phases: list[Phase] = []
        previous = request.extensions.get("trace")

        def on_trace(name: str, info: dict[str, Any]) -> None:
            phases.append((name, time.time_ns(), info))
            if previous is not None:
                previous(name, info)

        request.extensions = {**request.extensions, "trace": on_trace}
        url = request.url
        start = time.time_ns()
        self.sink.emit(
            (
                "s",
                start,
                trace_id,
                span_id,
                0,
                "client",
                f"{request.method} {url.path}",
                threading.get_ident(),
                {
                    "http.request.method": request.method,
                    "url.full": str(url),
                    "url.scheme": url.scheme,
                    "url.path": url.path,
                    "url.query": url.query,
                    "server.address": url.host,
                    "server.port": url.port or (443 if url.scheme == "https" else 80),
                    "http.request.headers": list(request.headers.raw),
                    "user_agent.original": request.headers.get("user-agent"),
                },
            )
        )
        try:
            sent = request.content
        except httpx.RequestNotRead:  # a streamed upload: its size is not known here
            sent = b""
        span = _ClientSpan(self, trace_id, span_id, phases, sent)
        try:
            response = self.transport.handle_request(request)
        except BaseException as exc:
            span.end(None, error=exc)
            raise
        stream = response.stream
        assert isinstance(stream, httpx.SyncByteStream)  # a sync transport's
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_RecordedStream(stream, span, response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.transport.close()


class _ClientSpan:
    """One request's span, ended once (by the body stream's close, or an error)."""

    def __init__(
        self,
        transport: ClientHopTransport,
        trace_id: int,
        span_id: int,
        phases: list[Phase],
        sent: bytes,
    ) -> None:
        self.transport = transport
        self.trace_id = trace_id
        self.span_id = span_id
        self.phases = phases
        self.sent = sent
        self.chunks: list[bytes] = []
        self.kept = 0
        self.size = 0
        self.ended = False

    def chunk(self, data: bytes) -> None:
        self.size += len(data)
        room = self.transport.body_limit - self.kept
        if room > 0 and data:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))

    def end(self, response: httpx.Response | None, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        limit = self.transport.body_limit
        status = response.status_code if response is not None else None
        attrs: dict[str, Any] = {"http.request.body.size": len(self.sent)}
        if self.sent:
            attrs["http.request.body"] = self.sent[:limit]
            attrs["http.request.body.truncated"] = len(self.sent) > limit
        if response is not None:
            version = response.extensions.get("http_version", b"HTTP/1.1")
            attrs["http.response.status_code"] = status
            attrs["network.protocol.version"] = bytes(version).decode("ascii", "replace")[5:]
            attrs["http.response.headers"] = list(response.headers.raw)
            attrs["http.response.body.size"] = self.size
            if self.chunks:
                attrs["http.response.body"] = self.chunks
                attrs["http.response.body.truncated"] = self.size > self.kept
        if error is not None:
            attrs["error"] = True
            attrs["exception.type"] = type(error).__name__
            attrs["exception.message"] = str(error)
        emit = self.transport.sink.emit
        for record in _phase_events(
            self.trace_id, self.span_id, self.phases, len(self.sent), status
        ):
            emit(record)
        end: Record = ("e", time.time_ns(), self.trace_id, self.span_id, attrs)
        emit(end)


class _RecordedStream(httpx.SyncByteStream):
    """The response body as the transport gave it, counted on its way to the caller."""

    def __init__(
        self, stream: httpx.SyncByteStream, span: _ClientSpan, response: httpx.Response
    ) -> None:
        self._stream = stream
        self._span = span
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._stream:
                self._span.chunk(chunk)
                yield chunk
        except Exception as exc:  # not GeneratorExit: a reader may stop early
            self._span.end(self._response, error=exc)
            raise

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._span.end(self._response)
