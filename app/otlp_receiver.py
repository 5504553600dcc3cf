"""An OTLP/HTTP traces endpoint: apps instrumented with OpenTelemetry report into
hopscope as they would into any collector.

``POST /v1/traces`` takes JSON (``application/json``) or protobuf
(``application/x-protobuf``, when ``opentelemetry-proto`` is installed; the Python SDK's
exporter only speaks protobuf), gzip-compressed or not, turns the spans into wire events
and hands them to a callback.  Answers are what the OTLP spec asks of a collector, so
exporters neither retry good batches nor resend bad ones forever (400 is final).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

from hopscope.tracing.otlp import (
    OtlpError,
    otlp_protobuf_to_json,
    otlp_to_events,
    protobuf_available,
)

__all__ = ["MAX_BODY", "OtlpReceiver"]

Event = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

#: Bodies past this (compressed or not) are refused with 413.
MAX_BODY = 32 * 1024 * 1024
PATH = "/v1/traces"

_JSON = "application/json"
_PROTOBUF = "application/x-protobuf"


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OtlpReceiver:
    """ASGI app; ``callback(events)`` runs on the server's event loop for each accepted
    request, so it should be quick (hand the events over, don't process them there).

    Counters: :attr:`requests` accepted, :attr:`spans` received, :attr:`rejected`.
    """

    def __init__(self, callback: Callable[[list[Event]], None], max_body: int = MAX_BODY) -> None:
        self.callback = callback
        self.max_body = max_body
        self.requests = 0
        self.spans = 0
        self.rejected = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        as_json = media != _PROTOBUF
        try:
            if scope["path"] != PATH:
                raise _Refused(404, f"not found: OTLP traces go to POST {PATH}")
            if scope["method"] != "POST":
                raise _Refused(405, f"method not allowed: OTLP traces go to POST {PATH}")
            body = await self._body(receive, headers)
            payload = self._decode(body, media)
            events = otlp_to_events(payload)
        except _Refused as exc:
            self.rejected += 1
            await _answer(send, exc.status, as_json, str(exc))
            return
        except OtlpError as exc:
            self.rejected += 1
            await _answer(send, 400, as_json, str(exc))
            return
        self.requests += 1
        self.spans += sum(1 for event in events if event["kind"] == "span_start")
        if events:
            self.callback(events)
        await _answer(send, 200, as_json)

    async def _body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _Refused(413, f"request body over {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding in ("gzip", "deflate"):
            wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
            decompressor = zlib.decompressobj(wbits)
            try:
                body = decompressor.decompress(body, self.max_body)
            except zlib.error:
                raise _Refused(400, f"body is not valid {coding}") from None
            if decompressor.unconsumed_tail:
                raise _Refused(413, f"decompressed body over {self.max_body} bytes")
        elif coding not in ("identity", ""):
            raise _Refused(415, f"unsupported content-encoding {coding!r}")
        return body

    def _decode(self, body: bytes, media: str) -> Any:
        if media == _PROTOBUF:
            if not protobuf_available():
                raise _Refused(
                    415,
                    "protobuf needs the opentelemetry-proto package "
                    "(pip install 'hopscope[otlp]'); or export OTLP as JSON",
                )
            return otlp_protobuf_to_json(body)
        if media not in (_JSON, ""):
            raise _Refused(415, f"unsupported content-type {media!r}: use {_JSON} or {_PROTOBUF}")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise OtlpError("body is not JSON") from None


async def _answer(send: Send, status: int, as_json: bool, error: str | None = None) -> None:
    # An empty ExportTraceServiceResponse is {} in JSON and zero bytes in protobuf; errors
    # carry a google.rpc.Status in JSON, and a plain message for protobuf clients.
    if as_json:
        body = json.dumps({"code": 3, "message": error} if error else {}).encode()
        media = _JSON
    else:
        body = error.encode() if error else b""
        media = _PROTOBUF if error is None else "text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
